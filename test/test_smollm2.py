"""Tier 4: the real embedded SmolLM2-135M-Instruct, end to end through the README's first command
(`slm-ros demo`: an llm_node process + a CLI action client in another process)."""

import os
import subprocess
import sys
from pathlib import Path


def test_demo_answers_capital_of_france(default_model_dir, domain_id):
    slm_ros_cli = Path(sys.prefix) / "bin" / "slm-ros"
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain_id), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
    proc = subprocess.run(
        # The README's first command (its prompt), on the default backend.
        [str(slm_ros_cli), "demo", "What is the capital of France? Answer in one sentence.",
         "--max-new-tokens", "24",
         "--wait", "300"],
        capture_output=True, text=True, env=env, timeout=420, cwd="/")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Paris" in proc.stdout, proc.stdout
    # the CLI reports the stats line with the finish reason and speed
    assert "tokens/s" in proc.stderr and "[stop]" in proc.stderr or "[length]" in proc.stderr
