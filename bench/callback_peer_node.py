#!/usr/bin/env python3
"""The design a robot builder would write without slm_ros, as a peer for bench/bench_peer.py.

A plain rclpy node: a ``std_msgs/String`` subscription on ``prompt`` whose callback runs the whole
generation (the same backend, the same model file, the same threads and greedy sampling as the LLM
node in the benchmark, the prompt built the node's way) and publishes the answer once on
``response``. No streaming, no queue, no cancel: the first text a client sees is the whole answer.

    callback_peer_node.py --backend llama_cpp --max-new-tokens 128 [--threads 0]
        --ros-args -r __ns:=/slm_peer

Started by bench/bench_peer.py; not part of the package.
"""

from __future__ import annotations

import argparse
import sys

import rclpy
from rclpy.executors import ExternalShutdownException
from std_msgs.msg import String

from slm_ros.backends.base import BackendConfig
from slm_ros.backends.registry import create_backend
from slm_ros.core.session import build_messages
from slm_ros.core.types import SamplingParams
from slm_ros.models import resolve_model
from slm_ros.ros import qos


def main(argv=None) -> int:
    argv = sys.argv if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="llama_cpp")
    parser.add_argument("--model", default="default")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--repetition-penalty", type=float, default=1.1)
    args = parser.parse_args(rclpy.utilities.remove_ros_args(argv)[1:])

    resolved = resolve_model(args.model, prefer_gguf=args.backend == "llama_cpp")
    backend = create_backend(args.backend)
    backend.load(BackendConfig(model=resolved.path, threads=args.threads))
    backend.warmup()
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0,
                            repetition_penalty=args.repetition_penalty)
    eos = backend.eos_token_ids

    rclpy.init(args=argv)
    node = rclpy.create_node("callback_peer")
    publisher = node.create_publisher(String, "response", qos.COMMANDS)

    def on_prompt(msg: String) -> None:
        import threading
        ids = backend.apply_chat_template(build_messages("", [], msg.data))
        tokens = [t for t in backend.generate(ids, params, threading.Event()) if t not in eos]
        publisher.publish(String(data=backend.decode(tokens)))

    node.create_subscription(String, "prompt", on_prompt, qos.COMMANDS)
    node.get_logger().info(f"callback peer ready: {resolved.name} on {args.backend}")
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
        backend.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
