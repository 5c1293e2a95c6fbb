"""Tier 2: the ``openai`` backend behind the real Engine, against a scripted OpenAI-compatible
server on loopback (test/openai_stub.py) for the failures a real server cannot be made to produce,
and against llama-cpp-python's own server (test/openai_servers.py) for the real thing. No ROS."""

import base64
import time

import cv2
import numpy as np
import pytest

from engine_helpers import Collector
from openai_servers import LlamaCppServer, embedded_gguf, free_port
from openai_stub import (DEFAULT_TEXT, StubServer, cut, error_event, malformed, ok, sse_comments,
                         stall, status, tool_calls)
from slm_ros.backends.base import BackendConfig, RemoteConfig
from slm_ros.backends.openai_backend import parse_sse_line, retry_delay
from slm_ros.backends.registry import create_backend
from slm_ros.core.engine import Engine, EngineConfig
from slm_ros.core.errors import ConfigError
from slm_ros.core.types import Request, SamplingOverrides, SamplingParams


class Remote:
    """An openai backend + engine on ``base_url``, and every chunk per request."""

    def __init__(self, base_url: str, model: str = "default", max_queue: int = 16,
                 defaults: SamplingParams = SamplingParams(max_new_tokens=32,
                                                           repetition_penalty=1.0),
                 **remote) -> None:
        remote.setdefault("max_retry_wait_s", 5.0)
        self.backend = create_backend("openai")
        self.backend.load(BackendConfig(model=model,
                                        remote=RemoteConfig(base_url=base_url, **remote)))
        self.backend.warmup()
        self.engine = Engine(self.backend, EngineConfig(defaults=defaults, max_queue=max_queue))
        self.engine.start()
        self.collect = Collector()

    @property
    def chunks(self):
        return self.collect.chunks

    def submit(self, prompt: str = "Hello", image=None, **sampling) -> str:
        return self.engine.submit(Request(prompt=prompt, image=image,
                                          sampling=SamplingOverrides(**sampling)), self.collect)

    def final(self, rid: str, timeout: float = 30.0):
        """The final chunk (checked: seq gapless, exactly one final, last) and the whole text."""
        final = self.collect.final(rid, timeout)
        chunks = self.chunks[rid]
        assert [c.seq for c in chunks] == list(range(len(chunks)))
        assert sum(c.is_final for c in chunks) == 1 and chunks[-1].is_final
        return final, self.collect.text(rid)

    def wait_chunks(self, rid: str, n: int, timeout: float = 10.0) -> None:
        with self.collect.cv:
            assert self.collect.cv.wait_for(lambda: len(self.chunks.get(rid, ())) >= n, timeout)

    def ask(self, prompt: str = "Hello", **sampling):
        return self.final(self.submit(prompt, **sampling))

    def close(self) -> None:
        self.engine.stop()
        self.backend.close()


@pytest.fixture
def stub():
    with StubServer() as server:
        yield server


@pytest.fixture
def remote(stub):
    r = Remote(stub.base_url)
    yield r
    r.close()


# -- the happy path -----------------------------------------------------------------------------

def test_streams_text_deltas_with_server_usage_and_client_timing(stub, remote):
    stub.script(ok(pieces=["Hel", "lo ", "wörld", "."], delay_s=0.02))
    final, text = remote.ask("Say hello")
    assert text == "Hello wörld." and final.finish_reason == "stop"
    assert final.stats.prompt_tokens == 7 and final.stats.completion_tokens == 4   # server usage
    assert final.stats.time_to_first_token_ms > 0 and final.stats.tokens_per_second > 0
    assert all(c.token_ids == () for c in remote.chunks[final.request_id])
    body = stub.requests[-1]["body"]
    assert body["model"] == "stub-model"        # `default` = the first model the server lists
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "user", "content": "Say hello"}]


def test_finish_reason_length_and_no_usage(stub, remote):
    stub.script(ok(pieces=["a", "b", "c"], finish_reason="length", usage=False))
    final, text = remote.ask()
    assert (text, final.finish_reason) == ("abc", "length")
    assert final.stats.completion_tokens == 3 and final.stats.prompt_tokens == 0  # counted here


def test_sampling_maps_to_the_request_body(stub):
    r = Remote(stub.base_url, model="served-name")
    try:
        r.ask("x", max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.3,
              seed=42, stop=["END"])
        body = stub.requests[-1]["body"]
        assert body["model"] == "served-name"
        assert (body["max_tokens"], body["temperature"], body["top_p"], body["top_k"],
                body["seed"], body["stop"]) == (5, 0.7, 0.9, 20, 42, ["END"])
        assert body["repetition_penalty"] == body["repeat_penalty"] == 1.3
    finally:
        r.close()
    strict = Remote(stub.base_url, extra_sampling=False)
    try:
        strict.ask("x", top_k=20, repetition_penalty=1.3)
        body = stub.requests[-1]["body"]
        assert not {"top_k", "repetition_penalty", "repeat_penalty"} & set(body)
    finally:
        strict.close()


def test_sessions_send_the_history_as_messages(stub, remote):
    stub.script(ok(text="First answer."), ok(text="Second answer."))
    remote.final(remote.engine.submit(Request(prompt="one", session_id="s"), remote.collect))
    remote.final(remote.engine.submit(Request(prompt="two", session_id="s",
                                              system_prompt="Be brief."), remote.collect))
    assert stub.requests[-1]["body"]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "one"}, {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "two"}]


def test_stop_string_is_applied_here_and_ends_the_request(stub, remote):
    stub.script(ok(pieces=["Go ", "left", " END", " more", " text"], delay_s=0.05))
    final, text = remote.ask(stop=["END"])
    assert (text, final.finish_reason) == ("Go left ", "stop")


def test_sse_comments_and_fields_are_ignored(stub, remote):
    stub.script(sse_comments())
    final, text = remote.ask()
    assert (text, final.finish_reason) == (DEFAULT_TEXT, "stop")


def test_image_goes_as_a_jpeg_data_url(stub, remote):
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[:, :, 0] = 255   # red
    final, _ = remote.final(remote.submit("What colour?", image=lambda: rgb))
    assert final.finish_reason == "stop"
    content = stub.requests[-1]["body"]["messages"][-1]["content"]
    assert content[0] == {"type": "text", "text": "What colour?"}
    url = content[1]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    decoded = cv2.imdecode(np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8),
                           cv2.IMREAD_COLOR)
    assert decoded.shape == (48, 64, 3) and decoded[..., 2].mean() > 240   # BGR: red channel


def test_api_key_comes_from_the_named_environment_variable(monkeypatch):
    monkeypatch.setenv("SLM_TEST_KEY", "s3cret-value")
    with StubServer(api_key="s3cret-value") as server:
        r = Remote(server.base_url, api_key_env="SLM_TEST_KEY")
        try:
            final, text = r.ask()
            assert final.finish_reason == "stop", final.error
            assert server.requests[-1]["headers"]["authorization"] == "Bearer s3cret-value"
            monkeypatch.setenv("SLM_TEST_KEY", "wrong")
            final, _ = r.ask()
            assert final.finish_reason == "error"
            assert "401" in final.error and "$SLM_TEST_KEY" in final.error
            assert "wrong" not in final.error and "s3cret" not in final.error
            monkeypatch.delenv("SLM_TEST_KEY")
            final, _ = r.ask()
            assert "SLM_TEST_KEY is not set" in final.error
        finally:
            r.close()


# -- failures: each ends the request with one clear error chunk; the engine keeps serving ---------

@pytest.mark.parametrize("code, words", [
    (403, ["403 Forbidden"]),
    (404, ["404 Not Found", "'stub-model'", "stub error"]),
    (400, ["HTTP 400", "stub error"]),
    (500, ["500 server error", "stub error"]),
])
def test_http_errors_name_the_server_and_the_status(stub, remote, code, words):
    stub.script(status(code))
    final, text = remote.ask()
    assert final.finish_reason == "error" and text == ""
    assert stub.base_url in final.error
    for word in words:
        assert word in final.error, final.error
    assert len(stub.requests) == 1, "4xx and 500 are not retried"
    assert remote.ask()[0].finish_reason == "stop"   # still serving


def test_unknown_model_lists_what_the_server_serves(stub):
    r = Remote(stub.base_url, model="no-such-model")
    try:
        stub.script(status(404, "The model `no-such-model` does not exist."))
        final, _ = r.ask()
        assert "404 Not Found: no model 'no-such-model'" in final.error
        assert "does not exist" in final.error and "the server serves: stub-model" in final.error
    finally:
        r.close()


def test_429_honours_retry_after_before_the_first_token(stub, remote):
    stub.script(status(429, "slow down", retry_after="0.5"), status(503, "warming up"), ok())
    t0 = time.monotonic()
    final, text = remote.ask()
    assert (text, final.finish_reason) == (DEFAULT_TEXT, "stop")
    assert len(stub.requests) == 3
    gap = stub.requests[1]["time"] - stub.requests[0]["time"]
    assert gap >= 0.45, f"Retry-After 0.5 s not honoured: retried after {gap:.2f} s"
    assert time.monotonic() - t0 < 5


def test_429_with_a_retry_after_too_long_fails_at_once(stub, remote):
    stub.script(status(429, "quota", retry_after="120"))
    final, _ = remote.ask()
    assert "429 Too Many Requests" in final.error and "remote.max_retry_wait_s" in final.error
    assert len(stub.requests) == 1


def test_retries_run_out(stub):
    r = Remote(stub.base_url, max_retries=1)
    try:
        stub.script(status(503), status(503), ok())
        final, _ = r.ask()
        assert "503 server error" in final.error and "after 1 retries" in final.error
    finally:
        r.close()


def test_stream_cut_mid_answer_keeps_the_partial_text_and_never_retries(stub, remote):
    stub.script(cut(after_pieces=2))
    final, text = remote.ask()
    assert final.finish_reason == "error"
    assert text == "Hello from" and "cut" in final.error and "kept" in final.error
    assert final.stats.completion_tokens == 2
    assert len(stub.requests) == 1
    assert remote.ask()[0].finish_reason == "stop"


def test_malformed_sse_line_is_an_error_naming_the_line(stub, remote):
    stub.script(malformed(after_pieces=1, line="data: {not json"))
    final, text = remote.ask()
    assert final.finish_reason == "error" and text == "Hello"
    assert "malformed" in final.error and "{not json" in final.error


def test_error_event_mid_stream(stub, remote):
    stub.script(error_event(after_pieces=1, message="model crashed"))
    final, text = remote.ask()
    assert final.finish_reason == "error" and "model crashed" in final.error and text == "Hello"


def test_stalled_stream_hits_the_between_token_timeout(stub):
    r = Remote(stub.base_url, token_timeout_s=0.5)
    try:
        stub.script(stall(after_pieces=2))
        t0 = time.monotonic()
        final, text = r.ask()
        assert final.finish_reason == "error" and "remote.token_timeout_s" in final.error
        assert text == "Hello from" and 0.4 < time.monotonic() - t0 < 5
        assert stub.wait_for_disconnects(1), "the stalled connection was not closed"
    finally:
        r.close()


def test_slow_first_token_hits_the_first_token_timeout(stub):
    r = Remote(stub.base_url, first_token_timeout_s=0.5)
    try:
        stub.script(ok(first_delay_s=3.0))
        final, text = r.ask()
        assert final.finish_reason == "error" and "remote.first_token_timeout_s" in final.error
        assert text == ""
    finally:
        r.close()


def test_cancel_closes_the_connection_at_once(stub, remote):
    stub.script(stall(after_pieces=1))
    rid = remote.submit()
    remote.wait_chunks(rid, 1)
    t0 = time.monotonic()
    assert remote.engine.cancel(rid)
    final, text = remote.final(rid)
    assert final.finish_reason == "cancelled" and text == "Hello"
    assert time.monotonic() - t0 < 1.0
    assert stub.wait_for_disconnects(1), "the server did not see the request end"


def test_connection_refused_names_the_port():
    port = free_port()
    r = Remote(f"http://127.0.0.1:{port}/v1", model="m", max_retries=1)
    try:
        assert "connection refused" in r.backend.describe().get("warning", "")
        final, _ = r.ask()
        assert final.finish_reason == "error"
        assert f"127.0.0.1:{port}" in final.error and "after 1 retries" in final.error
    finally:
        r.close()


def test_dns_failure_names_the_host():
    r = Remote("http://no-such-host.invalid:8000/v1", model="m", max_retries=0)
    try:
        final, _ = r.ask()
        assert final.finish_reason == "error"
        assert "no-such-host.invalid" in final.error
        # A resolver that cannot answer at all (no network) ends in the connect timeout instead.
        assert any(w in final.error for w in ("DNS failure", "cannot connect", "could not connect")), \
            final.error
    finally:
        r.close()


def test_max_in_flight_bounds_concurrent_requests(stub):
    r = Remote(stub.base_url, max_in_flight=3, max_queue=8)
    try:
        stub.script(*[stall(after_pieces=1) for _ in range(3)])
        rids = [r.submit(f"p{i}") for i in range(5)]
        assert stub.wait_for_requests(3)
        time.sleep(0.3)
        assert len(stub.requests) == 3, "more requests in flight than remote.max_in_flight"
        assert r.engine.queue_depth == 2
        for rid in rids[:3]:
            r.engine.cancel(rid)
        results = [r.final(rid) for rid in rids]
        assert [f.finish_reason for f, _ in results] == ["cancelled"] * 3 + ["stop"] * 2
    finally:
        r.close()


def test_engine_stop_ends_running_remote_requests_with_an_error(stub):
    r = Remote(stub.base_url)
    stub.script(stall(after_pieces=1))
    rid = r.submit()
    r.wait_chunks(rid, 1)
    r.engine.stop("test stop")
    final, _ = r.final(rid)
    assert final.finish_reason == "error" and "test stop" in final.error
    r.backend.close()


# -- pieces ---------------------------------------------------------------------------------------

def test_remote_config_is_validated():
    with pytest.raises(ConfigError, match="remote.base_url"):
        RemoteConfig(base_url="gpu-server:8000")
    with pytest.raises(ConfigError, match="remote.token_timeout_s"):
        RemoteConfig(token_timeout_s=0)
    with pytest.raises(ConfigError, match="remote.max_in_flight"):
        RemoteConfig(max_in_flight=0)
    with pytest.raises(ConfigError, match="remote.json_schema_style"):
        RemoteConfig(json_schema_style="xml")


def test_sse_line_parsing():
    assert parse_sse_line("") is None and parse_sse_line(": ping") is None
    assert parse_sse_line("event: message") is None and parse_sse_line("id: 4") is None
    assert parse_sse_line("data: [DONE]") == "[DONE]"
    assert parse_sse_line('data: {"choices": []}') == {"choices": []}
    assert parse_sse_line('data:{"a": 1}') == {"a": 1}
    assert "malformed" in parse_sse_line("garbage").message
    assert "not JSON" in parse_sse_line("data: {oops").message
    assert "boom" in parse_sse_line('data: {"error": {"message": "boom"}}').message


def test_retry_delay():
    assert retry_delay("2", 0) == 2.0
    assert retry_delay(None, 0) == 0.25 and retry_delay(None, 2) == 1.0
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < retry_delay(future, 0) <= 31


# -- the real server: llama-cpp-python's OpenAI-compatible server on the embedded GGUF -----------

@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    server = LlamaCppServer(embedded_gguf(), log_path=tmp_path_factory.mktemp("llama") / "s.log")
    with server.start():
        yield server


def test_real_server_stream_equals_its_non_streamed_greedy_answer(llama_server):
    r = Remote(llama_server.base_url)
    try:
        prompt = "What is the capital of France? Answer in one sentence."
        final, text = r.ask(prompt, max_new_tokens=24)
        assert final.finish_reason in ("stop", "length"), final.error
        reference = llama_server.chat([{"role": "user", "content": prompt}], max_tokens=24,
                                      temperature=0.0, top_p=1.0)
        assert text == reference["choices"][0]["message"]["content"]
        assert "Paris" in text
    finally:
        r.close()


# -- constrained output (response_format) -------------------------------------------------------

SCHEMA = {"type": "object", "required": ["action"], "additionalProperties": False,
          "properties": {"action": {"enum": ["go", "stop"]}}}


def _ask_format(r: Remote, fmt, prompt: str = "Command?", **sampling):
    rid = r.engine.submit(Request(prompt=prompt, response_format=fmt,
                                  sampling=SamplingOverrides(**sampling)), r.collect)
    return r.final(rid)


def test_response_format_goes_to_the_server_and_its_output_is_validated(stub, remote):
    import json as _json

    from slm_ros.core.constraints import ResponseFormat
    fmt = ResponseFormat("json_schema", _json.dumps(SCHEMA))
    stub.script(ok(text='{"action": "go"}'))
    final, text = _ask_format(remote, fmt)
    assert final.finish_reason == "stop" and _json.loads(text) == {"action": "go"}
    assert stub.requests[-1]["body"]["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "response", "schema": SCHEMA,
                                               "strict": True}}
    # A server that ignores the format: its invalid output is never passed as a success.
    stub.script(ok(text='{"action": "dance"}'))
    final, text = _ask_format(remote, fmt)
    assert final.finish_reason == "error" and "failed validation on the robot" in final.error
    assert text == '{"action": "dance"}'   # kept
    stub.script(ok(text="Sure! Here you go"))
    final, _ = _ask_format(remote, fmt)
    assert final.finish_reason == "error" and "not valid JSON" in final.error
    stub.script(ok(text='{"action": "g', finish_reason="length"))
    final, _ = _ask_format(remote, fmt)
    assert final.finish_reason == "error" and "output cut at max_new_tokens" in final.error
    stub.script(ok(text='{"a": 1}'))
    final, _ = _ask_format(remote, ResponseFormat("json_object"))
    assert final.finish_reason == "stop"
    assert stub.requests[-1]["body"]["response_format"] == {"type": "json_object"}


def test_formats_the_openai_api_cannot_express_are_refused(stub, remote):
    from slm_ros.core.constraints import ResponseFormat, Tool
    n = len(stub.requests)
    final, _ = _ask_format(remote, ResponseFormat("regex", "yes|no"))
    assert final.finish_reason == "error" and "OpenAI API has only json_object and json_schema" \
        in final.error
    rid = remote.engine.submit(Request(prompt="x", tools=(Tool("go"), Tool("go"))), remote.collect)
    final, _ = remote.final(rid)
    assert final.finish_reason == "error" and "duplicate tool name 'go'" in final.error
    assert len(stub.requests) == n   # nothing was sent


DRIVE = ('{"type": "object", "required": ["meters"], "additionalProperties": false, '
         '"properties": {"meters": {"type": "integer", "minimum": 0, "maximum": 9}}}')


def _call_tools(r: Remote, choice: str = ""):
    from slm_ros.core.constraints import Tool
    tools = (Tool("drive", "Drive forward.", DRIVE), Tool("stop", "Stop."))
    rid = r.engine.submit(Request(prompt="Drive two meters.", tools=tools, tool_choice=choice),
                          r.collect)
    return r.final(rid)


def test_tools_go_to_the_server_and_its_calls_are_validated(stub, remote):
    import json as _json
    stub.script(tool_calls([("call_x", "drive", '{"meters": 2}')]))
    final, _ = _call_tools(remote, "required")
    assert final.finish_reason == "stop" and not final.error, final.error
    (call,) = final.tool_calls
    assert (call.id, call.name, _json.loads(call.arguments)) == ("call_x", "drive", {"meters": 2})
    body = stub.requests[-1]["body"]
    assert body["tool_choice"] == "required"
    assert body["tools"][0] == {"type": "function", "function": {
        "name": "drive", "description": "Drive forward.", "parameters": _json.loads(DRIVE)}}
    assert body["tools"][1]["function"]["parameters"] == {"type": "object"}
    assert "You can call these tools" not in _json.dumps(body["messages"])  # the server renders
    # A named tool goes as the OpenAI object; two calls with one id get unique ids.
    stub.script(tool_calls([("c", "drive", '{"meters": 1}'), ("c", "stop", "{}")]))
    final, _ = _call_tools(remote)
    assert [c.name for c in final.tool_calls] == ["drive", "stop"]
    assert len({c.id for c in final.tool_calls}) == 2
    stub.script(tool_calls([("c", "stop", "{}")]))
    final, _ = _call_tools(remote, "stop")
    assert stub.requests[-1]["body"]["tool_choice"] == {"type": "function",
                                                        "function": {"name": "stop"}}
    assert final.tool_calls[0].name == "stop"
    # auto: a plain answer is fine.
    stub.script(ok(text="I cannot drive."))
    final, text = _call_tools(remote)
    assert final.finish_reason == "stop" and final.tool_calls == () and text == "I cannot drive."
    assert stub.requests[-1]["body"]["tool_choice"] == "auto"


@pytest.mark.parametrize("answer,expected", [
    (ok(text="Sure."), "answered without one"),                             # tool_choice ignored
    (tool_calls([("c", "fly", "{}")]), "'fly', which is not a listed tool"),
    (tool_calls([("c", "drive", '{"meters": 12}')]), "do not validate"),
    (tool_calls([("c", "drive", '{"meters": ')]), "not valid JSON"),
    (tool_calls([("a", "drive", '{"meters": 1}'), ("b", "stop", "{}")]), "returned 2"),
])
def test_a_server_ignoring_or_breaking_tools_is_an_error_never_a_success(stub, remote, answer,
                                                                         expected):
    stub.script(answer)
    final, _ = _call_tools(remote, "required")
    assert final.finish_reason == "error" and expected in final.error, final.error
    assert "failed validation on the robot" in final.error


def test_real_server_honours_a_json_schema(llama_server):
    import json as _json

    import jsonschema

    from slm_ros.core.constraints import ResponseFormat
    r = Remote(llama_server.base_url, json_schema_style="json_object",
               defaults=SamplingParams(max_new_tokens=64, repetition_penalty=1.0))
    try:
        for prompt in ("Go now.", "Stop!"):
            final, text = _ask_format(r, ResponseFormat("json_schema", _json.dumps(SCHEMA)),
                                      prompt, max_new_tokens=64)
            assert final.finish_reason == "stop", (final.error, text)
            jsonschema.validate(_json.loads(text), SCHEMA)
    finally:
        r.close()
