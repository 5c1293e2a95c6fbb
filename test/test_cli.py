"""The slm-ros CLI's offline commands (plan, build) as a user runs them: the installed executable in
a subprocess, real files."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from slm_ros.cli import installed_executable

CLI = installed_executable("bin/slm-ros")
CONFIGS = Path(__file__).parent / "data" / "model_configs"


def run(*args, timeout=300):
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd="/")


@pytest.mark.parametrize("quantization,code,words", [
    ("fp16", 3, "does NOT fit"),
    ("w4a16", 0, "fits"),
])
def test_plan_verdict_and_exit_code(quantization, code, words):
    proc = run("plan", "--config", str(CONFIGS / "llama-3.2-3b-instruct.json"), "--backend",
               "tensorrt_llm", "--quantization", quantization, "--profile", "orin-nano-8gb")
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert words in proc.stdout and "GiB" in proc.stdout


def test_plan_all_profiles_as_json():
    proc = run("plan", "--config", str(CONFIGS / "tinyllama-1.1b-chat.json"), "--backend",
               "tensorrt_llm", "--quantization", "w4a16", "--profile", "all", "--json")
    assert proc.returncode == 0, proc.stderr
    plans = json.loads(proc.stdout)
    assert len(plans) >= 4 and all(p["fits"] for p in plans)


def test_plan_of_the_embedded_model_on_llama_cpp_reads_the_gguf():
    """llama_cpp plans the GGUF it loads (Q4_1, from the file's header), not the converted copy."""
    proc = run("plan", "--model", "default", "--backend", "llama_cpp", "--json")
    assert proc.returncode == 0, proc.stderr
    (plan,) = json.loads(proc.stdout)
    assert (plan["quantization"], plan["kv_cache_dtype"], plan["fits"]) == ("q4_1", "float16", True)
    assert 0.09e9 < plan["weights_bytes"] < 0.1e9   # the file is 98 MB


def test_build_then_cache_hit(tiny_model_dir, tmp_path):
    cache = tmp_path / "engines"
    first = run("build", "--model", tiny_model_dir, "--cache-dir", str(cache), "--dtype",
                "float32", "--json")
    assert first.returncode == 0, first.stderr
    built = json.loads(first.stdout)
    assert not built["cache_hit"] and Path(built["path"], "manifest.json").is_file()
    assert "publish" in first.stderr   # the progress bar showed the phases
    again = run("build", "--model", tiny_model_dir, "--cache-dir", str(cache), "--dtype",
                "float32", "--json")
    assert again.returncode == 0, again.stderr
    hit = json.loads(again.stdout)
    assert hit["cache_hit"] and hit["path"] == built["path"] and hit["key"] == built["key"]


def test_build_bad_checkpoint_fails_with_reason(tmp_path):
    (tmp_path / "model").mkdir()
    proc = run("build", "--model", str(tmp_path / "model"), "--cache-dir", str(tmp_path / "c"))
    assert proc.returncode != 0
    assert "config.json" in proc.stderr or "no model" in proc.stderr.lower(), proc.stderr


def test_ask_constraint_options(tmp_path):
    import argparse

    from slm_ros.cli import response_format_args

    def args(**kw):
        base = dict(json_schema=None, json=False, ros_type=None, regex=None, grammar=None)
        return argparse.Namespace(**{**base, **kw})

    assert response_format_args(args()) is None
    assert response_format_args(args(json=True)) == {"type": "json_object"}
    assert response_format_args(args(ros_type="geometry_msgs/msg/Twist")) == {
        "type": "ros_message", "ros_type": "geometry_msgs/msg/Twist"}
    assert response_format_args(args(json_schema='{"type": "object"}')) == {
        "type": "json_schema", "schema": '{"type": "object"}'}
    schema_file = tmp_path / "cmd.json"
    schema_file.write_text('{"type": "integer"}')
    assert response_format_args(args(json_schema=str(schema_file)))["schema"] == \
        '{"type": "integer"}'
    grammar = tmp_path / "yes.gbnf"
    grammar.write_text('root ::= "yes"')
    assert response_format_args(args(grammar=str(grammar))) == {"type": "grammar",
                                                                "schema": 'root ::= "yes"'}
    with pytest.raises(ValueError, match="choose one of"):
        response_format_args(args(json=True, regex="a"))
    with pytest.raises(ValueError, match="cannot read"):
        response_format_args(args(grammar=str(tmp_path / "missing.gbnf")))


def test_ask_tool_options(tmp_path):
    import argparse

    from slm_ros.cli import tool_args
    tool = tmp_path / "nav.json"
    tool.write_text(json.dumps({"name": "navigate_to", "description": "Drive somewhere.",
                                "parameters": {"type": "object"}}))
    tools = tool_args(argparse.Namespace(tool=[str(tool), '{"name": "cmd", "ros_type": '
                                                           '"geometry_msgs/msg/Twist"}']))
    assert tools == [{"name": "navigate_to", "description": "Drive somewhere.",
                      "parameters": '{"type": "object"}', "ros_type": ""},
                     {"name": "cmd", "description": "", "parameters": "",
                      "ros_type": "geometry_msgs/msg/Twist"}]
    with pytest.raises(ValueError, match="a JSON object with a name"):
        tool_args(argparse.Namespace(tool=['{"description": "x"}']))


@pytest.mark.parametrize("command", ["ask", "look"])
def test_conflicting_constraint_options_exit_2_before_any_ros(command):
    proc = run(command, "How many boxes?", "--json", "--regex", "[0-9]", timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "choose one of" in proc.stderr
