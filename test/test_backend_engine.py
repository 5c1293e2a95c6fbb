"""Tier 2: the transformers backend and the engine on a tiny random-weight model (real library)."""

import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine_helpers import Collector, running_engine
from slm_ros.backends.base import BackendConfig
from slm_ros.backends.registry import create_backend
from slm_ros.core.engine import Engine, EngineConfig
from slm_ros.core.errors import BackendUnavailable, ConfigError, ModelLoadError
from slm_ros.core.types import FinishReason, Request, SamplingOverrides, SamplingParams
from slm_ros.models import resolve_model

GREEDY = SamplingParams(max_new_tokens=40, temperature=0.0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    b = create_backend("transformers")
    b.load(BackendConfig(model=tiny_model_dir, device="cpu", dtype="float32"))
    yield b
    b.close()


@pytest.fixture
def engine(backend):
    with running_engine(backend, EngineConfig(max_queue=4, defaults=GREEDY)) as e:
        yield e


def test_streamed_equals_non_streamed_greedy(backend, tiny_model_dir):
    ids = backend.apply_chat_template([{"role": "user", "content": "Describe the room."}])
    streamed = list(backend.generate(ids, GREEDY, threading.Event()))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ref = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False,
                         repetition_penalty=1.0, eos_token_id=2, pad_token_id=2)[0, len(ids):]
    assert streamed == ref.tolist()


def test_a_chat_turn_evaluates_only_its_new_tokens(backend):
    """The KV cache of the previous prompt and answer is kept: a prompt that continues it evaluates
    only its new tokens; a prompt that does not (the same question again) starts cold and gives
    the same answer (issue 14)."""
    ids = backend.apply_chat_template([{"role": "user", "content": "Describe the room."}])
    answer = list(backend.generate(ids, GREEDY, threading.Event()))
    follow_up = ids + answer + backend._tokenizer.encode(" And the door?", add_special_tokens=False)
    passes = []
    hook = backend._model.register_forward_pre_hook(
        lambda _m, _args, kwargs: passes.append(kwargs["input_ids"].shape[-1]), with_kwargs=True)
    try:
        assert list(backend.generate(follow_up, GREEDY, threading.Event()))
    finally:
        hook.remove()
    # The last answer token was sampled, never evaluated: it is evaluated with the new ones.
    assert passes[0] == len(follow_up) - (len(ids) + len(answer) - 1), (passes[0], len(follow_up))
    assert list(backend.generate(ids, GREEDY, threading.Event())) == answer


def test_engine_stream_text_equals_decode(engine, backend):
    sink = Collector()
    rid = engine.submit(Request("Describe the room.", sampling=SamplingOverrides(max_new_tokens=60)),
                        sink)
    final = sink.final(rid)
    chunks = sink.chunks[rid]
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    ids = [t for c in chunks for t in c.token_ids]
    assert sink.text(rid) == backend.decode(ids)
    assert final.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
    assert final.stats.completion_tokens == len(ids) and final.stats.prompt_tokens > 0
    for c in chunks:
        assert "\ufffd" not in c.text


def test_stream_interval_coalesces_chunks_without_losing_text(backend):
    """stream_interval_ms: the first chunk goes out at once, text generated within the interval
    rides in later chunks, the final chunk carries what is held; text and ids are the same."""
    request = Request("Describe the room.", sampling=SamplingOverrides(max_new_tokens=60))
    answers = {}
    for interval_ms in (0, 10_000):
        with running_engine(backend, EngineConfig(defaults=GREEDY,
                                                  stream_interval_ms=interval_ms)) as e:
            sink = Collector()
            rid = e.submit(request, sink)
            final = sink.final(rid)
        chunks = sink.chunks[rid]
        ids = [t for c in chunks for t in c.token_ids]
        assert [c.seq for c in chunks] == list(range(len(chunks)))
        assert final.stats.completion_tokens == len(ids)
        answers[interval_ms] = (sink.text(rid), ids, len(chunks))
    (text0, ids0, n0), (text1, ids1, n1) = answers[0], answers[10_000]
    assert (text1, ids1) == (text0, ids0)
    assert n0 > 2 and n1 == 2   # a chunk per token vs. the first chunk + the final one


def test_stream_interval_is_validated():
    with pytest.raises(ConfigError, match="stream_interval_ms"):
        EngineConfig(stream_interval_ms=-1)


def test_cancel_stops_within_one_token(backend):
    ids = backend.apply_chat_template([{"role": "user", "content": "go"}])
    cancel = threading.Event()
    got = []
    for token in backend.generate(ids, SamplingParams(max_new_tokens=2000, repetition_penalty=1.0),
                                  cancel):
        got.append(token)
        if len(got) == 5:
            cancel.set()
    assert 5 <= len(got) <= 6


def test_engine_cancel_running_and_queued(engine):
    sink = Collector()
    long = SamplingOverrides(max_new_tokens=3000)
    running = engine.submit(Request("a", sampling=long), sink)
    queued = engine.submit(Request("b", sampling=long), sink)
    deadline = time.monotonic() + 10
    while not sink.chunks.get(running) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.cancel(queued) and engine.cancel(running)
    assert sink.final(queued).finish_reason == FinishReason.CANCELLED
    assert sink.final(running).finish_reason == FinishReason.CANCELLED
    assert sink.final(running).stats.completion_tokens < 3000
    assert not engine.cancel("no-such-request")


def test_engine_queue_full_and_duplicate_id(engine):
    sink = Collector()
    long = SamplingOverrides(max_new_tokens=3000)
    ids = [engine.submit(Request("x", request_id="r0", sampling=long), sink)]
    deadline = time.monotonic() + 10
    while not engine.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    ids += [engine.submit(Request("x", request_id=f"r{i}", sampling=long), sink) for i in range(1, 6)]
    # one running + max_queue (4) waiting; the sixth is refused at once
    assert sink.final("r5").error.startswith("queue full")
    dup = Collector()
    refused = engine.submit(Request("x", request_id="r1", sampling=long), dup)
    # Refused under an id of its own: r1's stream stays r1's.
    assert refused.startswith("r1#duplicate-") and list(dup.chunks) == [refused]
    assert "duplicate request_id 'r1'" in dup.final(refused).error
    for rid in ids[:5]:
        engine.cancel(rid)
    for rid in ids:
        sink.final(rid)
    time.sleep(0.1)
    for rid in ids:
        assert len([c for c in sink.chunks[rid] if c.is_final]) == 1


def test_request_timeout_stops_running_and_waiting_requests(backend):
    config = EngineConfig(max_queue=4, defaults=GREEDY, request_timeout_s=0.5)
    long = SamplingOverrides(max_new_tokens=100_000)
    with running_engine(backend, config) as e:
        sink = Collector(timeout=30)
        running = e.submit(Request("count forever", sampling=long), sink)
        waiting = e.submit(Request("count forever", sampling=long), sink)
        for rid, where in ((running, "passed"), (waiting, "passed while it waited")):
            final = sink.final(rid)
            assert final.finish_reason is FinishReason.ERROR, final
            assert f"request_timeout_s (0.5 s) {where}" in final.error, final.error
        assert [c.seq for c in sink.chunks[running]] == list(range(len(sink.chunks[running])))
        ok = e.submit(Request("hi", sampling=SamplingOverrides(max_new_tokens=3)), sink)
        assert sink.final(ok).finish_reason in (FinishReason.LENGTH, FinishReason.STOP)


def test_engine_bad_requests_get_error_chunks_and_engine_keeps_serving(backend):
    with running_engine(backend, EngineConfig(defaults=GREEDY, max_context_tokens=64)) as e:
        sink = Collector()
        empty = e.submit(Request("   "), sink)
        assert "empty prompt" in sink.final(empty).error
        too_long = e.submit(Request("word " * 200), sink)
        assert "prompt is too long" in sink.final(too_long).error
        ok = e.submit(Request("hi", sampling=SamplingOverrides(max_new_tokens=5)), sink)
        assert sink.final(ok).finish_reason in (FinishReason.LENGTH, FinishReason.STOP)


def test_engine_stop_answers_every_pending_request(backend):
    e = Engine(backend, EngineConfig(defaults=GREEDY, max_queue=8))
    e.start()
    sink = Collector()
    rids = [e.submit(Request("x", sampling=SamplingOverrides(max_new_tokens=3000)), sink)
            for _ in range(3)]
    time.sleep(0.2)
    e.stop("test shutdown")
    for rid in rids:
        final = sink.final(rid)
        assert final.finish_reason == FinishReason.ERROR and "test shutdown" in final.error
    late = e.submit(Request("y"), sink)
    assert "not running" in sink.final(late).error


def test_sessions_remember_and_reset(engine, backend):
    sink = Collector()
    first = engine.submit(Request("first question", session_id="s1",
                                  sampling=SamplingOverrides(max_new_tokens=3)), sink)
    p1 = sink.final(first).stats.prompt_tokens
    second = engine.submit(Request("second", session_id="s1",
                                   sampling=SamplingOverrides(max_new_tokens=3)), sink)
    p2 = sink.final(second).stats.prompt_tokens
    assert p2 > p1  # history included
    third = engine.submit(Request("second", session_id="s1", reset_session=True,
                                  sampling=SamplingOverrides(max_new_tokens=3)), sink)
    other = engine.submit(Request("second", session_id="s2",
                                  sampling=SamplingOverrides(max_new_tokens=3)), sink)
    assert sink.final(third).stats.prompt_tokens == sink.final(other).stats.prompt_tokens < p2


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="unknown text backend 'nope'"):
        create_backend("nope")
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        resolve_model(str(tmp_path / "weights.bin"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no_such_architecture"}')
    with pytest.raises(ModelLoadError, match="transformers could not load"):
        create_backend("transformers").load(BackendConfig(model=str(broken)))


def test_cuda_device_gate():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the 'no GPU' error cannot be produced here")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        from slm_ros.backends.transformers_backend import resolve_device
        resolve_device("cuda")
    assert isinstance(BackendUnavailable("x"), Exception)
