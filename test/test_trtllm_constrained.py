"""Constrained output on the tensorrt_llm backend, against the stand-in of each API line (issue 13).

1.x: the adapter opens the engine with ``guided_decoding_backend="xgrammar"`` (and its tokenizer) and
sends one ``GuidedDecodingParams`` guide per request. 0.12 has no guided decoding: the adapter
registers named logits post-processors (slots) that apply slm_ros's llguidance mask. The stand-in
"generates" from random logits, masked by what the adapter gave it (the post-processor on 0.12, the
guide on 1.x, emulated with llguidance), so valid output proves the constraint reached the library.
Keywords are checked against the recorded surface, guided-decoding additions included
(test/data/tensorrt_llm_guided_api.json).
"""

import json
import threading
import time
import uuid
from pathlib import Path

import jsonschema
import pytest

pytest.importorskip("llguidance", reason="llguidance (the grammar engine) is not installed")

import trtllm_standin  # noqa: E402
from engine_helpers import Collector, running_engine  # noqa: E402
from slm_ros.backends import trtllm_adapter as adapter  # noqa: E402
from slm_ros.backends.base import BackendConfig  # noqa: E402
from slm_ros.backends.tensorrt_llm_backend import TensorRtLlmBackend  # noqa: E402
from slm_ros.core.constraints import ResponseFormat, Tool  # noqa: E402
from slm_ros.core.engine import EngineConfig  # noqa: E402
from slm_ros.core.types import FinishReason, Request, SamplingParams  # noqa: E402
from test_trtllm_backend import build, hf_dir, on_orin  # noqa: E402,F401 - fixtures

SHARED_GUIDED = Path("/work/shared/reference/tensorrt_llm_guided_api.json")
COMMAND = {
    "type": "object",
    "properties": {"action": {"enum": ["move", "turn", "stop"]},
                   "speed": {"type": "integer", "minimum": 1, "maximum": 3},
                   "lights": {"type": "boolean"}},
    "required": ["action", "speed", "lights"], "additionalProperties": False,
}
TOOLS = (Tool("drive", "Drive forward.", json.dumps(
    {"type": "object", "properties": {"meters": {"type": "integer", "minimum": 0, "maximum": 9}},
     "required": ["meters"], "additionalProperties": False})),
    Tool("stop", "Stop.", json.dumps({"type": "object", "properties": {},
                                      "additionalProperties": False})))
SETTINGS = SamplingParams(max_new_tokens=48, temperature=0.0, repetition_penalty=1.0)


@pytest.fixture(params=("0.12", "1.x"))
def trt(request, monkeypatch):
    return trtllm_standin.install(request.param, monkeypatch)


@pytest.fixture
def engine(trt, hf_dir, tmp_path, on_orin):  # noqa: F811 - pytest fixtures
    out, _, _ = build(hf_dir, tmp_path)
    backend = TensorRtLlmBackend()
    backend.load(BackendConfig(model=str(out)))
    with running_engine(backend, EngineConfig(defaults=SETTINGS)) as running:
        yield running
    backend.close()


def ask(engine, fmt=None, tools=(), choice="", prompt="Go!", timeout=60.0):
    sink = Collector(timeout=timeout)
    rid = engine.submit(Request(prompt=prompt, session_id=uuid.uuid4().hex, response_format=fmt,
                                tools=tools, tool_choice=choice), sink)
    final = sink.final(rid)
    return sink.text(rid), final, sink.chunks[rid]


def sampling_calls(trt):
    return trt.__stand_in_state__.calls_to("SamplingParams")


# -- the record ------------------------------------------------------------------------------------


def test_guided_record_is_the_shared_reference():
    if not SHARED_GUIDED.exists():
        pytest.skip(f"{SHARED_GUIDED} is not on this machine")
    assert json.loads(SHARED_GUIDED.read_text()) == \
        trtllm_standin.load_record(trtllm_standin.GUIDED_DATA)


def test_guided_surface_is_read_from_the_record():
    added = trtllm_standin.guided_additions("1.x")
    assert added["guided_fields"] == ("json", "regex", "grammar", "json_object", "structural_tag")
    assert added["engine_backends"] == ("xgrammar",) and "llguidance" in added["backends"]
    assert added["engine_forbidden"] == ("structural_tag",)
    surface = trtllm_standin.surface("1.x")
    assert "guided_decoding_backend" in surface.handles["LLM"].init.params
    assert "tensorrt_llm.llmapi.GuidedDecodingParams" in surface.entries
    assert "logits_post_processor_map" in trtllm_standin.surface("0.12").handles["LLM"].init.params
    assert trtllm_standin.guided_additions("0.12")["callback"].startswith("fn(req_id")


def test_stand_in_refuses_what_the_library_refuses(monkeypatch, hf_dir, tmp_path, on_orin):  # noqa: F811
    trt = trtllm_standin.install("1.x", monkeypatch)
    out, _, _ = build(hf_dir, tmp_path)
    from tensorrt_llm._tensorrt_engine import LLM
    from tensorrt_llm.llmapi import GuidedDecodingParams
    with pytest.raises(ValueError, match="Only one guide"):
        GuidedDecodingParams(json="{}", regex="a")
    with pytest.raises(ValueError, match="Unsupported guided decoding backend llguidance"):
        LLM(model=str(out), guided_decoding_backend="llguidance")
    with pytest.raises(RuntimeError, match="tokenizer"):
        LLM(model=str(out), skip_tokenizer_init=True, guided_decoding_backend="xgrammar")
    assert trt.__stand_in_line__ == "1.x"


# -- constrained requests through the engine -------------------------------------------------------


def test_schema_output_validates_on_both_lines(trt, engine):
    fmt = ResponseFormat("json_schema", json.dumps(COMMAND))
    for prompt in ("Go!", "Turn around.", "Stop with the lights on."):
        text, final, chunks = ask(engine, fmt, prompt=prompt)
        assert final.finish_reason is FinishReason.STOP, (text, final.error)
        jsonschema.validate(json.loads(text), COMMAND)
        assert "".join(c.text for c in chunks) == text
    sent = sampling_calls(trt)[-1]
    if trt.__stand_in_line__ == "1.x":
        guide = sent["guided_decoding"]
        assert json.loads(guide.json) == COMMAND and not guide.regex and not guide.grammar
    else:
        assert sent["logits_post_processor_name"].startswith(adapter.LogitsSlots.PREFIX)


def test_free_text_requests_stay_unconstrained(trt, engine):
    text, final, _ = ask(engine)
    assert final.finish_reason is FinishReason.LENGTH and text
    sent = sampling_calls(trt)[-1]
    assert sent.get("guided_decoding") is None and sent.get("logits_post_processor_name") is None


def test_regex_and_grammar_on_both_lines(trt, engine):
    text, final, _ = ask(engine, ResponseFormat("regex", "(yes|no), [0-9]{1,2}"))
    assert final.finish_reason is FinishReason.STOP and not final.error, final.error
    assert text.split(", ")[0] in ("yes", "no") and text.split(", ")[1].isdigit()
    gbnf = 'root ::= "go " dir\ndir ::= "left" | "right" | "ahead"'
    text, final, _ = ask(engine, ResponseFormat("grammar", gbnf))
    assert final.finish_reason is FinishReason.STOP and text in ("go left", "go right", "go ahead")
    if trt.__stand_in_line__ == "1.x":
        assert sampling_calls(trt)[-1]["guided_decoding"].grammar == gbnf


def test_required_tool_call_on_both_lines(trt, engine):
    text, final, _ = ask(engine, tools=TOOLS, choice="required")
    assert final.finish_reason is FinishReason.STOP and not final.error, final.error
    (call,) = final.tool_calls
    assert call.name in ("drive", "stop") and json.loads(text)["name"] == call.name


def test_auto_tools_work_on_0_12_and_are_refused_on_1x_with_the_reason(trt, engine):
    text, final, _ = ask(engine, tools=TOOLS)
    if trt.__stand_in_line__ == "0.12":   # random logits: plain text (to the limit) or one call
        assert not final.error, final.error
        assert final.tool_calls or (final.finish_reason is FinishReason.LENGTH
                                    and not text.startswith("<"))
    else:
        assert final.finish_reason is FinishReason.ERROR
        assert "tool_choice auto" in final.error and "required" in final.error


def test_post_processor_errors_end_the_request_not_the_engine(monkeypatch, hf_dir, tmp_path,  # noqa: F811
                                                            on_orin):
    trtllm_standin.install("0.12", monkeypatch)
    out, _, _ = build(hf_dir, tmp_path)
    backend = TensorRtLlmBackend()
    backend.load(BackendConfig(model=str(out)))
    try:
        def broken(_ids):
            raise ValueError("mask failed")
        runtime = backend._runtime
        ended = []
        job = adapter.StreamJob(prompt_ids=(5, 6, 7), max_new_tokens=8, end_id=2, pad_id=2,
                                emit=ended.append, should_stop=lambda: False,
                                allowed_tokens=broken)
        end = runtime.stream(job)
        # Only end_id was left: the request ended at once, and the reason was kept.
        assert end.produced == 0 and ended == []
        assert runtime.processor_errors == ["ValueError: mask failed"]
        assert len(runtime._slots._free) == adapter.LogitsSlots.COUNT
    finally:
        backend.close()


def test_cancel_on_0_12_frees_the_slot_once_the_request_ran_out(monkeypatch, hf_dir, tmp_path,  # noqa: F811
                                                               on_orin):
    trt = trtllm_standin.install("0.12", monkeypatch)
    trt.__stand_in_state__.step_delay_s = 0.01
    out, _, _ = build(hf_dir, tmp_path)
    backend = TensorRtLlmBackend()
    backend.load(BackendConfig(model=str(out)))
    try:
        fmt = ResponseFormat("regex", "[a-z ]{40,60}")
        with running_engine(backend, EngineConfig(defaults=SETTINGS)) as engine:
            sink = Collector(timeout=30)
            rid = engine.submit(Request(prompt="Talk.", response_format=fmt), sink)
            deadline = time.monotonic() + 10
            while not "".join(c.text for c in sink.chunks.get(rid, ())) and time.monotonic() < deadline:
                time.sleep(0.01)
            engine.cancel(rid)
            final = sink.final(rid)
            assert final.finish_reason is FinishReason.CANCELLED
            slots = backend._runtime._slots
            deadline = time.monotonic() + 10
            while len(slots._free) < adapter.LogitsSlots.COUNT and time.monotonic() < deadline:
                time.sleep(0.02)
            assert len(slots._free) == adapter.LogitsSlots.COUNT
            text, final, _ = ask(engine, ResponseFormat("regex", "(yes|no)"))
            assert final.finish_reason is FinishReason.STOP and text in ("yes", "no")
    finally:
        backend.close()


def test_slots_wait_then_refuse_when_all_are_busy():
    slots = adapter.LogitsSlots()
    slots.WAIT_S = 0.2
    names = [slots.acquire(lambda ids: None, 2) for _ in range(slots.COUNT)]
    assert len(set(names)) == slots.COUNT
    from slm_ros.core.errors import RequestError
    with pytest.raises(RequestError, match="slots"):
        slots.acquire(lambda ids: None, 2)
    threading.Timer(0.05, slots.release, args=(names[0],)).start()
    slots.WAIT_S = 5
    assert slots.acquire(lambda ids: None, 2) == names[0]
