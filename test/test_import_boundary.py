"""The core never imports ROS: checked on the source (AST) and at run time."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "slm_ros"
ROS_FREE = [*sorted((PKG / "core").rglob("*.py")), *sorted((PKG / "backends").rglob("*.py")),
            *sorted((PKG / "build").rglob("*.py")), PKG / "models.py"]
FORBIDDEN = ("rclpy", "slm_ros.msg", "slm_ros.action", "slm_ros.ros", "slm_ros.nodes", "std_msgs",
             "sensor_msgs", "rcl_interfaces", "launch")


def imported_modules(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_core_sources_do_not_import_ros():
    assert len(ROS_FREE) >= 8
    bad = [(p.name, m) for p in ROS_FREE for m in imported_modules(p)
           if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert not bad, f"ROS imports in the ROS-free core: {bad}"


def test_core_runs_without_loading_rclpy():
    code = ("import sys, slm_ros.core.engine, slm_ros.core.session, slm_ros.models, "
            "slm_ros.backends.registry, slm_ros.backends.transformers_backend, slm_ros.build.builder, "
            "slm_ros.core.vision; "
            "print(sorted(m for m in sys.modules if m.startswith(('rclpy', 'slm_ros.msg'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                         check=True).stdout.strip()
    assert out == "[]"
