"""``slm-ros``: run the LLM node and talk to it from a terminal.

    slm-ros demo ["prompt"]      start an LLM node (embedded model), ask it one question, stop it
    slm-ros up [--profile P] [--model M] [--builder] [--vision --vision-model V]
                                 run the node graph of slm.launch.py in the foreground (/slm)
    slm-ros ask "prompt"         stream an answer from a running node, then TTFT and tokens/s
    slm-ros look "question" [--image F]
                                 ask the running vision node about its camera (or an image file)
    slm-ros build --model M ...  build (or find in the cache) the artifact a backend runs fastest
    slm-ros plan --model M ...   print the memory plan of a model on one or all device profiles

``ask`` is a real ROS client of the ``generate`` action. Unless the environment says otherwise, the CLI
keeps DDS discovery on this machine (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST); export
ROS_AUTOMATIC_DISCOVERY_RANGE=SUBNET to reach nodes on other machines.
"""

from __future__ import annotations

import argparse
import array
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

DEFAULT_NAMESPACE = "/slm"
DEMO_PROMPT = "What is the capital of France? Answer in one sentence."


def _keep_discovery_local() -> None:
    if "ROS_AUTOMATIC_DISCOVERY_RANGE" not in os.environ and "ROS_LOCALHOST_ONLY" not in os.environ:
        os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"


def installed_executable(relative: str) -> str:
    """Path of an installed file of this package, ``relative`` to its install prefix (e.g.
    ``lib/slm_ros/llm_node``, ``bin/slm-ros``): the prefix the ament index names (a sourced colcon
    overlay or a robot's ROS install), else this Python's environment (a pip install)."""
    candidates = []
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_prefix
        try:
            candidates.append(Path(get_package_prefix("slm_ros")) / relative)
        except (PackageNotFoundError, OSError):  # OSError: AMENT_PREFIX_PATH unset (pip install)
            pass
    except ImportError:
        pass
    candidates.append(Path(sys.prefix) / relative)
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise SystemExit(f"slm-ros: cannot find the installed {Path(relative).name} executable (looked "
                     f"in {', '.join(str(c) for c in candidates)}); run scripts/setup.sh or colcon "
                     f"build")


def node_executable(name: str) -> str:
    """Path of an installed node launcher (lib/slm_ros/<name>)."""
    return installed_executable(f"lib/slm_ros/{name}")


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling (0 / unset = node default)")
    g.add_argument("--max-new-tokens", type=int, default=0)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--repetition-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _node_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="'default' (embedded SmolLM2-135M-Instruct), a checkpoint dir or a .gguf")
    parser.add_argument("--backend", default="auto",
                        help="auto (llama_cpp for GGUF models such as the embedded one on CPU, "
                             "else transformers), transformers, llama_cpp or tensorrt_llm")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--params-file", help="ROS parameters YAML for the node")


def _ros_args(args, namespace: str) -> List[str]:
    ros = ["--ros-args", "-r", f"__ns:={namespace}", "-p", f"model:={args.model}",
           "-p", f"backend:={args.backend}", "-p", f"device:={args.device}"]
    if args.params_file:
        ros += ["--params-file", args.params_file]
    return ros


def _stream_goal(node, client, goal, result_text, out):
    """Send ``goal``, print its feedback chunks as they arrive, wait for the result (Ctrl-C cancels
    the goal). Returns (result, monotonic time of the first text chunk or 0.0).

    The result (a service reply) may overtake the last feedback messages, and rclpy drops feedback
    that arrives after the result: whatever the feedback did not carry is printed from
    ``result_text(result)``.
    """
    import rclpy
    first = []
    printed = []

    def on_feedback(feedback) -> None:
        chunk = feedback.feedback.chunk
        if not first and chunk.text:
            first.append(time.monotonic())
        printed.append(chunk.text)
        out.write(chunk.text)
        out.flush()

    send = client.send_goal_async(goal, feedback_callback=on_feedback)
    rclpy.spin_until_future_complete(node, send)
    handle = send.result()
    result_future = handle.get_result_async()
    try:
        rclpy.spin_until_future_complete(node, result_future)
    except KeyboardInterrupt:
        handle.cancel_goal_async()
        rclpy.spin_until_future_complete(node, result_future, timeout_sec=5.0)
    result = result_future.result().result
    shown, text = "".join(printed), result_text(result)
    if text.startswith(shown):
        out.write(text[len(shown):])
    out.write("\n")
    return result, (first[0] if first else 0.0)


def response_format_args(args) -> Optional[Dict[str, str]]:
    """The ResponseFormat fields ``slm-ros ask``'s constraint options ask for (None: free text);
    ValueError for two options at once or an unreadable file."""
    chosen = [name for name in ("json_schema", "json", "ros_type", "regex", "grammar")
              if getattr(args, name, None)]
    if len(chosen) > 1:
        raise ValueError(f"choose one of --json-schema, --json, --ros-type, --regex, --grammar "
                         f"(got {', '.join('--' + c.replace('_', '-') for c in chosen)})")
    if not chosen:
        return None
    kind = chosen[0]
    if kind == "json":
        return {"type": "json_object"}
    if kind == "ros_type":
        return {"type": "ros_message", "ros_type": args.ros_type}
    if kind == "regex":
        return {"type": "regex", "schema": args.regex}
    option = f"--{kind.replace('_', '-')}"
    return {"type": kind, "schema": _file_or_text(getattr(args, kind), option,
                                                  inline_json=kind == "json_schema")}


def _file_or_text(source: str, option: str, inline_json: bool = True) -> str:
    """``source`` itself when it is inline JSON (starts with ``{``; only if ``inline_json``), else
    the text of the file it names; ValueError naming ``option`` when that cannot be read."""
    if inline_json and source.lstrip().startswith("{"):
        return source
    try:
        return Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{option}: cannot read {source!r}: {exc.strerror}") from None


def tool_args(args) -> List[Dict[str, str]]:
    """The Tool fields of ``slm-ros ask --tool`` (each a file or the JSON text); ValueError names
    a tool that cannot be read."""
    tools = []
    for source in getattr(args, "tool", None) or []:
        text = _file_or_text(source, "--tool")
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"--tool {source!r}: not JSON: {exc}") from None
        if not isinstance(value, dict) or not value.get("name"):
            raise ValueError(f"--tool {source!r}: a JSON object with a name is needed")
        parameters = value.get("parameters", "")
        tools.append({"name": str(value["name"]), "description": str(value.get("description", "")),
                      "parameters": parameters if isinstance(parameters, str)
                      else json.dumps(parameters),
                      "ros_type": str(value.get("ros_type", ""))})
    return tools


def ask(prompt: str, namespace: str = DEFAULT_NAMESPACE, session: str = "", system: str = "",
        reset: bool = False, sampling: Optional[dict] = None, wait_s: float = 30.0,
        out=sys.stdout, response_format: Optional[Dict[str, str]] = None,
        tools: Optional[List[Dict[str, str]]] = None, tool_choice: str = "") -> int:
    """Send one goal to ``<namespace>/generate``, print chunks as they arrive. Returns an exit code."""
    _keep_discovery_local()
    import rclpy
    from rclpy.action import ActionClient

    from slm_ros.action import Generate
    from slm_ros.ros import qos

    rclpy.init()
    node = rclpy.create_node("slm_ros_cli", namespace=namespace)
    try:
        client = ActionClient(node, Generate, "generate",
                              feedback_sub_qos_profile=qos.ACTION_FEEDBACK)
        if not client.wait_for_server(timeout_sec=wait_s):
            print(f"slm-ros: no LLM node answers at {namespace.rstrip('/')}/generate after "
                  f"{wait_s:.0f} s; start one with `slm-ros up`", file=sys.stderr)
            return 2
        goal = Generate.Goal()
        goal.request.prompt = prompt
        goal.request.session_id = session
        goal.request.system_prompt = system
        goal.request.reset_session = reset
        for key, value in (sampling or {}).items():
            setattr(goal.request.sampling, key, value)
        for key, value in (response_format or {}).items():
            setattr(goal.request.response_format, key, value)
        if tools:
            from slm_ros.msg import Tool
            goal.request.tools = [Tool(**tool) for tool in tools]
        goal.request.tool_choice = tool_choice
        t0 = time.monotonic()
        result, first = _stream_goal(node, client, goal, lambda r: r.text, out)
        for tool_call in result.tool_calls:
            print(f"tool call {tool_call.id}: {tool_call.name} {tool_call.arguments}", file=out)
        s = result.stats
        client_ttft = (first - t0) * 1e3 if first else 0.0
        print(f"[{result.finish_reason}] {s.completion_tokens} tokens, TTFT {client_ttft:.0f} ms "
              f"(node {s.time_to_first_token_ms:.0f} ms), {s.tokens_per_second:.1f} tokens/s, "
              f"prompt {s.prompt_tokens} tokens", file=sys.stderr)
        if result.finish_reason == "error":
            print(f"slm-ros: error: {result.error}", file=sys.stderr)
            return 1
        return 0
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


def up(args) -> int:
    """Run the node graph of launch/slm.launch.py in this process until Ctrl-C (the LLM node; with
    --builder the engine builder first, with --vision the vision node), from the same YAML files."""
    _keep_discovery_local()
    from slm_ros.core.errors import SlmError
    from slm_ros.ros.graph import describe, plan_graph, run_graph
    try:
        plans = plan_graph(namespace=args.namespace, profile=args.profile, model=args.model,
                           backend=args.backend, device=args.device, params_file=args.params_file,
                           builder=args.builder, vision=args.vision,
                           vision_model=args.vision_model, camera_topic=args.camera_topic)
    except SlmError as exc:
        print(f"slm-ros up: {exc}", file=sys.stderr)
        return 2
    print(f"[slm-ros] starting:\n{describe(plans)}", file=sys.stderr)
    if args.check:
        return 0
    return run_graph(plans)


def demo(args) -> int:
    """Start an LLM node as a separate process, ask it one question, stop it."""
    _keep_discovery_local()
    cmd = [node_executable("llm_node")] + _ros_args(args, args.namespace)
    print(f"[slm-ros] starting the LLM node: {' '.join(cmd)}", file=sys.stderr)
    node = subprocess.Popen(cmd)
    try:
        # The first start converts the embedded model once (about a minute), hence the long wait.
        code = ask(args.prompt, namespace=args.namespace, wait_s=args.wait, sampling=_sampling(args))
    finally:
        node.send_signal(signal.SIGINT)
        try:
            node.wait(timeout=15)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
    return code


def look(question: str, namespace: str = DEFAULT_NAMESPACE, image_path: str = "",
         session: str = "", sampling: Optional[dict] = None, wait_s: float = 30.0,
         out=sys.stdout, response_format: Optional[Dict[str, str]] = None) -> int:
    """Ask the vision node's ``ask`` action; stream the answer; say which frame was looked at."""
    _keep_discovery_local()
    image = None
    if image_path:
        import cv2
        bgr = cv2.imread(image_path, cv2.IMREAD_COLOR)
        if bgr is None:
            print(f"slm-ros: cannot read image {image_path!r} (missing, or not an image OpenCV "
                  f"can decode)", file=sys.stderr)
            return 2
        image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    import rclpy
    from rclpy.action import ActionClient

    from slm_ros.action import AskImage
    from slm_ros.ros import qos

    rclpy.init()
    node = rclpy.create_node("slm_ros_look", namespace=namespace)
    try:
        client = ActionClient(node, AskImage, "ask", feedback_sub_qos_profile=qos.ACTION_FEEDBACK)
        if not client.wait_for_server(timeout_sec=wait_s):
            print(f"slm-ros: no vision node answers at {namespace.rstrip('/')}/ask after "
                  f"{wait_s:.0f} s; start one with `slm-ros up --vision`", file=sys.stderr)
            return 2
        goal = AskImage.Goal(question=question, session_id=session)
        for key, value in (sampling or {}).items():
            setattr(goal.sampling, key, value)
        for key, value in (response_format or {}).items():
            setattr(goal.response_format, key, value)
        if image is not None:
            goal.image.height, goal.image.width = image.shape[:2]
            goal.image.encoding, goal.image.step = "rgb8", image.shape[1] * 3
            # array('B') is rclpy's fast path for uint8[] (bytes is checked element-wise).
            goal.image.data = array.array("B", image.tobytes())
            goal.image.header.frame_id = image_path
        result, _ = _stream_goal(node, client, goal, lambda r: r.answer.text, out)
        answer = result.answer
        stamp = answer.header.stamp.sec + answer.header.stamp.nanosec * 1e-9
        print(f"[{answer.finish_reason}] frame {answer.header.frame_id or '-'} @ {stamp:.3f} "
              f"(age {answer.frame_age_ms:.0f} ms), {answer.stats.completion_tokens} tokens, TTFT "
              f"{answer.stats.time_to_first_token_ms:.0f} ms", file=sys.stderr)
        if answer.finish_reason == "error":
            print(f"slm-ros: error: {answer.error}", file=sys.stderr)
            return 1
        return 0
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


def _spec_from_args(args):
    from slm_ros.build.spec import BuildSpec
    from slm_ros.models import resolve_model
    resolved = resolve_model(args.model, progress=lambda m: print(f"[slm-ros] {m}",
                                                                 file=sys.stderr),
                             prefer_gguf=args.backend == "llama_cpp")
    return BuildSpec(model=resolved.path, backend=args.backend, quantization=args.quantization,
                     dtype=args.dtype, device=args.device, max_input_len=args.max_input_len,
                     max_seq_len=args.max_seq_len, max_batch_size=args.max_batch_size,
                     calib_dataset=args.calib_dataset)


class _ProgressBar:
    """A one-line progress bar on stderr: phase, bar, percent."""

    def __init__(self, stream=sys.stderr, width: int = 30) -> None:
        self._stream, self._width, self._phase = stream, width, ""

    def __call__(self, phase: str, fraction: float) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        filled = int(round(fraction * self._width))
        if phase != self._phase and self._phase:
            self._stream.write("\n")
        self._phase = phase
        self._stream.write(f"\r{phase:<10} [{'#' * filled}{'.' * (self._width - filled)}] "
                           f"{fraction:6.1%}")
        self._stream.flush()

    def close(self) -> None:
        if self._phase:
            self._stream.write("\n")


def build(args) -> int:
    """Build (or reuse from the cache) an artifact in this process, with a progress bar."""
    import json

    from slm_ros.build.builder import Builder
    from slm_ros.build.device import preset
    from slm_ros.core.errors import SlmError

    bar = _ProgressBar()
    try:
        spec = _spec_from_args(args)
        builder = Builder(cache_root=args.cache_dir or None,
                          max_cache_bytes=int(args.max_cache_gb * (1 << 30)),
                          device_profile=preset(args.profile) if args.profile else None,
                          check_memory=not args.no_memory_check)
        t0 = time.monotonic()
        result = builder.build(spec, progress=bar, force=args.force)
    except SlmError as exc:
        bar.close()
        print(f"slm-ros build: FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bar.close()
        print("slm-ros build: interrupted; nothing was published", file=sys.stderr)
        return 130
    bar.close()
    took = time.monotonic() - t0
    print(f"[slm-ros] {'cache hit' if result.cache_hit else 'built'} in {took:.1f} s "
          f"({result.reason}); key {result.key}", file=sys.stderr)
    if args.json:
        print(json.dumps({"key": result.key, "path": str(result.path), "cache_hit":
                          result.cache_hit, "seconds": took, "manifest": result.manifest},
                         indent=2, sort_keys=True))
    else:
        print(result.path)
    return 0


def plan(args) -> int:
    """Print the memory plan of a model for one device profile or all of them."""
    import json

    from slm_ros.build.builder import inspect_checkpoint
    from slm_ros.build.device import PRESETS, detect_profile, preset
    from slm_ros.build.planner import plan_memory
    from slm_ros.core.errors import SlmError

    try:
        if args.config:
            config = json.loads(Path(args.config).read_text())
            path = Path(args.config)
            name = path.parent.name if path.stem == "config" else path.stem
        else:
            from slm_ros.models import resolve_model
            # llama_cpp plans the GGUF itself (its weight type), as the builder and node load it.
            checkpoint = inspect_checkpoint(
                resolve_model(args.model, prefer_gguf=args.backend == "llama_cpp").path)
            config, name = checkpoint.config, Path(checkpoint.path).name
        if args.profile == "all":
            profiles = list(PRESETS.values())
        elif args.profile:
            profiles = [preset(args.profile)]
        else:
            profiles = [detect_profile("cuda" if args.backend == "tensorrt_llm" else "cpu")]
        plans = [plan_memory(config, profile, backend=args.backend,
                             quantization=args.quantization, dtype=args.dtype,
                             max_input_len=args.max_input_len, max_seq_len=args.max_seq_len,
                             max_batch_size=args.max_batch_size, name=name)
                 for profile in profiles]
    except (SlmError, OSError, ValueError) as exc:
        print(f"slm-ros plan: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([p.as_dict() for p in plans], indent=2, sort_keys=True, default=str))
    else:
        for p in plans:
            print(p.summary())
            print()
    return 0 if all(p.fits for p in plans) else 3


def _build_args(parser: argparse.ArgumentParser, for_plan: bool = False) -> None:
    parser.add_argument("--model", default="default",
                        help="'default' (embedded SmolLM2-135M-Instruct), a checkpoint dir or a .gguf")
    parser.add_argument("--backend", default="transformers",
                        help="transformers, llama_cpp, tensorrt_llm, onnxruntime_genai or openvino")
    parser.add_argument("--quantization", default="none",
                        help="transformers: none | int8_dynamic; llama_cpp: none | q8_0 | q4_k_m | "
                             "f16 | ...; tensorrt_llm: w4a16_awq | w4a16 | w8a16 | w8a8_sq | fp16 | "
                             "bf16; onnxruntime_genai: int4 | int8 | fp16 | bf16 | fp32 | none; "
                             "openvino: int4 | int8 | fp16 | none")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-input-len", type=int, default=2048)
    parser.add_argument("--max-seq-len", type=int, default=4096)
    parser.add_argument("--max-batch-size", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    if for_plan:
        parser.add_argument("--config", help="plan from a config.json instead of a checkpoint")
        parser.add_argument("--profile", default="",
                            help="device profile (e.g. orin-nano-8gb), 'all', or empty = this "
                                 "machine")
        return
    parser.add_argument("--device", default="auto")
    parser.add_argument("--calib-dataset", default="",
                        help="local calibration data for w4a16_awq / w8a8_sq (never downloaded)")
    parser.add_argument("--cache-dir", default="", help="artifact cache root")
    parser.add_argument("--max-cache-gb", type=float, default=0.0)
    parser.add_argument("--profile", default="", help="memory profile to check against "
                                                      "(e.g. orin-nano-8gb); empty = this machine")
    parser.add_argument("--no-memory-check", action="store_true",
                        help="build even when the planner says it does not fit")
    parser.add_argument("--force", action="store_true", help="rebuild even on a cache hit")


def _sampling(args) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "top_p": args.top_p, "top_k": args.top_k,
            "repetition_penalty": args.repetition_penalty, "seed": args.seed, "stop": args.stop}


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``slm-ros`` command."""
    parser = argparse.ArgumentParser(prog="slm-ros", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ask", help="stream an answer from a running LLM node")
    p.add_argument("prompt")
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    p.add_argument("--session", default="", help="chat session id (history is kept per session)")
    p.add_argument("--system", default="", help="system prompt for this request")
    p.add_argument("--reset", action="store_true", help="forget the session's history first")
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the node")
    g = p.add_argument_group("constrained output (at most one; the answer is then exactly that)")
    g.add_argument("--json-schema", metavar="FILE|JSON",
                   help="JSON Schema the answer must validate against (a file or the JSON text)")
    g.add_argument("--json", action="store_true", help="any JSON object")
    g.add_argument("--ros-type", metavar="TYPE",
                   help="answer as the JSON of this ROS type, e.g. geometry_msgs/msg/Twist")
    g.add_argument("--regex", metavar="PATTERN", help="the whole answer matches this regex")
    g.add_argument("--grammar", metavar="FILE", help="GBNF grammar file (start symbol root)")
    g.add_argument("--tool", action="append", default=[], metavar="FILE|JSON",
                   help='a tool the model may call (repeatable): {"name", "description", '
                        '"parameters": JSON Schema} or {"name", "description", "ros_type"}')
    g.add_argument("--tool-choice", default="", help="auto (default), none, required or a name")
    _sampling_args(p)

    p = sub.add_parser("up", help="run the node graph (LLM; builder, vision) in the foreground")
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    p.add_argument("--profile", default="",
                   help="board profile: cpu, x86-cuda, x86-intel, orin-nano-8gb, orin-nx-16gb, "
                        "agx-orin-64gb, remote (generation on an OpenAI-compatible server) "
                        "(config/profiles/) or "
                        "a YAML file; empty = the nodes' defaults")
    p.add_argument("--model", default="",
                   help="a model card of config/models/ (e.g. tinyllama-1.1b-chat), 'default' "
                        "(embedded SmolLM2-135M-Instruct), a checkpoint dir or a .gguf (--profile "
                        "remote: the served model's name); empty = the profile's default model, "
                        "else 'default'")
    p.add_argument("--backend", default="",
                   help="backend override (auto, transformers, llama_cpp, tensorrt_llm, "
                        "onnxruntime_genai, openvino, openai)")
    p.add_argument("--device", default="", help="device override (cpu, cuda, cuda:N)")
    p.add_argument("--params-file", default="",
                   help="ROS parameters YAML applied last (sections /**/llm, /**/vision, "
                        "/**/engine_builder, or /** for all)")
    p.add_argument("--builder", action="store_true",
                   help="also run the engine builder; the LLM node loads the artifact it builds "
                        "(refused with a remote profile: nothing to build)")
    p.add_argument("--vision", action="store_true", help="also run the vision node")
    p.add_argument("--vision-model", default="",
                   help="vision-language model card (e.g. smolvlm-256m-instruct) or checkpoint "
                        "dir; needed with --vision unless the profile names one")
    p.add_argument("--camera-topic", default="",
                   help="camera image topic for the vision node (its image input is remapped)")
    p.add_argument("--check", action="store_true",
                   help="check the configuration and print what would start, then exit")

    p = sub.add_parser("demo", help="start a node, ask one question, stop")
    p.add_argument("prompt", nargs="?", default=DEMO_PROMPT)
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    p.add_argument("--wait", type=float, default=600.0, help="seconds to wait for the node to load")
    _node_args(p)
    _sampling_args(p)

    p = sub.add_parser("look", help="ask the running vision node about its camera or an image")
    p.add_argument("question")
    p.add_argument("--image", default="", help="image file to ask about instead of the camera")
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    p.add_argument("--session", default="")
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the node")
    g = p.add_argument_group("constrained output (at most one; the answer is then exactly that)")
    g.add_argument("--json-schema", metavar="FILE|JSON",
                   help='JSON Schema the answer must validate against, e.g. {"type": "object", '
                        '"properties": {"count": {"type": "integer"}}}')
    g.add_argument("--json", action="store_true", help="any JSON object")
    g.add_argument("--ros-type", metavar="TYPE", help="answer as the JSON of this ROS type")
    g.add_argument("--regex", metavar="PATTERN", help="the whole answer matches this regex")
    g.add_argument("--grammar", metavar="FILE", help="GBNF grammar file (start symbol root)")
    _sampling_args(p)

    p = sub.add_parser("build", help="build or reuse a cached artifact for a backend")
    _build_args(p)

    p = sub.add_parser("plan", help="memory plan of a model on device profiles")
    _build_args(p, for_plan=True)

    args = parser.parse_args(argv)
    if args.command == "look":
        try:
            fmt = response_format_args(args)
        except ValueError as exc:
            print(f"slm-ros look: {exc}", file=sys.stderr)
            return 2
        return look(args.question, args.namespace, args.image, args.session, _sampling(args),
                    args.wait, response_format=fmt)
    if args.command == "build":
        return build(args)
    if args.command == "plan":
        return plan(args)
    if args.command == "ask":
        try:
            fmt, tools = response_format_args(args), tool_args(args)
        except ValueError as exc:
            print(f"slm-ros ask: {exc}", file=sys.stderr)
            return 2
        return ask(args.prompt, args.namespace, args.session, args.system, args.reset,
                   _sampling(args), args.wait, response_format=fmt, tools=tools,
                   tool_choice=args.tool_choice)
    if args.command == "up":
        return up(args)
    return demo(args)


if __name__ == "__main__":
    raise SystemExit(main())
