"""Tier 4: the real embedded SmolLM2-135M-Instruct, end to end through the README's first command
(`slm-ros demo`: an llm_node process + a CLI action client in another process)."""

import os
import subprocess

from slm_ros.cli import installed_executable


def test_demo_answers_capital_of_france(default_model_dir, domain_id):
    from engine_helpers import reference_text
    from slm_ros.cli import DEMO_PROMPT
    from slm_ros.core.engine import EngineConfig
    from slm_ros.core.types import SamplingParams
    from slm_ros.models import embedded_gguf

    slm_ros_cli = installed_executable("bin/slm-ros")
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain_id), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
    proc = subprocess.run(
        # The README's first command (its prompt), on the default backend.
        [str(slm_ros_cli), "demo", "What is the capital of France? Answer in one sentence.",
         "--max-new-tokens", "24",
         "--wait", "300"],
        capture_output=True, text=True, env=env, timeout=420, cwd="/")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The answer is the core engine's on this machine (greedy text depends on the CPU llama.cpp was
    # compiled for; test_llama_cpp_backend checks that the model knows facts like this one).
    expected = reference_text(str(embedded_gguf()), DEMO_PROMPT,
                              EngineConfig(defaults=SamplingParams(max_new_tokens=24)))
    assert expected.strip() and expected.strip() in proc.stdout, (proc.stdout, expected)
    # the CLI reports the stats line with the finish reason and speed
    assert "tokens/s" in proc.stderr and "[stop]" in proc.stderr or "[length]" in proc.stderr
