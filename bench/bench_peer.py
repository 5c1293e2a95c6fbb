#!/usr/bin/env python3
"""Benchmark: the LLM node against the callback design a robot builder would otherwise write.

The peer (``bench/callback_peer_node.py``) is a plain rclpy node that generates the whole answer in
its ``prompt`` subscription callback and publishes it once on ``response``, on the same backend, the
same model file, the same threads and the same greedy sampling. The LLM node runs with its default
configuration (what ``bench_llm.py`` sets: the model, backend, ``max_new_tokens``, repetition
penalty, no history; ``--node-param`` adds more). A client in this process sends each prompt to both,
alternating (order flipped every repetition), one generation at a time, and measures per run:

* ``answer_ms``: from sending the request to holding the whole answer (the node: the goal's result;
  the peer: the ``response`` message);
* ``ttft_ms``: to the first visible text (the node: the first chunk with text; the peer: the whole
  answer, which is its first text).

The prompts' answers run past 128 tokens, so both sides generate exactly ``--max-new-tokens``
(``completion_tokens`` in the report). The summary takes the median over prompts of the per-prompt median ratios node ÷ peer. Goals
(issue 14): full answer <= 1.02x the peer's; the first text comes much sooner. Both answers must be
the same text (same greedy tokens): the report says whether they were.

    .venv/bin/python bench/bench_peer.py [--backend llama_cpp] [--max-new-tokens 128]
        [--repeats 3] [--out FILE] [--node-param stream_interval_ms:=0]

JSON on stdout and in ``--out`` (default ``bench/results/bench_peer_<backend>.json``).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import bench_llm
from bench_llm import RunResult, log, machine_info, measure, ros_domain, ros_node, stop_process
from reporting import write_report

HERE = Path(__file__).resolve().parent
PEER_NAMESPACE = "/slm_peer"
GOAL_ANSWER_RATIO = 1.02
#: Requests whose greedy answers run past 128 tokens on the embedded model (the issue's comparison is
#: for 128-token answers): every run then generates exactly --max-new-tokens on both sides.
PROMPTS = (
    "Write a short story about a delivery robot that gets lost in a hospital.",
    "Explain step by step how a mobile robot plans a path through a warehouse.",
    "Describe in detail how a lidar sensor works and what its limits are.",
    "Tell me about the history of robotics, from the first industrial arms to today's humanoids.",
)


class PeerClient(bench_llm._Client):
    """Publishes a prompt on the peer's ``prompt`` topic and waits for its ``response``."""

    via = "callback peer"

    def _create(self) -> None:
        from std_msgs.msg import String

        from slm_ros.ros import qos
        self._string = String
        self._answers: List[tuple] = []
        self._pub = self.node.create_publisher(String, "prompt", qos.COMMANDS)
        self._sub = self.node.create_subscription(
            String, "response", lambda msg: self._answers.append((time.monotonic(), msg.data)),
            qos.COMMANDS)

    def _ready(self) -> bool:
        return self._pub.get_subscription_count() > 0 and \
            self.node.count_publishers(f"{self.namespace}/response") > 0

    def _destroy(self) -> None:
        self.node.destroy_subscription(self._sub)
        self.node.destroy_publisher(self._pub)

    def generate(self, prompt: str, max_new_tokens: int, timeout_s: float = 300.0) -> RunResult:
        self._answers.clear()
        t_send = time.monotonic()
        self._pub.publish(self._string(data=prompt))
        self._spin_until(lambda: bool(self._answers), timeout_s)
        t_answer, text = self._answers[0]
        ms = (t_answer - t_send) * 1e3
        return RunResult(ttft_ms=ms, tokens_per_second=0.0, completion_tokens=0, token_ids=[],
                         answer_ms=ms, text=text)


def peer_command(args) -> List[str]:
    return [sys.executable, str(HERE / "callback_peer_node.py"), "--backend", args.backend,
            "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads),
            "--repetition-penalty", str(bench_llm.REPETITION_PENALTY),
            "--ros-args", "-r", f"__ns:={PEER_NAMESPACE}"]


def summarise(prompts, runs: Dict[str, List[List[RunResult]]]) -> Dict[str, object]:
    per_prompt = []
    for i, prompt in enumerate(prompts):
        ours, peer = runs["slm_ros"][i], runs["callback"][i]
        row = {
            "prompt": prompt[:60],
            "slm_ros_answer_ms": round(statistics.median(r.answer_ms for r in ours), 1),
            "callback_answer_ms": round(statistics.median(r.answer_ms for r in peer), 1),
            "slm_ros_ttft_ms": round(statistics.median(r.ttft_ms for r in ours), 1),
            "callback_ttft_ms": round(statistics.median(r.ttft_ms for r in peer), 1),
            "completion_tokens": ours[0].completion_tokens,
            "same_text": all(r.text == peer[0].text for r in ours + peer),
        }
        row["answer_ratio"] = round(row["slm_ros_answer_ms"] / row["callback_answer_ms"], 3)
        row["first_text_sooner_x"] = round(row["callback_ttft_ms"] / row["slm_ros_ttft_ms"], 2)
        per_prompt.append(row)
    ratio = statistics.median(row["answer_ratio"] for row in per_prompt)
    return {
        "per_prompt": per_prompt,
        "summary": {
            "answer_ratio_slm_ros_over_callback": round(ratio, 3),
            "first_text_sooner_x": round(statistics.median(
                row["first_text_sooner_x"] for row in per_prompt), 2),
            "same_text": all(row["same_text"] for row in per_prompt),
            "goal_answer_ratio": GOAL_ANSWER_RATIO,
            "goal_answer_ratio_met": ratio <= GOAL_ANSWER_RATIO,
        },
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="llama_cpp")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10,
                        help="runs per prompt and side (default 10: this 2-core VM drifts by tens of "
                             "percent between runs; 3-5 repeats gave ratios from 0.98 to 1.13)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--pause", type=float, default=0.3)
    parser.add_argument("--wait", type=float, default=600.0)
    parser.add_argument("--node-param", action="append", default=[], metavar="NAME:=VALUE")
    parser.add_argument("--quick", action="store_true", help="1 repeat, 2 prompts")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
    out = args.out or HERE / "results" / f"bench_peer_{args.backend}.json"
    bench_llm.BACKEND, bench_llm.THREADS = args.backend, args.threads
    bench_llm.NODE_PARAMS = list(args.node_param)
    prompts = PROMPTS[:2] if args.quick else PROMPTS
    with ros_domain():
        log(f"peer: starting {' '.join(peer_command(args))}")
        peer_proc = subprocess.Popen(peer_command(args), stdout=sys.stderr, stderr=sys.stderr)
        peer = None
        try:
            with ros_node(args.max_new_tokens, args.wait) as ours:
                peer = PeerClient(PEER_NAMESPACE, peer_proc.pid)
                peer.wait_for_server(lambda: peer_proc.poll() is None, args.wait)
                peer.generate(prompts[0], args.max_new_tokens)   # untimed: first round trip
                runs = measure(prompts, args.max_new_tokens, args.repeats,
                               [("slm_ros", ours.generate), ("callback", peer.generate)],
                               args.pause)
        finally:
            if peer is not None:
                peer.close()
            stop_process(peer_proc)
    report = {"benchmark": "callback_peer", "backend": args.backend,
              "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
              "node_command": bench_llm.node_command(args.max_new_tokens),
              "peer_command": peer_command(args), "machine": machine_info(),
              **summarise(prompts, runs)}
    write_report(report, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
