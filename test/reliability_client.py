#!/usr/bin/env python3
"""A client of the LLM node in its own process, for test/test_reliability.py.

Modes (ROS_DOMAIN_ID comes from the environment):

* ``flood``: once ``--start-file`` exists, send ``--count`` requests as fast as possible, even
  indices on the ``request`` topic and odd ones as ``generate`` goals, ids ``<tag>-<i>``; wait for
  every final chunk on ``tokens`` and every action result; write a JSON report to ``--out``.
* ``hold``: send one goal and one topic request (long answers), write ``--ready-file`` once chunks of
  both stream in, then keep running until killed (the test kills it with SIGKILL mid-stream).
* ``goals``: send ``--count`` goals, write ``--ready-file`` once one streams, keep running until
  killed (a client that dies with goals in flight).

Readiness: ``--ready-file`` is written once the node's endpoints are matched (flood) or streaming
(hold).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import threading
import time
from pathlib import Path

import rclpy
from rclpy.executors import MultiThreadedExecutor

from slm_ros.action import Generate
from slm_ros.msg import GenerateRequest, TokenChunk
from slm_ros.ros import qos
from slm_ros.ros.action_client import ThreadSafeActionClient


class Client:
    """Topic and action endpoints of one client node, and every chunk of its own requests."""

    def __init__(self, namespace: str, tag: str) -> None:
        rclpy.init()
        self.tag = tag
        self.node = rclpy.create_node(f"reliability_client_{tag.replace('-', '_')}",
                                      namespace=namespace)
        self.chunks = collections.defaultdict(list)
        self.results = {}
        self.cv = threading.Condition()
        self.node.create_subscription(TokenChunk, "tokens", self._on_chunk, qos.TOKEN_STREAM)
        self.request_pub = self.node.create_publisher(GenerateRequest, "request", qos.COMMANDS)
        # The node's deep service QoS on the client side too: with rclpy's depth-10 default, a
        # burst of more than 10 goal or result responses (refused goals all end within
        # milliseconds) can drop the oldest before this client takes them.
        self.action = ThreadSafeActionClient(self.node, Generate, "generate",
                                             goal_service_qos_profile=qos.ACTION_SERVICES,
                                             result_service_qos_profile=qos.ACTION_SERVICES,
                                             cancel_service_qos_profile=qos.ACTION_SERVICES,
                                             feedback_sub_qos_profile=qos.ACTION_FEEDBACK)
        self.executor = MultiThreadedExecutor(num_threads=4)
        self.executor.add_node(self.node)
        self._spin = threading.Thread(target=self.executor.spin, daemon=True)
        self._spin.start()

    def _on_chunk(self, msg: TokenChunk) -> None:
        if msg.request_id.startswith(self.tag + "-"):
            with self.cv:
                self.chunks[msg.request_id].append(msg)
                self.cv.notify_all()

    def wait_matched(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        if not self.action.wait_for_server(timeout_sec=timeout):
            raise SystemExit("generate action server not found")
        tokens = self.node.resolve_topic_name("tokens")
        while time.monotonic() < deadline:
            if self.request_pub.get_subscription_count() and self.node.count_publishers(tokens):
                time.sleep(0.5)  # let the node's side of the matching settle too
                return
            time.sleep(0.05)
        raise SystemExit("llm node topics not matched")

    def request(self, rid: str, prompt: str, max_new_tokens: int) -> None:
        msg = GenerateRequest(request_id=rid, session_id=rid, prompt=prompt)
        msg.sampling.max_new_tokens = max_new_tokens
        self.request_pub.publish(msg)

    def goal(self, rid: str, prompt: str, max_new_tokens: int) -> None:
        goal = Generate.Goal()
        goal.request.request_id, goal.request.session_id, goal.request.prompt = rid, rid, prompt
        goal.request.sampling.max_new_tokens = max_new_tokens

        def on_result(future) -> None:
            response = future.result()
            with self.cv:
                self.results[rid] = {"status": int(response.status),
                                     "finish_reason": response.result.finish_reason,
                                     "text": response.result.text, "error": response.result.error}
                self.cv.notify_all()

        def on_goal(future) -> None:
            handle = future.result()
            if not handle.accepted:
                with self.cv:
                    self.results[rid] = {"status": -1, "finish_reason": "", "text": "",
                                         "error": "goal rejected"}
                    self.cv.notify_all()
                return
            handle.get_result_async().add_done_callback(on_result)

        self.action.send_goal_async(goal).add_done_callback(on_goal)

    def finished(self, topic_ids, goal_ids) -> bool:
        return all(any(c.is_final for c in self.chunks.get(r, ())) for r in topic_ids + goal_ids) \
            and all(r in self.results for r in goal_ids)

    def close(self) -> None:
        self.executor.shutdown()
        self._spin.join(timeout=5)
        self.node.destroy_node()
        rclpy.try_shutdown()


def _touch(path: str) -> None:
    if path:
        Path(path).write_text(str(time.time()))


def flood(args) -> int:
    client = Client(args.namespace, args.tag)
    try:
        client.wait_matched()
        _touch(args.ready_file)
        while args.start_file and not Path(args.start_file).exists():
            time.sleep(0.01)
        t0 = time.monotonic()
        topic_ids, goal_ids = [], []
        for i in range(args.count):
            rid = f"{args.tag}-{i:03d}"
            prompt = f"Say something short about the number {i}."
            if i % 2 == 0:
                client.request(rid, prompt, args.max_new_tokens)
                topic_ids.append(rid)
            else:
                client.goal(rid, prompt, args.max_new_tokens)
                goal_ids.append(rid)
        with client.cv:
            done = client.cv.wait_for(lambda: client.finished(topic_ids, goal_ids), args.timeout)
        elapsed = time.monotonic() - t0
        report = {"tag": args.tag, "complete": done, "elapsed_s": elapsed, "requests": []}
        with client.cv:
            for rid in topic_ids + goal_ids:
                chunks = client.chunks.get(rid, [])
                finals = [c for c in chunks if c.is_final]
                report["requests"].append({
                    "id": rid, "path": "topic" if rid in topic_ids else "action",
                    "seqs": [c.seq for c in chunks], "finals": len(finals),
                    "final_is_last": bool(chunks) and chunks[-1].is_final,
                    "finish_reason": finals[0].finish_reason if finals else "",
                    "error": finals[0].error if finals else "",
                    "text": "".join(c.text for c in chunks),
                    "result": client.results.get(rid),
                })
        Path(args.out).write_text(json.dumps(report, indent=1))
        return 0 if done else 1
    finally:
        client.close()


LONG_PROMPT = "Write a very long story about a robot who explores the ocean."


def _stream_until_killed(client: Client, args) -> int:
    """Touch the ready file once a chunk of this client's requests streams, then wait for the
    test's SIGKILL."""
    with client.cv:
        client.cv.wait_for(lambda: len(client.chunks) >= 1, args.timeout)
    _touch(args.ready_file)
    while True:
        time.sleep(1.0)


def hold(args) -> int:
    client = Client(args.namespace, args.tag)
    client.wait_matched()
    client.goal(f"{args.tag}-goal", LONG_PROMPT, args.max_new_tokens)
    client.request(f"{args.tag}-topic", LONG_PROMPT, args.max_new_tokens)
    return _stream_until_killed(client, args)


def goals(args) -> int:
    """Send ``--count`` goals, then wait to be killed once one streams (a client that dies with
    goals in flight)."""
    client = Client(args.namespace, args.tag)
    client.wait_matched()
    for i in range(args.count):
        client.goal(f"{args.tag}-{i}", LONG_PROMPT, args.max_new_tokens)
    return _stream_until_killed(client, args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("flood", "hold", "goals"))
    parser.add_argument("--namespace", default="/t")
    parser.add_argument("--tag", required=True, help="request id prefix, unique per client")
    parser.add_argument("--count", type=int, default=25)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--out", default="")
    parser.add_argument("--ready-file", default="")
    parser.add_argument("--start-file", default="")
    parser.add_argument("--timeout", type=float, default=150.0)
    args = parser.parse_args(argv)
    return {"flood": flood, "hold": hold, "goals": goals}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
