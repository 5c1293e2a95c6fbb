#!/usr/bin/env python3
"""Soak test: does the LLM node's memory grow while it serves requests for a long time?

Starts the installed ``llm_node`` in its own process (embedded model, backend ``auto`` by default:
llama.cpp on a CPU) and sends it requests one after another for ``--minutes``, rotating through the
ways a robot uses it: a ``request`` topic message in one of 8 chat sessions (history grows and is
trimmed), a ``generate`` goal, a topic request cancelled after its first chunk, and a goal that
resets its session. The node's resident memory (RSS) is sampled every ``--sample-s`` seconds; after
``--warmup`` requests (allocators and caches settle) a least-squares line through (requests, RSS)
gives the growth per 1000 requests. A request whose final chunk does not arrive within 60 s counts
as lost.

Run::

    .venv/bin/python bench/soak.py --minutes 3 [--backend auto] [--max-new-tokens 8] [--out FILE]

The JSON report goes to stdout and to ``--out`` (default ``bench/results/soak.json``); progress to
stderr. ROS discovery stays on this machine and a free ROS_DOMAIN_ID is reserved (see bench_llm.py).
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llm import ros_domain, stop_process  # noqa: E402
from reporting import write_report  # noqa: E402

NAMESPACE = "/slm_soak"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "soak.json"
PROMPTS = ("What is the capital of France?", "Name three things a mobile robot needs.",
           "Say hello to the kitchen team.", "What should a robot do when its battery is low?")
FINAL_TIMEOUT_S = 60.0


def log(message: str) -> None:
    print(f"[soak] {message}", file=sys.stderr, flush=True)


def slope_per_1000(points: Sequence[Tuple[int, float]]) -> float:
    """Least-squares slope of RSS (MB) over requests, times 1000; 0.0 with fewer than 2 points."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0
    return 1000.0 * sum((x - mx) * (y - my) for x, y in points) / sxx


class SoakClient:
    """Topic and action endpoints, and the final chunk of every request by id."""

    def __init__(self) -> None:
        import rclpy
        from rclpy.executors import MultiThreadedExecutor
        from std_msgs.msg import String

        from slm_ros.action import Generate
        from slm_ros.msg import GenerateRequest, TokenChunk
        from slm_ros.ros import qos
        from slm_ros.ros.action_client import ThreadSafeActionClient

        self._rclpy, self._String, self._Generate = rclpy, String, Generate
        self._GenerateRequest = GenerateRequest
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("slm_soak_client", namespace=NAMESPACE, context=self.context)
        self.finals: Dict[str, object] = {}
        self.first_chunk: Dict[str, bool] = {}
        self.cv = threading.Condition()
        self.node.create_subscription(TokenChunk, "tokens", self._on_chunk, qos.TOKEN_STREAM)
        self.request_pub = self.node.create_publisher(GenerateRequest, "request", qos.COMMANDS)
        self.cancel_pub = self.node.create_publisher(String, "cancel", qos.COMMANDS)
        self.action = ThreadSafeActionClient(self.node, Generate, "generate",
                                             feedback_sub_qos_profile=qos.ACTION_FEEDBACK)
        self.executor = MultiThreadedExecutor(num_threads=2, context=self.context)
        self.executor.add_node(self.node)
        self._spin = threading.Thread(target=self.executor.spin, daemon=True)
        self._spin.start()

    def _on_chunk(self, msg) -> None:
        with self.cv:
            self.first_chunk[msg.request_id] = True
            if msg.is_final:
                self.finals[msg.request_id] = msg
            self.cv.notify_all()

    def wait_ready(self, alive, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.action.wait_for_server(timeout_sec=1.0):
            if not alive():
                raise RuntimeError("the llm_node process exited before serving")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no action server at {NAMESPACE}/generate")
        while not (self.request_pub.get_subscription_count()
                   and self.cancel_pub.get_subscription_count()):
            time.sleep(0.05)
        time.sleep(0.5)

    def topic_request(self, rid: str, session: str, prompt: str, max_new_tokens: int,
                      reset: bool = False) -> None:
        msg = self._GenerateRequest(request_id=rid, session_id=session, prompt=prompt,
                                    reset_session=reset)
        msg.sampling.max_new_tokens = max_new_tokens
        self.request_pub.publish(msg)

    def goal(self, rid: str, session: str, prompt: str, max_new_tokens: int, reset: bool) -> None:
        goal = self._Generate.Goal()
        goal.request.request_id, goal.request.session_id = rid, session
        goal.request.prompt, goal.request.reset_session = prompt, reset
        goal.request.sampling.max_new_tokens = max_new_tokens
        self.action.send_goal_async(goal)   # the final chunk on `tokens` tells when it is done

    def cancel(self, rid: str) -> None:
        self.cancel_pub.publish(self._String(data=rid))

    def wait(self, predicate, timeout_s: float) -> bool:
        with self.cv:
            return self.cv.wait_for(predicate, timeout_s)

    def close(self) -> None:
        self.executor.shutdown()
        self._spin.join(timeout=5)
        self.node.destroy_node()
        self._rclpy.try_shutdown(context=self.context)


def soak(args) -> Dict[str, object]:
    import psutil
    from slm_ros.cli import node_executable

    cmd = [node_executable("llm_node"), "--ros-args", "-r", f"__ns:={NAMESPACE}",
           "-p", f"model:={args.model}", "-p", f"backend:={args.backend}",
           "-p", f"default_max_new_tokens:={args.max_new_tokens}", "-p", "max_history_turns:=4"]
    log(f"starting {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    client = None
    try:
        client = SoakClient()
        client.wait_ready(lambda: proc.poll() is None, args.wait)
        node = psutil.Process(proc.pid)
        outcomes: Dict[str, int] = collections.Counter()
        samples: List[Tuple[int, float, float]] = []   # (requests, seconds, rss MB)
        lost = 0
        t0 = time.monotonic()
        deadline = t0 + args.minutes * 60.0
        next_sample = t0
        i = 0
        while time.monotonic() < deadline and proc.poll() is None:
            rid = f"soak-{i}-{uuid.uuid4().hex[:6]}"
            kind = i % 4
            prompt = PROMPTS[i % len(PROMPTS)]
            session = f"s{i % 8}"
            if kind == 0:
                client.topic_request(rid, session, prompt, args.max_new_tokens)
            elif kind == 1:
                client.goal(rid, session, prompt, args.max_new_tokens, reset=False)
            elif kind == 2:
                client.topic_request(rid, session, prompt, 4 * args.max_new_tokens)
                client.wait(lambda: rid in client.first_chunk, FINAL_TIMEOUT_S)
                client.cancel(rid)
            else:
                client.goal(rid, session, prompt, args.max_new_tokens, reset=True)
            if client.wait(lambda: rid in client.finals, FINAL_TIMEOUT_S):
                with client.cv:
                    outcomes[client.finals.pop(rid).finish_reason] += 1
                    client.first_chunk.pop(rid, None)
            else:
                lost += 1
                log(f"request {rid} got no final chunk within {FINAL_TIMEOUT_S:.0f} s")
            i += 1
            now = time.monotonic()
            if now >= next_sample:
                rss = node.memory_info().rss / 2**20
                samples.append((i, now - t0, rss))
                next_sample = now + args.sample_s
                if len(samples) % 12 == 1:
                    log(f"{i} requests, {now - t0:.0f} s, node RSS {rss:.1f} MB")
        elapsed = time.monotonic() - t0
        alive = proc.poll() is None
        rss_end = node.memory_info().rss / 2**20 if alive else 0.0
        samples.append((i, elapsed, rss_end))
    finally:
        if client is not None:
            client.close()
        stop_process(proc)
    steady = [(n, rss) for n, _, rss in samples if n >= args.warmup]
    start_rss = steady[0][1] if steady else 0.0
    step = max(1, len(samples) // 200)
    return {
        "benchmark": "soak",
        "backend": args.backend, "model": args.model, "max_new_tokens": args.max_new_tokens,
        "minutes": round(elapsed / 60.0, 2), "requests": i,
        "requests_per_second": round(i / elapsed, 2) if elapsed else 0.0,
        "outcomes": dict(outcomes), "lost": lost,
        "node_alive_at_end": alive, "node_exit_code": proc.returncode,
        "warmup_requests": args.warmup,
        "rss_mb": {"first_sample": round(samples[0][2], 1), "after_warmup": round(start_rss, 1),
                   "end": round(rss_end, 1), "max": round(max(s[2] for s in samples), 1)},
        "rss_growth_mb_per_1000_requests": round(slope_per_1000(steady), 2),
        "rss_growth_mb_after_warmup": round(rss_end - start_rss, 1),
        "samples": [[n, round(t, 1), round(rss, 1)] for n, t, rss in samples[::step]],
    }


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="how long to send requests")
    parser.add_argument("--backend", default="auto", help="llm_node backend parameter")
    parser.add_argument("--model", default="default", help="llm_node model parameter")
    parser.add_argument("--max-new-tokens", type=int, default=8,
                        help="tokens per answer (short answers: more requests per minute)")
    parser.add_argument("--warmup", type=int, default=100,
                        help="requests before the growth line starts")
    parser.add_argument("--sample-s", type=float, default=2.0, help="seconds between RSS samples")
    parser.add_argument("--wait", type=float, default=300.0, help="seconds to wait for the node")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    with ros_domain():
        report = soak(args)
    write_report(report, args.out)
    log(f"{report['requests']} requests, {report['lost']} lost, RSS growth "
        f"{report['rss_growth_mb_per_1000_requests']} MB per 1000 requests -> {args.out}")
    return 0 if report["lost"] == 0 and report["node_alive_at_end"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
