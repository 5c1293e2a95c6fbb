#!/usr/bin/env python3
"""The benchmark suite: one command, one JSON report and one PNG plot.

Measured side by side in one run, same prompts, greedy decoding, fixed max tokens:

1. **backends** - per backend on the embedded model (SmolLM2-135M-Instruct: transformers on its
   float32 copy, llama_cpp on the Q4_1 GGUF itself), each in a fresh process: load time, TTFT, decode
   tokens/s, peak RSS; llama_cpp also on the GGUF requantized to q4_0, q8_0 and f16 by the engine builder
   (``llama_cpp_quantizations``): the same model with more bytes per weight shows whether decode is
   bound by memory bandwidth or by compute. The edge engines (``edge_engines``): the same model
   built by the engine builder for onnxruntime_genai (int4) and openvino (int4, int8) -- cold build
   (an empty cache) and cache-hit time, artifact size -- then probed like the others.
2. **bandwidth bound** - this machine's memory bandwidth (numpy copies of a 256 MiB buffer, best of
   several; read + write bytes) divided by the bytes of weights read per generated token (the model's
   weight bytes as the backend holds them) = the decode ceiling; each backend's fraction of it.
   Goal: llama_cpp >= 50 % of the ceiling.
3. **ROS vs raw** - ``bench_llm.py`` per backend: the node in its own process and an action client in
   another, against the backend in-process, with the node's defaults (``stream_interval_ms`` 50);
   llama_cpp also with a chunk per token (``stream_interval_ms:=0``) and with requests on the
   ``request`` topic instead of the action (``--via topic``). Goals: tokens/s ratio >= 0.98, TTFT
   overhead <= 5 ms. Then ``bench_peer.py``: the node against the callback design (whole answer
   generated in a subscription callback, published once); goal: full answer <= 1.02x.
4. **conversation** - ``bench_conversation.py`` per local backend: 24 turns in one session, first-
   token time per turn (plotted); goal: median of turns 13-24 <= 1.5x that of turns 1-4.
5. **vision ingest** - ``bench_vision.py`` (640x480 rgb8 at 30 Hz).
6. **constrained output** - ``bench_constrained.py`` per local backend: JSON validity without and
   with ``response_format``, constrained / free decode speed, schema compile cost cold and cached.
7. **CUDA** - the transformers backend on a GPU when this machine has one (skipped here, with the
   reason, otherwise).
8. **remote** - ``bench_remote.py``: the node with the ``openai`` backend against llama-cpp-python's
   server on the same GGUF vs the node running llama.cpp in-process (tokens/s ratio, TTFT delta).

    .venv/bin/python bench/suite.py [--quick] [--out-dir bench/results]

Writes ``suite.json`` and ``suite.png`` into ``--out-dir`` (default ``bench/results``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from reporting import write_report

HERE = Path(__file__).resolve().parent
PROMPTS = (
    "What is the capital of France? Answer in one sentence.",
    "Explain in a few sentences what a robot operating system is and why robots need one.",
    "You are helping a team that builds a small indoor delivery robot with a lidar, wheel "
    "encoders, an IMU and a depth camera, running ROS 2 on a small ARM computer. They want a tiny "
    "language model to turn spoken requests into navigation goals. Give three pieces of advice.",
)

#: Requantizations of the embedded GGUF measured besides it (llama_cpp_quantizations).
QUANTIZATION_SWEEP = ("q4_0", "q8_0", "f16")
#: The edge engines, built from the embedded model's Hugging Face copy by the engine builder.
EDGE_BUILDS = (("onnxruntime_genai", "int4"), ("openvino", "int4"), ("openvino", "int8"))

# Runs in a fresh process per backend: load, warm up, time each prompt, report peak RSS.
PROBE = r"""
import json, resource, statistics, sys, threading, time
backend_name, device, max_new, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
prompts = json.loads(sys.argv[5])
model_override = sys.argv[6] if len(sys.argv) > 6 else ""
from slm_ros.backends.base import BackendConfig
from slm_ros.backends.registry import create_backend
from slm_ros.core.session import build_messages
from slm_ros.core.types import SamplingParams
from slm_ros.models import resolve_model
import inspect
kw = {"prefer_gguf": True} if backend_name == "llama_cpp" and \
    "prefer_gguf" in inspect.signature(resolve_model).parameters else {}
model = resolve_model(model_override or "default", **kw)
backend = create_backend(backend_name)
t0 = time.monotonic()
backend.load(BackendConfig(model=model.path, device=device))
load_s = time.monotonic() - t0
backend.warmup()
params = SamplingParams(max_new_tokens=max_new, temperature=0.0, repetition_penalty=1.1)
ttfts, rates, counts = [], [], []
for prompt in prompts:
    ids = backend.apply_chat_template(build_messages("", [], prompt))
    for _ in range(repeats):
        t0 = time.monotonic(); first = last = 0.0; n = 0
        for _tok in backend.generate(ids, params, threading.Event()):
            last = time.monotonic(); n += 1
            if n == 1: first = last
        ttfts.append((first - t0) * 1e3)
        rates.append((n - 1) / (last - first) if n > 1 and last > first else 0.0)
        counts.append(n)
def peak_rss_mb():
    # VmHWM is this process image's peak; ru_maxrss survives exec and would report the parent's
    # (the suite's, after its 512 MiB bandwidth buffers) when that was larger.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
info = backend.describe()
weight_bytes = info.get("weight_bytes") or 0
if not weight_bytes and backend_name == "transformers":
    import torch
    weight_bytes = sum(p.numel() * p.element_size() for p in backend._model.parameters())
if not weight_bytes and str(model.path).endswith(".gguf"):
    import os
    weight_bytes = os.path.getsize(model.path)
if not weight_bytes and backend_name in ("onnxruntime_genai", "openvino"):
    from pathlib import Path
    weight_bytes = sum(f.stat().st_size for f in Path(model.path).iterdir()
                       if f.name.endswith((".onnx", ".onnx.data", "openvino_model.bin")))
print(json.dumps({"backend": backend_name, "model": str(model.path), "load_s": load_s,
                  "ttft_ms_median": statistics.median(ttfts),
                  "tokens_per_second_median": statistics.median(rates),
                  "completion_tokens_median": statistics.median(counts),
                  "peak_rss_mb": peak_rss_mb(),
                  "weight_bytes": int(weight_bytes), "describe": {k: str(v) for k, v in info.items()}}))
"""


def log(msg: str) -> None:
    print(f"[suite] {msg}", file=sys.stderr, flush=True)


def memory_bandwidth_gbs(size_mb: int = 256, repeats: int = 7) -> Dict[str, float]:
    """Best-of copy bandwidth (read + write bytes per second) of a large numpy buffer."""
    import numpy as np
    src = np.ones(size_mb * (1 << 20) // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        dt = time.perf_counter() - t0
        best = max(best, 2 * src.nbytes / dt / 1e9)
    return {"copy_gb_per_s": best, "buffer_mb": size_mb, "method": "numpy copyto, read+write bytes"}


def available_backends() -> List[str]:
    out = ["transformers"]
    try:
        import llama_cpp  # noqa: F401
        from slm_ros.backends.registry import available_backends as registered
        if "llama_cpp" in registered("text"):
            out.append("llama_cpp")
    except ImportError:
        pass
    return out


def probe(backend: str, device: str, max_new: int, repeats: int, model: str = "") -> Dict:
    log(f"backend {backend} on {device}{f' ({model})' if model else ''}: load, TTFT, tokens/s, RSS")
    proc = subprocess.run([sys.executable, "-c", PROBE, backend, device, str(max_new),
                           str(repeats), json.dumps(PROMPTS), model],
                          capture_output=True, text=True, cwd="/")
    if proc.returncode != 0:
        return {"backend": backend, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def requantized(quantization: str, cache_dir: Path) -> str:
    """The embedded GGUF requantized by the engine builder (its cache under ``cache_dir``: built
    once, reused while the source and versions match); returns the artifact's path."""
    from slm_ros.build.builder import Builder
    from slm_ros.build.spec import BuildSpec
    from slm_ros.models import resolve_model
    source = resolve_model("default", prefer_gguf=True).path
    spec = BuildSpec(model=str(source), backend="llama_cpp", quantization=quantization)
    return str(Builder(cache_root=cache_dir).build(spec).path)


def edge_build(backend: str, quantization: str, cache_dir: Path) -> Dict:
    """Build the embedded model for an edge engine twice: into an empty cache (cold) and into
    ``cache_dir`` (kept between runs), then once more there (the cache hit). Returns the timings,
    the artifact size and its path."""
    import tempfile

    from slm_ros.build.builder import Builder
    from slm_ros.build.spec import BuildSpec
    from slm_ros.models import resolve_model
    source = resolve_model("default").path   # the Hugging Face copy of the GGUF
    spec = BuildSpec(model=str(source), backend=backend, quantization=quantization, device="cpu")
    with tempfile.TemporaryDirectory(prefix="slm-ros-cold-build-") as cold:
        t0 = time.monotonic()
        Builder(cache_root=cold).build(spec)
        cold_s = time.monotonic() - t0
    builder = Builder(cache_root=cache_dir)
    builder.build(spec)
    t0 = time.monotonic()
    result = builder.build(spec)
    hit_s = time.monotonic() - t0
    path = Path(result.path)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {"cold_build_s": round(cold_s, 2), "cache_hit_s": round(hit_s, 4),
            "cache_hit": bool(result.cache_hit), "artifact_mb": round(size / 1e6, 1),
            "path": str(path)}


def with_ceiling(result: Dict, bandwidth_gbs: float) -> Dict:
    """Add the bandwidth ceiling (bandwidth / weight bytes per token) and the fraction reached."""
    if "error" not in result and result.get("weight_bytes"):
        ceiling = bandwidth_gbs * 1e9 / result["weight_bytes"]
        result["bandwidth_ceiling_tokens_per_second"] = ceiling
        result["fraction_of_ceiling"] = result["tokens_per_second_median"] / ceiling
    return result


def run_json(cmd: List[str], out: Path) -> Dict:
    log(" ".join(cmd))
    proc = subprocess.run(cmd + ["--out", str(out)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-3:]}
    return json.loads(out.read_text())


def cuda_available() -> str:
    try:
        import torch
        return "" if torch.cuda.is_available() else \
            f"no CUDA GPU on this machine (torch {torch.__version__})"
    except ImportError as exc:
        return f"torch not importable: {exc}"


def plot(report: Dict, path: Path) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no plot: matplotlib not installed ({exc})"
    backends = [b for b in report["backends"] + report.get("llama_cpp_quantizations", []) +
                report.get("edge_engines", []) if "error" not in b]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.6))
    names = [f"{b['backend']}\n{b['quantization']}" if "quantization" in b else b["backend"]
             for b in backends]
    rates = [b["tokens_per_second_median"] for b in backends]
    ceilings = [b.get("bandwidth_ceiling_tokens_per_second", 0) for b in backends]
    x = range(len(names))
    axes[0].bar([i - 0.2 for i in x], rates, width=0.4, label="measured")
    axes[0].bar([i + 0.2 for i in x], ceilings, width=0.4, label="bandwidth ceiling")
    axes[0].set_xticks(list(x), names)
    axes[0].set_ylabel("decode tokens/s")
    axes[0].set_title("Decode speed vs memory-bandwidth bound")
    axes[0].legend()
    axes[1].bar(range(len(names)), [b["ttft_ms_median"] for b in backends])
    axes[1].set_xticks(list(range(len(names))), names)
    axes[1].set_ylabel("ms")
    axes[1].set_title("Time to first token (raw backend)")
    ros = report.get("ros_vs_raw", {})
    labels, raw_v, ros_v = [], [], []
    for name, r in ros.items():
        if "summary" in r:
            labels.append(name.replace("_per_token_chunks", "\nper-token chunks")
                          .replace("_via_topic", "\nrequest topic"))
            raw_v.append(r["summary"]["raw_tokens_per_second"])
            ros_v.append(r["summary"]["ros_tokens_per_second"])
    x = range(len(labels))
    axes[2].bar([i - 0.2 for i in x], raw_v, width=0.4, label="raw backend")
    axes[2].bar([i + 0.2 for i in x], ros_v, width=0.4, label="through ROS (client)")
    axes[2].set_xticks(list(x), labels)
    axes[2].set_ylabel("decode tokens/s")
    axes[2].set_title("ROS overhead")
    axes[2].legend()
    for name, r in report.get("conversation", {}).items():
        turns = [t for t in r.get("turns", []) if t.get("finish_reason") != "error"]
        if turns:
            axes[3].plot([t["turn"] for t in turns], [t["ttft_ms"] for t in turns], marker="o",
                         label=name)
    axes[3].set_xlabel("turn")
    axes[3].set_ylabel("time to first token, ms")
    axes[3].set_title("24-turn conversation (one session)")
    if report.get("conversation"):
        axes[3].legend()
    fig.suptitle(f"slm_ros benchmark suite, {report['machine']['cpu_model'] or 'CPU'}, "
                 f"{report['timestamp']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, short vision run")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--skip-ros", action="store_true")
    parser.add_argument("--skip-vision", action="store_true")
    parser.add_argument("--skip-edge", action="store_true",
                        help="skip the onnxruntime_genai / openvino builds and probes")
    parser.add_argument("--skip-quantizations", action="store_true",
                        help=f"no llama_cpp sweep over {', '.join(QUANTIZATION_SWEEP)}")
    args = parser.parse_args(argv)
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    repeats = 1 if args.quick else 3
    cpu_model = ""
    try:
        for line in open("/proc/cpuinfo", encoding="ascii", errors="replace"):
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    report: Dict = {"benchmark": "slm_ros suite", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "command": " ".join([Path(sys.executable).name, *sys.argv]),
                    "machine": {"cpu_model": cpu_model, "cpu_count": os.cpu_count(),
                                "platform": platform.platform()},
                    "params": {"prompts": list(PROMPTS), "max_new_tokens": args.max_new_tokens,
                               "repeats": repeats, "decoding": "greedy",
                               "repetition_penalty": 1.1}}
    report["bandwidth"] = memory_bandwidth_gbs()
    log(f"memory bandwidth {report['bandwidth']['copy_gb_per_s']:.1f} GB/s")
    report["backends"] = []
    bandwidth = report["bandwidth"]["copy_gb_per_s"]
    for name in available_backends():
        result = with_ceiling(probe(name, "cpu", args.max_new_tokens, repeats), bandwidth)
        report["backends"].append(result)
        log(json.dumps({k: v for k, v in result.items() if k != "describe"}))
    if "llama_cpp" in available_backends() and not args.skip_quantizations:
        # Where the bound lies: the same model with more bytes per weight. 4-bit dot products on
        # a small CPU are compute bound, wider weights approach the bandwidth bound.
        report["llama_cpp_quantizations"] = []
        for quantization in QUANTIZATION_SWEEP:
            try:
                path = requantized(quantization, args.out_dir / "engines")
            except Exception as exc:  # noqa: BLE001 - report and go on with the suite
                result = {"backend": "llama_cpp", "error": f"{type(exc).__name__}: {exc}"}
            else:
                result = with_ceiling(probe("llama_cpp", "cpu", args.max_new_tokens, repeats,
                                            path), bandwidth)
            result["quantization"] = quantization
            report["llama_cpp_quantizations"].append(result)
            log(json.dumps({k: v for k, v in result.items() if k != "describe"}))
    if not args.skip_edge:
        report["edge_engines"] = []
        for backend, quantization in EDGE_BUILDS:
            try:
                build = edge_build(backend, quantization, args.out_dir / "engines")
            except Exception as exc:  # noqa: BLE001 - report and go on with the suite
                result = {"backend": backend, "error": f"{type(exc).__name__}: {exc}"}
            else:
                result = with_ceiling(probe(backend, "cpu", args.max_new_tokens, repeats,
                                            build["path"]), bandwidth)
                result["build"] = build
            result["quantization"] = quantization
            report["edge_engines"].append(result)
            log(json.dumps({k: v for k, v in result.items() if k != "describe"}))
    gpu_reason = cuda_available()
    report["cuda"] = ({"skipped": gpu_reason} if gpu_reason else
                      probe("transformers", "cuda", args.max_new_tokens, repeats))
    if not args.skip_ros:
        report["ros_vs_raw"] = {}
        for name in available_backends():
            cmd = [sys.executable, str(HERE / "bench_llm.py"), "--backend", name,
                   "--max-new-tokens", str(args.max_new_tokens), "--repeats",
                   str(1 if args.quick else 2)]
            report["ros_vs_raw"][name] = run_json(cmd, args.out_dir / f"bench_llm_{name}.json")
            if name == "llama_cpp":   # ~100 tokens/s: also with a chunk per token
                report["ros_vs_raw"][f"{name}_per_token_chunks"] = run_json(
                    cmd + ["--node-param", "stream_interval_ms:=0"],
                    args.out_dir / f"bench_llm_{name}_per_token_chunks.json")
                # The request topic instead of the action: no goal round trip before generating.
                report["ros_vs_raw"][f"{name}_via_topic"] = run_json(
                    cmd + ["--via", "topic"], args.out_dir / f"bench_llm_{name}_via_topic.json")
        if "llama_cpp" in available_backends():
            cmd = [sys.executable, str(HERE / "bench_remote.py"), "--max-new-tokens",
                   str(args.max_new_tokens), "--repeats", str(1 if args.quick else 2)]
            report["remote_vs_in_process"] = run_json(cmd, args.out_dir / "bench_remote.json")
            # The node (defaults) against the design users would otherwise write: the whole answer
            # generated in a subscription callback and published once (same engine and GGUF).
            cmd = [sys.executable, str(HERE / "bench_peer.py"), "--backend", "llama_cpp",
                   *(["--repeats", "1"] if args.quick else [])]
            report["callback_peer"] = run_json(cmd, args.out_dir / "bench_peer_llama_cpp.json")
    # Per local backend: a 24-turn chat (first-token time per turn, history trimmed in blocks) and
    # constrained output (validity, decode speed, schema compile cost).
    for key, script in (("conversation", "bench_conversation"),
                        ("constrained_output", "bench_constrained")):
        report[key] = {}
        for name in ("llama_cpp", "transformers"):
            if name in available_backends():
                cmd = [sys.executable, str(HERE / f"{script}.py"), "--backend", name]
                report[key][name] = run_json(cmd, args.out_dir / f"{script}_{name}.json")
    if not args.skip_vision:
        cmd = [sys.executable, str(HERE / "bench_vision.py"), "--duration",
               "10" if args.quick else "30"]
        report["vision_ingest"] = run_json(cmd, args.out_dir / "bench_vision.json")
    goals = {}
    for b in report["backends"]:
        if b.get("backend") == "llama_cpp" and "fraction_of_ceiling" in b:
            goals["llama_cpp_fraction_of_ceiling>=0.5"] = b["fraction_of_ceiling"] >= 0.5
    for name, r in report.get("ros_vs_raw", {}).items():
        if "summary" in r:
            goals[f"{name}_ros_tokens_per_second_ratio>=0.98"] = r["summary"]["goal_tps_ratio_met"]
            goals[f"{name}_ros_ttft_overhead<=5ms"] = r["summary"]["goal_ttft_overhead_met"]
    peer = report.get("callback_peer", {})
    if "summary" in peer:
        goals["llama_cpp_full_answer_vs_callback_design<=1.02"] = \
            peer["summary"]["goal_answer_ratio_met"]
    for name, r in report.get("conversation", {}).items():
        if r.get("ratio_13_24_over_1_4") is not None:
            goals[f"{name}_conversation_ttft_ratio<=1.5"] = r["ratio_13_24_over_1_4"] <= 1.5
    for name, r in report.get("constrained_output", {}).items():
        for goal, met in r.get("goals", {}).items():
            goals[f"{name}_constrained_{goal}"] = met
    report["goals"] = goals
    out = args.out_dir / "suite.json"
    write_report(report, out)
    problem = plot(report, args.out_dir / "suite.png")
    if problem:
        log(problem)
    log(f"wrote {out} and {args.out_dir / 'suite.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
