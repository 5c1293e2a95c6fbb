#!/usr/bin/env python3
"""Benchmark: first-token latency over a long chat (24 turns, one session, the node's defaults).

The core engine (what the LLM node runs, without ROS) on the embedded SmolLM2-135M-Instruct: each
turn asks a new short question in the same session, up to ``--max-new-tokens`` (128) per answer,
with the node's default ``max_history_turns`` (8). Reports the time to first token of every turn,
the median of turns 1-4 and of turns 13-24 and their ratio (issue 14's goal: <= 1.5), the prompt
tokens of each turn, and the history kept.

    .venv/bin/python bench/bench_conversation.py [--backend llama_cpp] [--out FILE]

JSON on stdout and in ``--out`` (default ``bench/results/bench_conversation_<backend>.json``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import List, Optional

from reporting import write_report

HERE = Path(__file__).resolve().parent

#: Short, varied questions a person might ask a robot in one conversation.
QUESTIONS = [
    "Hi! What can you help me with?", "What is a mobile robot?", "How does a lidar work?",
    "And a camera?", "Which one is better indoors?", "What is SLAM?", "Is it hard to tune?",
    "What does odometry mean?", "Why does it drift?", "How do wheels slip?",
    "What is a costmap?", "How do robots avoid people?", "What is a safety stop?",
    "Can you summarise what we discussed?", "What is ROS?", "What is a topic?",
    "And an action?", "Why use actions for navigation?", "What is a battery's C rating?",
    "How long does a robot vacuum run?", "What is docking?", "How does it find the dock?",
    "What should I check before a demo?", "Thanks, any last advice?",
]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="llama_cpp", choices=("llama_cpp", "transformers"))
    parser.add_argument("--turns", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-history-turns", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(HERE.parent / "test"))
    from engine_helpers import Collector, running_engine
    from slm_ros.backends.base import BackendConfig
    from slm_ros.backends.registry import create_backend
    from slm_ros.core.engine import EngineConfig
    from slm_ros.core.types import Request
    from slm_ros.models import resolve_model

    model = resolve_model("default", prefer_gguf=args.backend == "llama_cpp").path
    backend = create_backend(args.backend)
    backend.load(BackendConfig(model=model, device="cpu"))
    config = EngineConfig(max_history_turns=args.max_history_turns)
    turns = []
    with running_engine(backend, config) as engine:
        engine.submit(Request(prompt="Hello.", session_id="warmup"), Collector())
        time.sleep(2.0)
        sink = Collector(timeout=300)
        for i in range(args.turns):
            question = QUESTIONS[i % len(QUESTIONS)]
            rid = engine.submit(Request(prompt=question, session_id="chat", sampling=_overrides(
                args.max_new_tokens)), sink)
            final = sink.final(rid)
            turns.append({"turn": i + 1, "ttft_ms": round(final.stats.time_to_first_token_ms, 1),
                          "prompt_tokens": final.stats.prompt_tokens,
                          "completion_tokens": final.stats.completion_tokens,
                          "finish_reason": final.finish_reason.value})
            print(f"turn {i + 1}: {turns[-1]}", file=sys.stderr)
    backend.close()
    early = statistics.median(t["ttft_ms"] for t in turns[:4])
    late = statistics.median(t["ttft_ms"] for t in turns[12:24]) if len(turns) >= 24 else None
    write_report({
        "benchmark": "conversation", "backend": args.backend, "model": model,
        "max_new_tokens": args.max_new_tokens, "max_history_turns": args.max_history_turns,
        "machine": {"cpu": platform.processor() or platform.machine()},
        "median_ttft_ms_turns_1_4": early, "median_ttft_ms_turns_13_24": late,
        "ratio_13_24_over_1_4": round(late / early, 2) if late else None, "turns": turns,
    }, args.out or HERE / "results" / f"bench_conversation_{args.backend}.json")
    return 0


def _overrides(max_new_tokens: int):
    from slm_ros.core.types import SamplingOverrides
    return SamplingOverrides(max_new_tokens=max_new_tokens)


if __name__ == "__main__":
    raise SystemExit(main())
