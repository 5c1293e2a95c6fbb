#!/usr/bin/env python3
"""Benchmark: raw backend speed vs the same generation served through the ROS 2 LLM node.

What it measures, on the embedded model (``model: default``, SmolLM2-135M-Instruct), greedy decoding,
the same prompts and the same ``max_new_tokens`` on both paths:

* **raw** - the backend in this process: ``resolve_model`` -> ``create_backend`` -> ``load`` ->
  ``warmup``, then ``backend.generate`` on the chat-templated prompt ids (built exactly as the node
  builds them: node system prompt empty, no history). TTFT is from the prompt text (the chat template
  and tokenization count, as they do in the node) to the first token; decode speed is
  ``(n - 1) / (t_last - t_first)`` over the generated tokens.
* **ros** - the installed ``llm_node`` executable started as a separate process, and a client node in
  this process sending goals to ``<namespace>/generate`` (``--via topic``: publishing GenerateRequest
  on ``<namespace>/request`` and reading its chunks on ``<namespace>/tokens``). TTFT is from sending
  the goal (request) to the first chunk with text, as the client sees it; decode speed counts the
  token ids carried by the chunks after the first one over the client-side arrival times of the first
  and last chunk. The node's own statistics (from the result / final chunk) are recorded too.

Each prompt runs ``--repeats`` times per path; medians are reported per prompt, and the summary takes
the median over prompts of ``ros_tokens_per_second / raw_tokens_per_second`` and of
``ros_ttft_ms - raw_ttft_ms``. Goals (issue): ratio >= 0.98 and TTFT overhead <= 5 ms.

Only one generation runs at a time, so the paths never compete for CPU cores. By default raw and ROS
runs alternate (order flipped every repetition, a short idle pause before each run): small shared
CPUs drift in speed by tens of percent over minutes, which would otherwise land on one path only.
``--sequential`` instead runs all raw runs, frees the model, then starts the node and runs all ROS
runs. The report also gives the transport-only overhead, client-side minus node-reported numbers of
the same ROS runs (``client_minus_node_ttft_ms``, ``client_vs_node_tokens_per_second_ratio``), which
no drift affects.

CPU accounting: each run records the CPU time per token while decoding (first to last token) -
raw: this process; ros: every thread of the node process (``/proc/<pid>/task/*/schedstat``, read
when the first and the final chunk arrive) and, separately, this client process.
``ros_cpu_overhead_ms_per_token = node + client - raw`` is the CPU the ROS path adds per token. Where the
backend's compute threads already take every core, that CPU comes out of decoding, so it bounds how
close the ratio can get to 1 on this machine, whatever the drift.

Run (takes a few minutes on a 2-core CPU; ``--quick`` for a smoke run)::

    .venv/bin/python bench/bench_llm.py [--max-new-tokens 48] [--repeats 3] [--out FILE] [--quick]

The JSON report is printed on stdout and written to ``--out`` (default
``bench/results/bench_llm.json`` next to this script); progress and node logs go to stderr. DDS
discovery is kept on this machine (``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST`` unless set) and a free
``ROS_DOMAIN_ID`` is reserved with ``domain_coordinator`` (override with ``SLM_BENCH_DOMAIN_ID``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

from reporting import write_report

NAMESPACE = "/slm_bench"
MODEL = "default"
BACKEND = "transformers"
REPETITION_PENALTY = 1.1
THREADS = 0   # backend compute threads on both paths; 0 = the backend's default
NODE_PARAMS: List[str] = []   # extra name:=value parameters of the node (--node-param)
GOAL_TPS_RATIO = 0.98
GOAL_TTFT_OVERHEAD_MS = 5.0
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_llm.json"

# Prompts of increasing length (the chat template adds a ~30-token default system prompt).
PROMPTS = (
    "Hi!",
    "What is the capital of France? Answer in one sentence.",
    "Explain in a few sentences what a robot operating system is and why robots need one. "
    "Mention publish/subscribe messaging and how sensors, planners and motor controllers "
    "exchange data.",
    "You are helping a team that builds a small indoor delivery robot. The robot has a lidar, "
    "two wheel encoders, an IMU and a depth camera. It runs ROS 2 on a small ARM computer with "
    "four cores and eight gigabytes of memory. The team wants to add a tiny language model that "
    "turns spoken requests such as 'bring the red box to the kitchen' into navigation goals and "
    "object descriptions for the perception stack. They worry about latency, memory use and "
    "what happens when the model answers something unexpected. Give them three concrete pieces "
    "of advice about how to structure this system.",
)
QUICK_PROMPTS = 2


def log(message: str) -> None:
    """Progress line on stderr (stdout carries only the JSON report)."""
    print(f"[bench_llm] {message}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    """Median of ``values``; 0.0 for an empty sequence."""
    return float(statistics.median(values)) if values else 0.0


@dataclasses.dataclass
class RunResult:
    """One timed generation (either path)."""

    ttft_ms: float
    tokens_per_second: float
    completion_tokens: int
    token_ids: List[int]
    node_stats: Optional[Dict[str, float]] = None
    #: CPU time per token while decoding (first to last token): raw = this process; ros = the
    #: node process (every thread). 0.0 when fewer than two tokens came.
    cpu_ms_per_token: float = 0.0
    #: ros only: CPU time per token of this (the client's) process over the same span.
    client_cpu_ms_per_token: float = 0.0
    #: ros only: from sending the request to holding the whole answer (the goal's result, or the
    #: final chunk on ``tokens``), as the client sees it.
    answer_ms: float = 0.0
    #: ros only: the whole answer's text.
    text: str = ""


def decode_rate(tokens_after_first: int, t_first: float, t_last: float) -> float:
    """Tokens per second between the first and last arrival; 0.0 when undefined."""
    span = t_last - t_first
    return tokens_after_first / span if tokens_after_first > 0 and span > 0 else 0.0


def ms_per_token(seconds: float, tokens: int) -> float:
    """``seconds`` (of CPU time) spent on ``tokens`` tokens, in milliseconds per token; 0.0 for
    no tokens."""
    return seconds * 1e3 / tokens if tokens > 0 else 0.0


def summarise_runs(runs: Sequence[RunResult]) -> Dict[str, object]:
    """Medians (and raw samples) of a list of runs of one prompt on one path."""
    out: Dict[str, object] = {
        "ttft_ms": round(median([r.ttft_ms for r in runs]), 2),
        "tokens_per_second": round(median([r.tokens_per_second for r in runs]), 3),
        "completion_tokens": int(median([r.completion_tokens for r in runs])),
        "cpu_ms_per_token": round(median([r.cpu_ms_per_token for r in runs]), 3),
        "samples_ttft_ms": [round(r.ttft_ms, 2) for r in runs],
        "samples_tokens_per_second": [round(r.tokens_per_second, 3) for r in runs],
    }
    node = [r.node_stats for r in runs if r.node_stats]
    if node:
        out["node_ttft_ms"] = round(median([s["time_to_first_token_ms"] for s in node]), 2)
        out["node_tokens_per_second"] = round(median([s["tokens_per_second"] for s in node]), 3)
        out["node_queue_ms"] = round(median([s["queue_ms"] for s in node]), 2)
        out["prompt_tokens"] = int(node[0]["prompt_tokens"])
        out["client_cpu_ms_per_token"] = round(median([r.client_cpu_ms_per_token for r in runs]), 3)
    return out


def process_cpu_s(pid: int) -> float:
    """CPU seconds used so far by every thread of process ``pid`` (nanosecond resolution from
    ``/proc/<pid>/task/*/schedstat``, unlike the 10 ms ticks of ``/proc/<pid>/stat``); 0.0 where
    /proc does not have it."""
    total = 0
    with contextlib.suppress(OSError):
        for task in os.scandir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"{task.path}/schedstat", encoding="ascii") as f:
                    total += int(f.read().split()[0])
    return total / 1e9


# -- environment -----------------------------------------------------------------------------------

@contextlib.contextmanager
def ros_domain() -> Iterator[int]:
    """Keep DDS discovery local and reserve a ROS_DOMAIN_ID for this run (env var is set)."""
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    override = os.environ.get("SLM_BENCH_DOMAIN_ID", "").strip()
    if override:
        os.environ["ROS_DOMAIN_ID"] = override
        yield int(override)
        return
    from domain_coordinator import domain_id
    with domain_id() as reserved:
        os.environ["ROS_DOMAIN_ID"] = str(reserved)
        yield reserved


def machine_info() -> Dict[str, object]:
    """CPU, OS and library versions of this machine."""
    import torch
    import transformers
    cpu_model = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "rmw_implementation": os.environ.get("RMW_IMPLEMENTATION", "(default)"),
        "ros_domain_id": os.environ.get("ROS_DOMAIN_ID"),
        "ros_automatic_discovery_range": os.environ.get("ROS_AUTOMATIC_DISCOVERY_RANGE"),
    }


# -- raw backend -----------------------------------------------------------------------------------

class RawBench:
    """The backend loaded in this process, timing generations straight from it."""

    def __init__(self) -> None:
        from slm_ros.backends.base import BackendConfig
        from slm_ros.backends.registry import create_backend
        from slm_ros.core.session import build_messages
        from slm_ros.core.types import SamplingParams
        from slm_ros.models import resolve_model

        self._build_messages = build_messages
        self._sampling = SamplingParams
        # Resolved the way the node resolves it: llama_cpp loads the GGUF itself.
        self.resolved = resolve_model(MODEL, progress=log, prefer_gguf=BACKEND == "llama_cpp")
        self.backend = create_backend(BACKEND)
        t0 = time.monotonic()
        self.backend.load(BackendConfig(model=self.resolved.path, threads=THREADS))
        self.backend.warmup()
        log(f"raw: loaded {self.resolved.name} in {time.monotonic() - t0:.1f} s: "
            f"{self.backend.describe()}")

    def prompt_ids(self, prompt: str) -> List[int]:
        """Prompt token ids built the node's way: empty system prompt, no history."""
        return self.backend.apply_chat_template(self._build_messages("", [], prompt))

    def generate(self, prompt: str, max_new_tokens: int) -> RunResult:
        """One timed greedy generation of ``prompt``, timed from the prompt text like the node's
        path: the chat template and tokenization count towards TTFT."""
        params = self._sampling(max_new_tokens=max_new_tokens, temperature=0.0,
                                repetition_penalty=REPETITION_PENALTY)
        t0 = time.monotonic()
        return raw_once(self.backend, self.prompt_ids(prompt), params, t0)

    def close(self) -> None:
        """Free the model."""
        self.backend.close()
        gc.collect()


def raw_once(backend, prompt_ids: List[int], params, t0: Optional[float] = None) -> RunResult:
    """One timed generation straight from the backend; TTFT counts from ``t0`` (default: now)."""
    tokens: List[int] = []
    t_first = t_last = cpu_first = cpu_last = 0.0
    t0 = time.monotonic() if t0 is None else t0
    for token in backend.generate(prompt_ids, params, threading.Event()):
        t_last, cpu_last = time.monotonic(), time.process_time()
        if not tokens:
            t_first, cpu_first = t_last, cpu_last
        tokens.append(token)
    return RunResult(ttft_ms=(t_first - t0) * 1e3 if tokens else 0.0,
                     tokens_per_second=decode_rate(len(tokens) - 1, t_first, t_last),
                     completion_tokens=len(tokens), token_ids=tokens,
                     cpu_ms_per_token=ms_per_token(cpu_last - cpu_first, len(tokens) - 1))


# -- through ROS -----------------------------------------------------------------------------------

def node_command(max_new_tokens: int) -> List[str]:
    """Command line of the installed llm_node for this benchmark."""
    from slm_ros.cli import node_executable
    return [node_executable("llm_node"), "--ros-args", "-r", f"__ns:={NAMESPACE}",
            "-p", f"model:={MODEL}", "-p", f"backend:={BACKEND}",
            "-p", f"default_max_new_tokens:={max_new_tokens}",
            "-p", f"default_repetition_penalty:={REPETITION_PENALTY}",
            "-p", "max_history_turns:=0", "-p", f"threads:={THREADS}",
            *[arg for param in NODE_PARAMS for arg in ("-p", param)]]


def stop_process(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGINT, then SIGKILL if it has not exited after ``timeout_s``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        log(f"node pid {proc.pid} ignored SIGINT for {timeout_s:.0f} s; killing it")
        proc.kill()
        proc.wait()


class ChunkRecorder:
    """Client-side timings of one request's TokenChunks, in arrival order, and the CPU time the
    node process (``node_pid``) and this process used between the first and the final chunk."""

    def __init__(self, node_pid: int = 0) -> None:
        self.arrivals: List[float] = []   # client time of each chunk carrying tokens
        self.counts: List[int] = []       # tokens (or text deltas) per such chunk
        self.token_ids: List[int] = []
        self.first_text = 0.0
        self.final = None                 # the final TokenChunk once it arrived
        self.final_at = 0.0               # ... and when
        self.texts: List[str] = []        # every chunk's text delta
        self._node_pid = node_pid
        self._cpu_first: Optional[tuple] = None   # (node, client) CPU seconds at the first chunk
        self._cpu_end: Optional[tuple] = None     # ... at the final chunk

    def _cpu_now(self) -> tuple:
        return process_cpu_s(self._node_pid), time.process_time()

    def add(self, chunk) -> None:
        now = time.monotonic()
        if chunk.text and not self.first_text:
            self.first_text = now
        # A remote (openai) backend's chunks carry text but no token ids: one delta each.
        n = len(chunk.token_ids) or (1 if chunk.text and not chunk.is_final else 0)
        if n:
            if not self.arrivals:
                self._cpu_first = self._cpu_now()
            self.arrivals.append(now)
            self.counts.append(n)
            self.token_ids.extend(int(t) for t in chunk.token_ids)
        self.texts.append(chunk.text)
        if chunk.is_final:
            self.final, self.final_at = chunk, now
            self._cpu_end = self._cpu_now()

    def result(self, t_send: float, stats) -> RunResult:
        """The run's timings; ``stats`` is the node's GenerationStats of the request."""
        node_stats = {"prompt_tokens": stats.prompt_tokens,
                      "completion_tokens": stats.completion_tokens,
                      "time_to_first_token_ms": stats.time_to_first_token_ms,
                      "tokens_per_second": stats.tokens_per_second, "total_ms": stats.total_ms,
                      "queue_ms": stats.queue_ms}
        ttft = (self.first_text - t_send) * 1e3 if self.first_text else 0.0
        tps = decode_rate(sum(self.counts[1:]), self.arrivals[0], self.arrivals[-1]) \
            if self.arrivals else 0.0
        run = RunResult(ttft_ms=ttft, tokens_per_second=tps, completion_tokens=sum(self.counts),
                        token_ids=self.token_ids, node_stats=node_stats)
        if self._cpu_first is not None and self._node_pid:
            end = self._cpu_end or self._cpu_now()   # the final feedback chunk can be lost
            run.cpu_ms_per_token = ms_per_token(end[0] - self._cpu_first[0], sum(self.counts[1:]))
            run.client_cpu_ms_per_token = ms_per_token(end[1] - self._cpu_first[1],
                                                       sum(self.counts[1:]))
        return run


class _Client:
    """A ROS client node in its own context, with one executor for its life (as a real client
    keeps one spinning: building one per wait would delay the first callback, and the measured
    TTFT, by its setup)."""

    def __init__(self, namespace: str, node_pid: int = 0) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        self._rclpy = rclpy
        self.namespace = namespace
        self.node_pid = node_pid
        self._context = rclpy.Context()
        rclpy.init(context=self._context)
        self.node = rclpy.create_node("slm_bench_client", namespace=namespace, context=self._context,
                                      start_parameter_services=False, enable_rosout=False)
        self._create()
        self._executor = SingleThreadedExecutor(context=self._context)
        self._executor.add_node(self.node)

    def _create(self) -> None:
        """Create the client's entities on ``self.node``."""

    def _ready(self) -> bool:
        """True once the node's interface is reachable."""
        return True

    def wait_for_server(self, alive: Callable[[], bool], timeout_s: float) -> None:
        """Wait until the node answers; fail early if the node process died."""
        deadline = time.monotonic() + timeout_s
        while not self._ready():
            self._executor.spin_once(timeout_sec=0.2)
            if not alive():
                raise RuntimeError("the llm_node process exited before serving (see its log above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.namespace}: the llm node is not reachable after "
                                   f"{timeout_s:.0f} s")

    def _spin_until(self, done: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer within {timeout_s:.0f} s")
            self._executor.spin_once(timeout_sec=0.1)

    def close(self) -> None:
        """Destroy the client node and shut its context down."""
        self._executor.shutdown()
        self._destroy()
        self.node.destroy_node()
        self._rclpy.try_shutdown(context=self._context)

    def _destroy(self) -> None:
        """Destroy what :meth:`_create` made."""


class GenerateClient(_Client):
    """Sends Generate action goals and timestamps the feedback chunks it receives."""

    via = "action"

    def _create(self) -> None:
        from rclpy.action import ActionClient

        from slm_ros.action import Generate
        from slm_ros.ros import qos
        self._goal_type = Generate.Goal
        self._client = ActionClient(self.node, Generate, "generate",
                                    feedback_sub_qos_profile=qos.ACTION_FEEDBACK)

    def _ready(self) -> bool:
        return self._client.server_is_ready()

    def _destroy(self) -> None:
        self._client.destroy()

    def generate(self, prompt: str, max_new_tokens: int, timeout_s: float = 300.0) -> RunResult:
        """Send one greedy goal, wait for its result (and final feedback chunk), return timings."""
        goal = self._goal_type()
        fill_request(goal.request, prompt, max_new_tokens)
        chunks = ChunkRecorder(self.node_pid)
        t_send = time.monotonic()
        send = self._client.send_goal_async(
            goal, feedback_callback=lambda feedback: chunks.add(feedback.feedback.chunk))
        self._spin_until(send.done, timeout_s)
        handle = send.result()
        if not handle.accepted:
            raise RuntimeError("goal rejected by the llm node")
        result_future = handle.get_result_async()
        self._spin_until(result_future.done, timeout_s)
        t_answer = time.monotonic()
        # rclpy's action client drops feedback of a goal whose result it has already handled, so
        # the final chunk's feedback (sent before the result) can be lost when the result wins the
        # race between the two DDS topics: wait a moment for it, then go on without it.
        with contextlib.suppress(TimeoutError):
            self._spin_until(lambda: chunks.final is not None, 1.0)
        if chunks.final is None:
            log("note: the final feedback chunk did not reach the client (result came first)")
        result = result_future.result().result
        if result.finish_reason == "error":
            raise RuntimeError(f"generation failed: {result.error}")
        run = chunks.result(t_send, result.stats)
        run.answer_ms, run.text = (t_answer - t_send) * 1e3, result.text
        return run


class TopicClient(_Client):
    """Publishes GenerateRequest on ``request`` and timestamps its chunks on ``tokens``: no action
    round trip (goal request, acceptance) before generation starts."""

    via = "topic"

    def _create(self) -> None:
        from slm_ros.msg import GenerateRequest, TokenChunk
        from slm_ros.ros import qos
        self._request_type = GenerateRequest
        self._pub = self.node.create_publisher(GenerateRequest, "request", qos.COMMANDS)
        self._chunks: Dict[str, ChunkRecorder] = {}
        self._sub = self.node.create_subscription(TokenChunk, "tokens", self._on_chunk,
                                                  qos.TOKEN_STREAM)

    def _ready(self) -> bool:
        return self._pub.get_subscription_count() > 0 and \
            self.node.count_publishers(f"{self.namespace}/tokens") > 0

    def _destroy(self) -> None:
        self.node.destroy_subscription(self._sub)
        self.node.destroy_publisher(self._pub)

    def _on_chunk(self, chunk) -> None:
        recorder = self._chunks.get(chunk.request_id)
        if recorder is not None:
            recorder.add(chunk)

    def generate(self, prompt: str, max_new_tokens: int, timeout_s: float = 300.0) -> RunResult:
        """Publish one greedy request, wait for its final chunk, return timings."""
        import uuid
        msg = self._request_type()
        fill_request(msg, prompt, max_new_tokens)
        msg.request_id = f"bench-{uuid.uuid4().hex}"
        chunks = self._chunks[msg.request_id] = ChunkRecorder(self.node_pid)
        try:
            t_send = time.monotonic()
            self._pub.publish(msg)
            self._spin_until(lambda: chunks.final is not None, timeout_s)
        finally:
            del self._chunks[msg.request_id]
        if chunks.final.finish_reason == "error":
            raise RuntimeError(f"generation failed: {chunks.final.error}")
        run = chunks.result(t_send, chunks.final.stats)
        run.answer_ms, run.text = (chunks.final_at - t_send) * 1e3, "".join(chunks.texts)
        return run


#: The client classes by how they send requests (``--via``).
CLIENTS = {cls.via: cls for cls in (GenerateClient, TopicClient)}


def fill_request(request, prompt: str, max_new_tokens: int) -> None:
    """A GenerateRequest for one greedy, history-free benchmark run."""
    request.prompt = prompt
    request.reset_session = True
    request.sampling.max_new_tokens = max_new_tokens
    request.sampling.top_k = 1
    request.sampling.repetition_penalty = REPETITION_PENALTY


@contextlib.contextmanager
def ros_node(max_new_tokens: int, wait_s: float, cmd: Optional[List[str]] = None,
             namespace: str = "", via: str = "action") -> Iterator[_Client]:
    """Run llm_node (``cmd``, default :func:`node_command`, in ``namespace``, default
    ``NAMESPACE``) in its own process; yield a warmed-up client that sends its requests ``via``
    the ``generate`` action or the ``request`` topic; stop both on exit."""
    cmd = cmd or node_command(max_new_tokens)
    namespace = namespace or NAMESPACE
    log(f"ros: starting {' '.join(cmd)}")
    # Node logs go to stderr so that stdout carries only the JSON report.
    proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr)
    client = None
    try:
        client = CLIENTS[via](namespace, proc.pid)
        t0 = time.monotonic()
        client.wait_for_server(lambda: proc.poll() is None, wait_s)
        log(f"ros: node reachable ({via}) after {time.monotonic() - t0:.1f} s")
        client.generate(PROMPTS[0], 4)   # untimed: first round trip (discovery, allocations)
        yield client
    finally:
        if client is not None:
            client.close()
        stop_process(proc)


def measure(prompts: Sequence[str], max_new_tokens: int, repeats: int,
            paths: Sequence[tuple], pause_s: float) -> Dict[str, List[List[RunResult]]]:
    """Time every prompt ``repeats`` times on every path; returns runs[path][prompt index].

    With several paths the runs alternate (path order flipped every repetition) so that slow drifts
    of the machine's speed hit all paths alike. ``pause_s`` between runs lets idle thread pools of the
    previous run go to sleep before the next one starts.
    """
    runs: Dict[str, List[List[RunResult]]] = {name: [[] for _ in prompts] for name, _ in paths}
    for rep in range(repeats):
        order = list(paths) if rep % 2 == 0 else list(reversed(paths))
        for i, prompt in enumerate(prompts):
            for name, generate in order:
                time.sleep(pause_s)
                run = generate(prompt, max_new_tokens)
                runs[name][i].append(run)
                log(f"rep {rep + 1}/{repeats} prompt {i + 1}/{len(prompts)} {name}: "
                    f"TTFT {run.ttft_ms:.1f} ms, {run.tokens_per_second:.2f} tokens/s, "
                    f"{run.completion_tokens} tokens")
    return runs


def run_benchmark(args, prompts: Sequence[str]) -> Dict[str, object]:
    """Both paths, interleaved (default) or one after the other (``--sequential``)."""
    raw: Optional[RawBench] = RawBench()
    try:
        info: Dict[str, object] = {
            "model": raw.resolved.name, "backend": raw.backend.describe(),
            "prompt_tokens": [len(raw.prompt_ids(p)) for p in prompts],
            "node_command": node_command(args.max_new_tokens)}
        runs: Dict[str, List[List[RunResult]]] = {}
        if args.sequential:
            runs.update(measure(prompts, args.max_new_tokens, args.repeats,
                                [("raw", raw.generate)], args.pause))
            raw.close()   # free the model before the node loads its copy
            raw = None
        with ros_node(args.max_new_tokens, args.wait, via=args.via) as client:
            paths = [("ros", client.generate)]
            if raw is not None:
                paths.insert(0, ("raw", raw.generate))
            runs.update(measure(prompts, args.max_new_tokens, args.repeats, paths, args.pause))
    finally:
        if raw is not None:
            raw.close()
    info["runs"] = runs
    return info


# -- report ----------------------------------------------------------------------------------------

def build_report(args, prompts: Sequence[str], bench: Dict) -> Dict[str, object]:
    """Per-prompt medians and the overall comparison, as a JSON-ready dict."""
    rows = []
    for i, prompt in enumerate(prompts):
        raw_runs, ros_runs = bench["runs"]["raw"][i], bench["runs"]["ros"][i]
        r, o = summarise_runs(raw_runs), summarise_runs(ros_runs)
        ratio = o["tokens_per_second"] / r["tokens_per_second"] if r["tokens_per_second"] else 0.0
        rows.append({
            "prompt": prompt,
            "prompt_tokens": bench["prompt_tokens"][i],
            "raw": r,
            "ros": o,
            "tokens_per_second_ratio": round(ratio, 4),
            "ttft_overhead_ms": round(o["ttft_ms"] - r["ttft_ms"], 2),
            # Transport only: what the client sees minus what the node measured for the same runs.
            "client_minus_node_ttft_ms": round(median(
                [x.ttft_ms - x.node_stats["time_to_first_token_ms"] for x in ros_runs]), 2),
            "client_vs_node_tokens_per_second_ratio": round(median(
                [x.tokens_per_second / x.node_stats["tokens_per_second"]
                 for x in ros_runs if x.node_stats["tokens_per_second"]]), 4),
            "same_tokens": all(x.token_ids == raw_runs[0].token_ids for x in raw_runs + ros_runs),
            # CPU the ROS path spends per token beyond the backend's own (node + client - raw).
            "ros_cpu_overhead_ms_per_token": round(
                o["cpu_ms_per_token"] + o["client_cpu_ms_per_token"] - r["cpu_ms_per_token"], 3),
        })
    tps_ratio = median([row["tokens_per_second_ratio"] for row in rows])
    ttft_overhead = median([row["ttft_overhead_ms"] for row in rows])
    return {
        "benchmark": "slm_ros: raw backend vs llm_node through ROS 2 (client in another process)",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "model": bench["model"],
        "backend": bench["backend"],
        "params": {"max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
                   "prompts": len(prompts), "decoding": "greedy",
                   "repetition_penalty": REPETITION_PENALTY,
                   "schedule": "sequential" if args.sequential else "interleaved",
                   "pause_s": args.pause, "namespace": NAMESPACE, "via": args.via,
                   "node_command": bench["node_command"]},
        "per_prompt": rows,
        "summary": {
            "raw_tokens_per_second": round(median([r["raw"]["tokens_per_second"] for r in rows]), 3),
            "ros_tokens_per_second": round(median([r["ros"]["tokens_per_second"] for r in rows]), 3),
            "raw_ttft_ms": round(median([r["raw"]["ttft_ms"] for r in rows]), 2),
            "ros_ttft_ms": round(median([r["ros"]["ttft_ms"] for r in rows]), 2),
            "tokens_per_second_ratio": round(tps_ratio, 4),
            "ttft_overhead_ms": round(ttft_overhead, 2),
            "client_minus_node_ttft_ms": round(
                median([r["client_minus_node_ttft_ms"] for r in rows]), 2),
            "client_vs_node_tokens_per_second_ratio": round(
                median([r["client_vs_node_tokens_per_second_ratio"] for r in rows]), 4),
            "all_same_tokens": all(r["same_tokens"] for r in rows),
            "raw_cpu_ms_per_token": round(median([r["raw"]["cpu_ms_per_token"] for r in rows]), 3),
            "node_cpu_ms_per_token": round(median([r["ros"]["cpu_ms_per_token"] for r in rows]), 3),
            "client_cpu_ms_per_token": round(
                median([r["ros"]["client_cpu_ms_per_token"] for r in rows]), 3),
            "ros_cpu_overhead_ms_per_token": round(
                median([r["ros_cpu_overhead_ms_per_token"] for r in rows]), 3),
            "goal_tps_ratio": GOAL_TPS_RATIO,
            "goal_ttft_overhead_ms": GOAL_TTFT_OVERHEAD_MS,
            "goal_tps_ratio_met": tps_ratio >= GOAL_TPS_RATIO,
            "goal_ttft_overhead_met": ttft_overhead <= GOAL_TTFT_OVERHEAD_MS,
        },
    }


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-new-tokens", type=int, default=48,
                        help="tokens generated per request on both paths (default 48)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per prompt and path; medians are reported (default 3)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"JSON report file (default {DEFAULT_OUT})")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: 1 repeat, the first {QUICK_PROMPTS} prompts")
    parser.add_argument("--sequential", action="store_true",
                        help="all raw runs first (model then freed), then all ROS runs; default: "
                             "alternate raw and ROS runs so machine speed drifts hit both alike")
    parser.add_argument("--pause", type=float, default=0.3,
                        help="seconds of idle time before each timed run (default 0.3)")
    parser.add_argument("--backend", default=BACKEND,
                        help=f"backend on both paths (default {BACKEND}; llama_cpp runs the "
                             f"embedded GGUF directly)")
    parser.add_argument("--threads", type=int, default=0,
                        help="backend compute threads on both paths (0 = backend default)")
    parser.add_argument("--via", choices=tuple(CLIENTS), default="action",
                        help="how the client sends requests: Generate goals (feedback chunks) or "
                             "GenerateRequest on `request` (chunks on `tokens`); default action")
    parser.add_argument("--node-param", action="append", default=[], metavar="NAME:=VALUE",
                        help="extra llm_node parameter (repeatable), e.g. stream_interval_ms:=0")
    parser.add_argument("--wait", type=float, default=600.0,
                        help="seconds to wait for the node to load the model (default 600)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
    if args.max_new_tokens < 2 or args.repeats < 1:
        parser.error("--max-new-tokens must be >= 2 and --repeats >= 1")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    """Run both paths, print the JSON report and write it to ``--out``."""
    global BACKEND, THREADS, NODE_PARAMS
    args = parse_args(argv)
    BACKEND, THREADS, NODE_PARAMS = args.backend, args.threads, list(args.node_param)
    prompts = PROMPTS[:QUICK_PROMPTS] if args.quick else PROMPTS
    with ros_domain() as domain:
        log(f"ROS_DOMAIN_ID={domain}, ROS_AUTOMATIC_DISCOVERY_RANGE="
            f"{os.environ.get('ROS_AUTOMATIC_DISCOVERY_RANGE')}")
        bench = run_benchmark(args, prompts)
        report = build_report(args, prompts, bench)
    write_report(report, args.out)
    log(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
