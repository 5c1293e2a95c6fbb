#!/usr/bin/env python3
"""Benchmark: the LLM node with the ``openai`` backend (generation on an OpenAI-compatible server)
against the LLM node running llama.cpp in-process, on the same GGUF, prompts and settings.

* **in_process** - ``llm_node`` with ``backend: llama_cpp`` on the embedded SmolLM2 GGUF.
* **remote** - llama-cpp-python's OpenAI-compatible server (``python -m llama_cpp.server``) on the
  same GGUF with the same thread count, on loopback, and ``llm_node`` with ``backend: openai``
  pointed at it.

Both nodes run at once in their own namespaces, each in its own process, and a client node in this
process sends Generate goals (greedy, same ``max_new_tokens``), alternating the two paths so that
machine-speed drifts hit both alike. TTFT is from sending the goal to the first feedback chunk with
text as the client sees it; decode speed counts streamed pieces (token ids for llama.cpp in-process,
text deltas for the remote path: llama.cpp's server streams one token per event) over their arrival
times. The overhead of offloading is ``remote - in_process`` TTFT and the tokens/s ratio: HTTP, SSE
parsing and one more process hop; on a real deployment the server is on a faster machine and this
overhead is what the robot pays for it.

    .venv/bin/python bench/bench_remote.py [--max-new-tokens 48] [--repeats 3] [--threads 2]

Writes ``bench/results/bench_remote.json`` (``--out``) and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "test"))

from bench_llm import (PROMPTS, QUICK_PROMPTS, REPETITION_PENALTY, log, machine_info,  # noqa: E402
                       measure, median, ros_domain, ros_node, summarise_runs)
from reporting import write_report  # noqa: E402

DEFAULT_OUT = HERE / "results" / "bench_remote.json"
NAMESPACES = {"in_process": "/slm_bench_local", "remote": "/slm_bench_remote"}


def node_command(namespace: str, backend: str, max_new_tokens: int, threads: int,
                 base_url: str = "") -> List[str]:
    from slm_ros.cli import node_executable
    cmd = [node_executable("llm_node"), "--ros-args", "-r", f"__ns:={namespace}",
           "-p", "model:=default", "-p", f"backend:={backend}",
           "-p", f"default_max_new_tokens:={max_new_tokens}",
           "-p", f"default_repetition_penalty:={REPETITION_PENALTY}",
           "-p", "max_history_turns:=0", "-p", f"threads:={threads}"]
    if base_url:
        cmd += ["-p", f"remote.base_url:={base_url}"]
    return cmd


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2,
                        help="llama.cpp threads, in-process and in the server (default 2)")
    parser.add_argument("--pause", type=float, default=2.0,
                        help="idle seconds before each timed run (default 2.0: with 0.3 s the "
                             "remote runs that followed an in-process run measured ~600 ms TTFT "
                             "instead of ~100 ms here, cause not pinned down)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--wait", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
    prompts = PROMPTS[:QUICK_PROMPTS] if args.quick else PROMPTS
    from openai_servers import LlamaCppServer, embedded_gguf

    with ros_domain() as domain, contextlib.ExitStack() as stack:
        log(f"ROS_DOMAIN_ID={domain}")
        server = LlamaCppServer(embedded_gguf(), threads=args.threads,
                                log_path=args.out.parent / "bench_remote_server.log")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        stack.enter_context(server.start())
        log(f"llama_cpp.server up at {server.base_url} after {server.start_seconds:.1f} s")
        commands = {
            "in_process": node_command(NAMESPACES["in_process"], "llama_cpp", args.max_new_tokens,
                                       args.threads),
            "remote": node_command(NAMESPACES["remote"], "openai", args.max_new_tokens,
                                   args.threads, server.base_url),
        }
        clients = {name: stack.enter_context(ros_node(args.max_new_tokens, args.wait, cmd,
                                                      NAMESPACES[name]))
                   for name, cmd in commands.items()}
        runs = measure(prompts, args.max_new_tokens, args.repeats,
                       [(name, client.generate) for name, client in clients.items()], args.pause)
        rows = []
        for i, prompt in enumerate(prompts):
            local, remote = summarise_runs(runs["in_process"][i]), summarise_runs(runs["remote"][i])
            rows.append({
                "prompt": prompt, "in_process": local, "remote": remote,
                "tokens_per_second_ratio": round(remote["tokens_per_second"] /
                                                 local["tokens_per_second"], 4)
                if local["tokens_per_second"] else 0.0,
                "ttft_overhead_ms": round(remote["ttft_ms"] - local["ttft_ms"], 2),
            })
        report: Dict = {
            "benchmark": "slm_ros: llm_node backend openai (llama_cpp.server on loopback) vs "
                         "llm_node backend llama_cpp in-process, same GGUF",
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": machine_info(),
            "params": {"max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
                       "threads": args.threads, "decoding": "greedy",
                       "repetition_penalty": REPETITION_PENALTY, "prompts": len(prompts),
                       "server": "python -m llama_cpp.server --interrupt_requests False",
                       "node_commands": commands},
            "per_prompt": rows,
            "summary": {
                "in_process_tokens_per_second": round(median(
                    [r["in_process"]["tokens_per_second"] for r in rows]), 2),
                "remote_tokens_per_second": round(median(
                    [r["remote"]["tokens_per_second"] for r in rows]), 2),
                "in_process_ttft_ms": round(median([r["in_process"]["ttft_ms"] for r in rows]), 2),
                "remote_ttft_ms": round(median([r["remote"]["ttft_ms"] for r in rows]), 2),
                "tokens_per_second_ratio": round(median(
                    [r["tokens_per_second_ratio"] for r in rows]), 4),
                "ttft_overhead_ms": round(median([r["ttft_overhead_ms"] for r in rows]), 2),
            },
        }
    write_report(report, args.out)
    log(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
