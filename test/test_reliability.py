"""Reliability suite (``-m reliability``): an llm_node process under a flood of clients, random
cancels, a client killed mid-stream, a burst of garbage prompts, and kill -9 of the engine builder and
of the LLM node. Real DDS on loopback, the real embedded SmolLM2 on llama.cpp. Every scenario checks
that nothing is lost (every request ends with exactly one final chunk, seq without gaps) and that the
node then answers a fresh question correctly: exactly as the core engine does in this process on the
same model and settings (greedy text depends on the CPU llama.cpp was compiled for, so no wording is
assumed). The figures are printed (``-s`` shows them).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from std_msgs.msg import String

from engine_helpers import reference_text
from ros_helpers import (LlmClient, NodeProcess, _die_with_parent, assert_stream_ok, served_by,
                         wait_future)

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the suite runs the "
                                        "embedded model on llama.cpp)")
pytestmark = pytest.mark.reliability

CLIENT = Path(__file__).with_name("reliability_client.py")
MAX_QUEUE = 16
STATUS_SUCCEEDED, STATUS_CANCELED, STATUS_ABORTED = 4, 5, 6
NODE_PARAMS = dict(backend="llama_cpp", model="default", max_queue=MAX_QUEUE,
                   default_max_new_tokens=12, max_context_tokens=1024, max_history_turns=2)
FRESH_PROMPT = "What is the capital of France?"
FRESH_TOKENS = 32


def figures(name: str, **numbers) -> None:
    print(f"\n[reliability] {name}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One llm_node shared by the scenarios that do not kill it, and a client in this process."""
    from domain_coordinator import domain_id as reserve
    with reserve() as did:
        log = tmp_path_factory.mktemp("reliability") / "llm_node.log"
        node = NodeProcess(did, log, **NODE_PARAMS)
        assert node.wait_for_log("active: serving", 120), node.log()
        with served_by(node, LlmClient) as client:
            client.expected = expected_answer(NODE_PARAMS["max_context_tokens"])
            yield did, node, client
        assert "Traceback" not in log.read_text(), log.read_text()


def expected_answer(max_context_tokens: int, model: str = "") -> str:
    """The core engine's answer to the fresh question in this process: ``model`` (default: the
    embedded GGUF) on llama.cpp with the node's engine settings."""
    from slm_ros.core.engine import EngineConfig
    from slm_ros.core.types import SamplingOverrides, SamplingParams
    from slm_ros.models import embedded_gguf
    return reference_text(model or str(embedded_gguf()), FRESH_PROMPT,
                          EngineConfig(defaults=SamplingParams(max_new_tokens=12)),
                          SamplingOverrides(max_new_tokens=FRESH_TOKENS),
                          max_context_tokens=max_context_tokens)


def assert_answers_fresh(client: LlmClient) -> str:
    """A new session asking the fresh question gets a whole answer, the same as the core engine's
    (``client.expected``)."""
    rid = f"fresh-{uuid.uuid4().hex[:8]}"
    client.request(FRESH_PROMPT, rid, session_id=rid, reset_session=True,
                   sampling={"max_new_tokens": FRESH_TOKENS})
    final = client.wait_final(rid, 60)
    text = assert_stream_ok(client.chunks[rid])
    assert final.finish_reason in ("stop", "length"), final.error
    assert text.strip() and text == client.expected, (text, client.expected)
    return text


def start_client(did: int, tmp_path: Path, mode: str, tag: str, **options) -> subprocess.Popen:
    cmd = [sys.executable, str(CLIENT), mode, "--tag", tag]
    for key, value in options.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ, ROS_DOMAIN_ID=str(did), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
    return subprocess.Popen(cmd, env=env, cwd=str(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=_die_with_parent)


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"client exited early:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, f"{path.name} not written within {timeout} s"
        time.sleep(0.05)


# --------------------------------------------------------------------------------------- scenarios

def test_100_requests_from_4_client_processes_at_once(served, tmp_path):
    did, node, client = served
    go = tmp_path / "go"
    procs = [start_client(did, tmp_path, "flood", f"c{i}", count=25, out=tmp_path / f"c{i}.json",
                          ready_file=tmp_path / f"ready{i}", start_file=go) for i in range(4)]
    try:
        for i, proc in enumerate(procs):
            wait_for_file(tmp_path / f"ready{i}", proc)
        t0 = time.monotonic()
        go.write_text("go")
        for proc in procs:
            out, _ = proc.communicate(timeout=180)
            assert proc.returncode == 0, out
        elapsed = time.monotonic() - t0
    finally:
        for proc in procs:
            proc.kill()
    requests = [r for i in range(4)
                for r in json.loads((tmp_path / f"c{i}.json").read_text())["requests"]]
    assert len(requests) == 100
    served_ok = rejected = 0
    for r in requests:
        assert r["finals"] == 1 and r["final_is_last"], r
        assert r["seqs"] == list(range(len(r["seqs"]))), r
        if r["finish_reason"] == "error":
            assert "queue full" in r["error"], r
            rejected += 1
        else:
            assert r["finish_reason"] in ("stop", "length") and r["text"], r
            served_ok += 1
        if r["path"] == "action":
            result = r["result"]
            assert result["finish_reason"] == r["finish_reason"] and result["text"] == r["text"], r
            ok = r["finish_reason"] != "error"
            assert result["status"] == (STATUS_SUCCEEDED if ok else STATUS_ABORTED), r
    # At least the queue plus the running request were served; the rest were refused explicitly.
    assert served_ok >= MAX_QUEUE + 1 and served_ok + rejected == 100
    figures("flood", requests=100, served=served_ok, rejected_queue_full=rejected, lost=0,
            final_chunks=sum(r["finals"] for r in requests), seconds=round(elapsed, 1))
    assert_answers_fresh(client)


def test_50_cancels_at_random_points(served):
    _, node, client = served
    rng = random.Random(50)
    outcomes = {"cancelled": 0, "completed": 0}
    t0 = time.monotonic()
    # Waves of 5 (goals and topic requests mixed): when a cancel lands, its request may be queued,
    # streaming or already finished.
    for wave in range(10):
        pending = []
        for k in range(5):
            prompt = f"Tell me a long story number {wave * 5 + k}."
            if (wave + k) % 2:
                pending.append(("action", client.send_goal(prompt, max_new_tokens=16)))
            else:
                rid = f"cancel-{wave}-{k}-{uuid.uuid4().hex[:6]}"
                client.request(prompt, rid, session_id=rid, sampling={"max_new_tokens": 16})
                pending.append(("topic", rid))
        for path, target in rng.sample(pending, len(pending)):
            time.sleep(rng.uniform(0.0, 0.3))
            if path == "action":
                wait_future(target.cancel_goal_async())
            else:
                client.cancel_pub.publish(String(data=target))
        for path, target in pending:
            if path == "action":
                response = wait_future(target.get_result_async(), timeout=60)
                reason = response.result.finish_reason
                assert (response.status, reason) in ((STATUS_CANCELED, "cancelled"),
                                                     (STATUS_SUCCEEDED, "stop"),
                                                     (STATUS_SUCCEEDED, "length")), response
                rid = response.result.request_id
            else:
                rid = target
            final = client.wait_final(rid, 60)
            assert final.finish_reason in ("cancelled", "stop", "length"), final
            assert_stream_ok(client.chunks[rid])
            outcomes["cancelled" if final.finish_reason == "cancelled" else "completed"] += 1
    assert sum(outcomes.values()) == 50 and outcomes["cancelled"] > 0
    figures("cancels", requests=50, **outcomes, hung=0, seconds=round(time.monotonic() - t0, 1))
    assert_answers_fresh(client)


def test_client_killed_mid_stream(served, tmp_path):
    did, node, client = served
    proc = start_client(did, tmp_path, "hold", "gone", max_new_tokens=100,
                        ready_file=tmp_path / "streaming")
    try:
        wait_for_file(tmp_path / "streaming", proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
    # Its goal and its topic request still run to their single final chunk (the goal may be
    # cancelled once the node sees its client gone); the node stays up.
    for rid in ("gone-goal", "gone-topic"):
        final = client.wait_final(rid, 90)
        assert final.finish_reason in ("stop", "length", "cancelled"), final
        assert_stream_ok(client.chunks[rid])
    assert node.proc.poll() is None
    figures("client killed", requests=2, finished=2, node_alive=True)
    assert_answers_fresh(client)


def test_burst_of_1000_empty_and_garbage_prompts(served):
    _, node, client = served
    rng = random.Random(1000)
    prompts = []
    for i in range(1000):
        kind = i % 100
        if kind == 0:     # random code points (no surrogates: not valid UTF-8)
            prompts.append("".join(chr(rng.choice([rng.randrange(32, 0xD7FF),
                                                   rng.randrange(0xE000, 0x10FFFF)]))
                                   for _ in range(rng.randrange(1, 40))))
        elif kind == 1:   # control characters around text
            prompts.append("\x01\x02robot\x7f\x1b[0m")
        elif kind == 2:   # far longer than the context
            prompts.append("word " * 3000)
        elif kind == 3:   # an embedded NUL: the wire format truncates the string there
            prompts.append("\x00hidden")
        else:             # empty or whitespace only
            prompts.append(rng.choice(["", " ", "\n", "\t \r\n", "   "]))
    before = set(client.chunks)
    t0 = time.monotonic()
    for text in prompts:
        client.prompt_pub.publish(String(data=text))

    def new_finals():
        return [cs[-1] for rid, cs in list(client.chunks.items())
                if rid not in before and cs and cs[-1].is_final]

    arrived = client.wait_for(lambda: len(new_finals()) >= 1000, 120)
    finals = new_finals()
    elapsed = time.monotonic() - t0
    errors = {}
    for chunk in finals:
        key = chunk.error.split(":")[0] if chunk.finish_reason == "error" else chunk.finish_reason
        errors[key] = errors.get(key, 0) + 1
    figures("garbage burst", published=1000, final_chunks=len(finals), by_outcome=errors,
            seconds=round(elapsed, 1))
    assert arrived and len(finals) == 1000, f"{len(finals)} final chunks of 1000: {errors}"
    for rid in set(client.chunks) - before:
        assert_stream_ok(client.chunks[rid])
    empty = sum(1 for p in prompts if not p.split("\x00")[0].strip())
    assert errors.get("empty prompt", 0) == empty
    assert errors.get("prompt is too long", 0) + errors.get("queue full", 0) >= 1
    assert node.proc.poll() is None
    assert_answers_fresh(client)


def test_kill_9_of_engine_builder_and_llm_node(tmp_path, domain_id):
    """The builder killed mid-build publishes nothing and rebuilds on its next start; the LLM node
    killed mid-stream serves the same artifact again after a restart, which the cache still has."""
    from test_ros_engine_builder import StatusClient, _builder
    from slm_ros.build.builder import Builder
    from slm_ros.build.spec import BuildSpec
    from slm_ros.models import embedded_gguf

    cache = tmp_path / "cache"
    build = dict(backend="llama_cpp", quantization="q6_k")
    status = StatusClient(domain_id)
    nodes = []
    try:
        builder = _builder(domain_id, tmp_path, cache, "default", **build)
        nodes.append(builder)
        deadline = time.monotonic() + 90
        while not any(s.phase == "quantize" for s in status.statuses):
            assert time.monotonic() < deadline and builder.proc.poll() is None, builder.log()
            time.sleep(0.01)
        builder.proc.send_signal(signal.SIGKILL)
        builder.proc.wait(timeout=10)
        assert not list(cache.glob("*/manifest.json")), "a killed build published an artifact"

        builder = _builder(domain_id, tmp_path, cache, "default", **build)
        nodes.append(builder)
        final = status.wait_final(120)
        assert final.state == "READY" and not final.cache_hit, final.error
        artifact = Path(final.artifact_path)
        files = {p.name: p.stat().st_size for p in artifact.iterdir()}

        kills = 0
        for attempt in range(2):
            llm = NodeProcess(domain_id, tmp_path / f"llm{attempt}.log", wait_for_builder=True,
                              builder_timeout_s=60.0, default_max_new_tokens=200)
            nodes.append(llm)
            assert llm.wait_for_log("active: serving", 90), llm.log()
            assert "with backend llama_cpp" in llm.log()
            client = LlmClient(domain_id)
            try:
                client.wait_ready()
                if attempt == 0:   # kill -9 while it streams
                    rid = f"doomed-{uuid.uuid4().hex[:6]}"
                    client.request("Write a long story about a robot.", rid, session_id=rid)
                    assert client.wait_for(lambda: len(client.chunks.get(rid, ())) >= 3, 60)
                    llm.proc.send_signal(signal.SIGKILL)
                    llm.proc.wait(timeout=10)
                    kills += 1
                else:
                    client.expected = expected_answer(0, model=str(
                        next(artifact.glob("*.gguf"))))
                    assert_answers_fresh(client)
            finally:
                client.close()
        # The artifact is untouched and still a cache hit, with no lock left behind.
        assert {p.name: p.stat().st_size for p in artifact.iterdir()} == files
        spec = BuildSpec(model=str(embedded_gguf()), dtype="float32", max_input_len=256,
                         max_seq_len=512, **build)
        again = Builder(cache).build(spec, cancel=None)
        assert again.cache_hit and again.path == artifact
        figures("kill -9", builder_kills=1, rebuilt=True, llm_kills=kills, recovered=True)
    finally:
        status.close()
        for node in nodes:
            node.stop()
