"""``slm-ros``: run the LLM node and talk to it from a terminal.

    slm-ros demo ["prompt"]      start an LLM node (embedded model), ask it one question, stop it
    slm-ros up [--model M]       run an LLM node in the foreground (namespace /slm)
    slm-ros ask "prompt"         stream an answer from a running node, then TTFT and tokens/s

``ask`` is a real ROS client of the ``generate`` action. Unless the environment says otherwise, the CLI
keeps DDS discovery on this machine (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST); export
ROS_AUTOMATIC_DISCOVERY_RANGE=SUBNET to reach nodes on other machines.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

DEFAULT_NAMESPACE = "/slm"
DEMO_PROMPT = "What is the capital of France? Answer in one sentence."


def _keep_discovery_local() -> None:
    if "ROS_AUTOMATIC_DISCOVERY_RANGE" not in os.environ and "ROS_LOCALHOST_ONLY" not in os.environ:
        os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"


def node_executable(name: str) -> str:
    """Path of an installed node launcher (lib/slm_ros/<name>)."""
    candidates = []
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_prefix
        try:
            candidates.append(Path(get_package_prefix("slm_ros")) / "lib" / "slm_ros" / name)
        except (PackageNotFoundError, OSError):  # OSError: AMENT_PREFIX_PATH unset (pip install)
            pass
    except ImportError:
        pass
    candidates.append(Path(sys.prefix) / "lib" / "slm_ros" / name)
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise SystemExit(f"slm-ros: cannot find the installed {name} executable (looked in "
                     f"{', '.join(str(c) for c in candidates)}); run scripts/setup.sh or colcon build")


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
    parser.add_argument("--backend", default="transformers")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--params-file", help="ROS parameters YAML for the node")


def _ros_args(args, namespace: str) -> List[str]:
    ros = ["--ros-args", "-r", f"__ns:={namespace}", "-p", f"model:={args.model}",
           "-p", f"backend:={args.backend}", "-p", f"device:={args.device}"]
    if args.params_file:
        ros += ["--params-file", args.params_file]
    return ros


def ask(prompt: str, namespace: str = DEFAULT_NAMESPACE, session: str = "", system: str = "",
        reset: bool = False, sampling: Optional[dict] = None, wait_s: float = 30.0,
        out=sys.stdout) -> int:
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
        t0 = time.monotonic()
        first = []
        printed = []
        final_seen = []

        def on_feedback(feedback) -> None:
            chunk = feedback.feedback.chunk
            if not first and chunk.text:
                first.append(time.monotonic())
            printed.append(chunk.text)
            if chunk.is_final:
                final_seen.append(True)
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
        # The result is a service reply and may overtake the last feedback messages; wait briefly
        # for the final chunk, then print whatever of the answer the feedback did not carry.
        deadline = time.monotonic() + 2.0
        while not final_seen and time.monotonic() < deadline:
            rclpy.spin_once(node, timeout_sec=0.05)
        shown = "".join(printed)
        if result.text.startswith(shown):
            out.write(result.text[len(shown):])
        out.write("\n")
        s = result.stats
        client_ttft = (first[0] - t0) * 1e3 if first else 0.0
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
    """Run the LLM node in this process until Ctrl-C."""
    _keep_discovery_local()
    from slm_ros.nodes.llm_node import main as llm_main
    return llm_main(args=[sys.argv[0]] + _ros_args(args, args.namespace))


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
    _sampling_args(p)

    p = sub.add_parser("up", help="run an LLM node in the foreground")
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    _node_args(p)

    p = sub.add_parser("demo", help="start a node, ask one question, stop")
    p.add_argument("prompt", nargs="?", default=DEMO_PROMPT)
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    p.add_argument("--wait", type=float, default=600.0, help="seconds to wait for the node to load")
    _node_args(p)
    _sampling_args(p)

    args = parser.parse_args(argv)
    if args.command == "ask":
        return ask(args.prompt, args.namespace, args.session, args.system, args.reset,
                   _sampling(args), args.wait)
    if args.command == "up":
        return up(args)
    return demo(args)


if __name__ == "__main__":
    raise SystemExit(main())
