"""Tier 2: a cancel that arrives while the prompt is being evaluated (the prefill) takes effect
within a fraction of a second, on the embedded SmolLM2-135M with llama_cpp (GGUF) and with
transformers, alone and under the core engine (cancel, and stop() as on deactivate).

A ~3,000-token prompt takes 7-25 s to prefill on a 2-core CPU; before the fix, a cancel waited for
all of it. The issue asks for 250 ms; the asserts allow 1 s for a loaded CI machine and the
measured figures are printed (``pytest -s``)."""

import threading
import time

import pytest

from engine_helpers import Collector, running_engine
from slm_ros.backends.base import BackendConfig
from slm_ros.backends.registry import create_backend
from slm_ros.core.engine import EngineConfig
from slm_ros.core.errors import BackendUnavailable
from slm_ros.core.types import FinishReason, Request, SamplingParams

#: About 3,000 tokens with SmolLM2's tokenizer and chat template.
LONG_PROMPT = " ".join(f"Robot {i} moved box {i * 7 % 13} to shelf {i % 5}." for i in range(215))
SHORT_PROMPT = "What is the capital of France?"
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0)
FIRST_TOKEN = SamplingParams(max_new_tokens=1, temperature=0.0, repetition_penalty=1.0)
#: When the cancel comes, counted from the start of generation: well inside the prefill.
CANCEL_AFTER_S = 0.3
#: The issue's 250 ms, with slack for a loaded 2-core machine.
LATENCY_LIMIT_S = 1.0

BACKENDS = ["llama_cpp", "transformers"]


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, default_model_dir):
    name = request.param
    try:
        b = create_backend(name)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    if name == "llama_cpp":
        from slm_ros.models import embedded_gguf
        # The GGUF's trained context is 8192 tokens: the long prompt fits.
        config = BackendConfig(model=str(embedded_gguf()), device="cpu", max_context_tokens=8192)
    else:
        config = BackendConfig(model=default_model_dir, device="cpu")
    b.load(config)
    yield b
    b.close()


def _ids(backend, prompt):
    return backend.apply_chat_template([{"role": "user", "content": prompt}])


def _generate_and_cancel(backend, ids, params, after_s):
    """Generate ``ids`` on a thread, cancel ``after_s`` later; (tokens, seconds from the cancel to
    generate returning, the exception it raised or None)."""
    cancel = threading.Event()
    tokens, ended, errors = [], [], []

    def consume():
        try:
            for token in backend.generate(ids, params, cancel):
                tokens.append(token)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        ended.append(time.monotonic())

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    time.sleep(after_s)
    t_cancel = time.monotonic()
    cancel.set()
    thread.join(timeout=120)
    assert not thread.is_alive(), "generate did not return after the cancel"
    return tokens, ended[0] - t_cancel, errors[0] if errors else None


def _generator_threads():
    return [t for t in threading.enumerate() if t.name.startswith("slm-transformers")]


def test_cancel_during_prefill_stops_at_once(backend):
    name = backend.name
    ids = _ids(backend, LONG_PROMPT)
    assert 2900 <= len(ids) <= 4000, len(ids)
    # How long the prefill takes when nobody cancels (generating one token = evaluating the prompt).
    t0 = time.monotonic()
    assert len(list(backend.generate(ids, FIRST_TOKEN, threading.Event()))) == 1
    prefill_s = time.monotonic() - t0
    print(f"\n{name}: uncancelled prefill of {len(ids)} tokens: {prefill_s:.2f} s")
    assert prefill_s > 4 * CANCEL_AFTER_S, "the prefill is too short for this test to mean anything"

    short = _ids(backend, SHORT_PROMPT)
    reference = list(backend.generate(short, GREEDY, threading.Event()))
    assert reference
    latencies = []
    for after_s in (CANCEL_AFTER_S, 1.1):
        tokens, latency, error = _generate_and_cancel(backend, ids, GREEDY, after_s)
        latencies.append(latency)
        print(f"{name}: cancel {after_s:.1f} s into the prefill: generate returned "
              f"{latency * 1e3:.0f} ms later")
        assert error is None, f"a cancelled generation must end quietly, it raised {error!r}"
        assert tokens == [], "no token may come after a cancel during the prefill"
        assert latency < LATENCY_LIMIT_S, f"{latency:.2f} s from the cancel to the end"
        assert not _generator_threads()
        # Nothing of the abandoned prefill is left behind: the same greedy answer as before.
        assert list(backend.generate(short, GREEDY, threading.Event())) == reference
    if name == "transformers":
        # The interrupt hooks live only as long as one generate call.
        model = backend._model
        assert not any(m._forward_pre_hooks for m in model.modules())


def test_engine_cancel_and_stop_during_prefill(backend):
    config = EngineConfig(max_queue=4, defaults=GREEDY)
    with running_engine(backend, config) as engine:
        sink = Collector(timeout=120)
        # Cancel (as from the action or the topic).
        rid = engine.submit(Request(prompt=LONG_PROMPT, session_id="a"), sink)
        _wait_busy(engine)
        time.sleep(CANCEL_AFTER_S)
        t_cancel = time.monotonic()
        assert engine.cancel(rid)
        final = sink.final(rid)
        latency = time.monotonic() - t_cancel
        print(f"\n{backend.name}: engine cancel during the prefill: final chunk "
              f"{latency * 1e3:.0f} ms later")
        assert final.finish_reason is FinishReason.CANCELLED, final
        assert latency < LATENCY_LIMIT_S
        # The engine answers the next request.
        rid2 = engine.submit(Request(prompt=SHORT_PROMPT, session_id="b"), sink)
        assert sink.final(rid2).finish_reason in (FinishReason.STOP, FinishReason.LENGTH)

        # stop() (deactivate, shutdown) during the prefill.
        rid3 = engine.submit(Request(prompt=LONG_PROMPT, session_id="c"), sink)
        _wait_busy(engine)
        time.sleep(CANCEL_AFTER_S)
        t_stop = time.monotonic()
        engine.stop("deactivated")
        stop_s = time.monotonic() - t_stop
        print(f"{backend.name}: engine.stop() during the prefill returned after "
              f"{stop_s * 1e3:.0f} ms")
        assert stop_s < LATENCY_LIMIT_S
    for r in (rid, rid3):
        finals = [c for c in sink.chunks[r] if c.is_final]
        assert len(finals) == 1, finals
        assert not any(c.token_ids for c in sink.chunks[r] if not c.is_final)
    stopped = [c for c in sink.chunks[rid3] if c.is_final][0]
    assert stopped.finish_reason is FinishReason.ERROR and "deactivated" in stopped.error


def _wait_busy(engine, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not engine.busy:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.005)
