#!/usr/bin/env python3
"""Benchmark: relaunch with a cache hit (key check + load) vs a cold build, transformers backend,
embedded model (SmolLM2-135M-Instruct).

Each measurement is a fresh Python process doing what a node launch does: ``Builder.build`` (a cold
build into an empty cache, or a cache hit on the second run) and then loading the artifact with the
transformers backend and generating the first token. Timings are taken inside the process (imports
and torch/transformers, reported separately as ``import_s``), plus the process wall time. ``--variants`` adds ``int8_dynamic``.

    .venv/bin/python bench/bench_builder.py [--repeats 3] [--out FILE]

JSON on stdout and in ``--out`` (default ``bench/results/bench_builder.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

from reporting import write_report

HERE = Path(__file__).resolve().parent

# Runs in the child process: one launch = (build or cache hit) + load + first token.
CHILD = r"""
import json, sys, threading, time
t0 = time.monotonic()
from slm_ros.backends.base import BackendConfig
from slm_ros.backends.registry import create_backend
from slm_ros.build.builder import Builder
from slm_ros.build.spec import BuildSpec
from slm_ros.core.types import SamplingParams
from slm_ros.models import resolve_model
import torch, transformers  # noqa: E401,F401 - a node has these loaded before it builds or loads
import slm_ros.build.transformers_step  # noqa: F401
t_import = time.monotonic()
cache, quant = sys.argv[1], sys.argv[2]
spec = BuildSpec(model=resolve_model("default").path, backend="transformers", quantization=quant,
                 dtype="float32", device="cpu")
t1 = time.monotonic()
result = Builder(cache_root=cache).build(spec)
t2 = time.monotonic()
backend = create_backend("transformers")
backend.load(BackendConfig(model=str(result.path), device="cpu", dtype="float32"))
t3 = time.monotonic()
ids = backend.apply_chat_template([{"role": "user", "content": "Hi"}])
next(iter(backend.generate(ids, SamplingParams(max_new_tokens=1), threading.Event())))
t4 = time.monotonic()
print(json.dumps({"cache_hit": result.cache_hit, "reason": result.reason, "import_s": t_import - t0,
                  "build_or_key_check_s": t2 - t1, "load_s": t3 - t2, "first_token_s": t4 - t3,
                  "launch_s_excl_imports": t4 - t1}))
"""


def launch(cache: Path, quantization: str) -> dict:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", CHILD, str(cache), quantization],
                         capture_output=True, text=True, cwd="/")
    wall = time.monotonic() - t0
    if out.returncode != 0:
        raise SystemExit(f"launch failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = wall
    return result


def summarize(runs: List[dict]) -> dict:
    keys = ("import_s", "build_or_key_check_s", "load_s", "first_token_s", "launch_s_excl_imports",
            "process_wall_s")
    return {k: statistics.median(r[k] for r in runs) for k in keys} | {"runs": runs}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="*", default=["none"],
                        help="transformers quantizations to measure (none, int8_dynamic)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bench_builder.json")
    args = parser.parse_args(argv)
    report = {"benchmark": "engine_builder_relaunch", "model": "default (SmolLM2-135M-Instruct)",
              "backend": "transformers",
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
              "variants": {}}
    # The embedded model's one-time GGUF conversion is not part of either path.
    subprocess.run([sys.executable, "-c", "from slm_ros.models import resolve_model; "
                    "resolve_model('default')"], check=True, cwd="/")
    for quant in args.variants:
        cold, hit = [], []
        for i in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="bench_builder_") as tmp:
                cache = Path(tmp) / "engines"
                print(f"[bench_builder] {quant}: cold build {i + 1}/{args.repeats}",
                      file=sys.stderr)
                cold.append(launch(cache, quant))
                assert not cold[-1]["cache_hit"]
                print(f"[bench_builder] {quant}: relaunch (cache hit) {i + 1}/{args.repeats}",
                      file=sys.stderr)
                hit.append(launch(cache, quant))
                assert hit[-1]["cache_hit"]
        c, h = summarize(cold), summarize(hit)
        report["variants"][quant] = {
            "cold_build": c, "cache_hit": h,
            "speedup_launch_excl_imports": c["launch_s_excl_imports"] / h["launch_s_excl_imports"]}
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
