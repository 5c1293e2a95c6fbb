"""Tier 4: the package as a robot builder builds it. `colcon build` of this repository into a scratch
workspace, then the overlay's own llm_node (from the sourced install/setup.sh) answers a question
asked with the overlay's `slm-ros ask`. About a minute on 2 cores.

With a sourced ROS install the environment already holds AMENT_PREFIX_PATH / CMAKE_PREFIX_PATH. Here
ROS 2 comes from the PyPI wheels in this Python's environment, so the recipe of the README's "Building
with colcon" section sets them to that prefix (and LD_LIBRARY_PATH to its lib/)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "/colcon"


def colcon() -> str:
    path = Path(sys.prefix) / "bin" / "colcon"
    return str(path) if path.exists() else shutil.which("colcon") or ""


def build_env() -> dict:
    env = dict(os.environ, PATH=f"{Path(sys.prefix) / 'bin'}:{os.environ.get('PATH', '')}",
               ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
    if "AMENT_PREFIX_PATH" not in os.environ:   # PyPI ROS wheels, not a sourced ROS install
        env.update(VIRTUAL_ENV=sys.prefix, AMENT_PREFIX_PATH=sys.prefix,
                   CMAKE_PREFIX_PATH=sys.prefix,
                   LD_LIBRARY_PATH=f"{Path(sys.prefix) / 'lib'}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    return env


# Run from the sourced overlay, as a user's shell would: which slm_ros Python imports, then the
# overlay's node in the background and one question asked with the overlay's CLI.
SCRIPT = f"""
. install/setup.sh
python -c 'import slm_ros, slm_ros.msg; print("imports", slm_ros.__file__)'
install/slm_ros/lib/slm_ros/llm_node --ros-args -r __ns:={NAMESPACE} \\
    -p default_max_new_tokens:=24 > node.log 2>&1 &
node=$!
install/slm_ros/bin/slm-ros ask "What is the capital of France? Answer in one sentence." \\
    --namespace {NAMESPACE} --wait 120
asked=$?
kill -INT $node
wait $node
echo "node exit code $?"
exit $asked
"""


@pytest.mark.skipif(not colcon(), reason="colcon is not installed (scripts/setup.sh installs "
                                         "colcon-common-extensions)")
def test_colcon_build_and_the_overlay_node_answers(tmp_path, domain_id):
    env = build_env()
    build = subprocess.run(
        [colcon(), "--log-base", str(tmp_path / "log"), "build", "--base-paths", str(ROOT),
         "--build-base", str(tmp_path / "build"), "--install-base", str(tmp_path / "install"),
         "--cmake-args", "-DBUILD_TESTING=OFF"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout + build.stderr
    assert "1 package finished" in build.stdout, build.stdout
    install = tmp_path / "install" / "slm_ros"
    for exe in ("lib/slm_ros/llm_node", "lib/slm_ros/vision_node",
                "lib/slm_ros/engine_builder_node", "bin/slm-ros"):
        assert os.access(install / exe, os.X_OK), exe
    assert (install / "share" / "slm_ros" / "launch" / "slm.launch.py").is_file()
    assert (install / "share" / "ament_index" / "resource_index" / "packages" / "slm_ros").is_file()

    run = subprocess.run(["bash", "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(env, ROS_DOMAIN_ID=str(domain_id)), timeout=300)
    node_log = (tmp_path / "node.log").read_text() if (tmp_path / "node.log").exists() else ""
    report = f"{run.stdout}\n{run.stderr}\nnode log:\n{node_log}"
    assert run.returncode == 0, report
    # The overlay's package is the one imported, not the environment's own install.
    assert f"imports {install}/lib/python" in run.stdout, report
    answer = run.stdout.split("\n", 1)[1].replace("node exit code 0", "").strip()
    assert answer, report
    assert "[stop]" in run.stderr or "[length]" in run.stderr, report
    assert "active: serving" in node_log and "node exit code 0" in run.stdout, report
