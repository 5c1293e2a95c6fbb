"""Tier 3: llm_node / vision_node processes with ``backend: openai`` over real DDS, sending
generation to llama-cpp-python's own OpenAI-compatible server (a real server, its own process,
serving the embedded SmolLM2 GGUF on loopback), or to the scripted stub server for the failures a
real server cannot be made to produce."""

import base64
import time
import uuid

import cv2
import numpy as np
import pytest

from openai_servers import LlamaCppServer, embedded_gguf, free_port
from openai_stub import StubServer, cut, ok, status
from ros_helpers import (LlmClient, NodeProcess, VisionClient, assert_feedback_ok,
                         assert_stream_ok, served_by, wait_future)

PROMPT = "What is the capital of France? Answer in one sentence."


def _remote_node(did, log_dir, base_url, executable="llm_node", **params):
    settings = {"backend": "openai", "model": "default", "remote.base_url": base_url,
                "default_max_new_tokens": 32, "default_repetition_penalty": 1.0,
                "remote.max_retry_wait_s": 5.0}
    settings.update(params)
    node = NodeProcess(did, log_dir / f"{executable}.log", executable=executable, **settings)
    assert node.wait_for_log("active: serving", 60), node.log()
    return node


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = LlamaCppServer(embedded_gguf(), log_path=tmp_path_factory.mktemp("server") / "s.log")
    with srv.start():
        yield srv


@pytest.fixture(scope="module")
def node_and_client(server, tmp_path_factory):
    from domain_coordinator import domain_id as reserve
    with reserve() as did:
        node = _remote_node(did, tmp_path_factory.mktemp("llm_openai"), server.base_url,
                            **{"remote.max_in_flight": 8, "max_queue": 16})
        with served_by(node, LlmClient) as client:
            yield node, client


def _ask(client, prompt=PROMPT, **sampling):
    rid = uuid.uuid4().hex
    client.request(prompt, rid, sampling=sampling)
    final = client.wait_final(rid, 60)
    return final, assert_stream_ok(client.chunks[rid])


def test_streamed_answer_equals_the_servers_non_streamed_greedy_answer(server, node_and_client):
    node, client = node_and_client
    final, text = _ask(client)
    assert final.finish_reason in ("stop", "length"), final.error
    reference = server.chat([{"role": "user", "content": PROMPT}], max_tokens=32,
                            temperature=0.0, top_p=1.0)
    assert text == reference["choices"][0]["message"]["content"]
    assert final.stats.completion_tokens > 0 and final.stats.tokens_per_second > 0
    assert final.stats.time_to_first_token_ms > 0
    assert "with backend openai" in node.log() and "smollm2" in node.log()


def test_action_streams_feedback_and_cancel_ends_the_request_on_the_server(node_and_client):
    _, client = node_and_client
    feedback = []
    handle = client.send_goal("Write a very long story about a robot.", feedback,
                              max_new_tokens=1500, temperature=0.0)
    assert client.wait_for(lambda: len(feedback) >= 3, 30)
    wait_future(handle.cancel_goal_async())
    response = wait_future(handle.get_result_async())
    assert response.result.finish_reason == "cancelled"
    assert_feedback_ok(feedback, response.result.text)
    # llama.cpp's server runs one generation at a time: had it not seen the request end, the
    # next answer would wait behind ~1500 tokens (about 30 s here).
    t0 = time.monotonic()
    final, _ = _ask(client, "Say hi.", max_new_tokens=4)
    assert final.finish_reason in ("stop", "length"), final.error
    assert time.monotonic() - t0 < 10, "the cancelled generation kept the server busy"


def test_eight_concurrent_requests_all_answered(node_and_client):
    _, client = node_and_client
    rids = [uuid.uuid4().hex for _ in range(8)]
    for i, rid in enumerate(rids):
        client.request(f"Name a colour number {i}.", rid, sampling={"max_new_tokens": 12})
    finals = [client.wait_final(rid, 120) for rid in rids]
    assert all(f.finish_reason in ("stop", "length") for f in finals), [f.error for f in finals]
    for rid in rids:
        assert assert_stream_ok(client.chunks[rid])
    # All eight went to the server at once (remote.max_in_flight 8): none waited in the node's
    # queue behind another.
    assert max(f.stats.queue_ms for f in finals) < 1000, [f.stats.queue_ms for f in finals]


def test_server_killed_mid_stream_then_restarted(server, node_and_client):
    node, client = node_and_client
    rid = uuid.uuid4().hex
    client.request("Write a very long story about a robot.", rid,
                   sampling={"max_new_tokens": 1500})
    assert client.wait_for(lambda: len(client.chunks.get(rid, ())) >= 3, 30)
    server.kill()
    final = client.wait_final(rid, 30)
    text = assert_stream_ok(client.chunks[rid])
    assert final.finish_reason == "error"
    assert server.base_url in final.error and "kept" in final.error, final.error
    assert text, "the partial answer is kept"
    # Down: a clear error, the node keeps running.
    final, _ = _ask(client, "Hello?", max_new_tokens=4)
    assert final.finish_reason == "error" and "connection refused" in final.error, final.error
    assert node.proc.poll() is None
    server.restart()
    final, text = _ask(client, "Say hi.", max_new_tokens=8)
    assert final.finish_reason in ("stop", "length"), final.error
    assert text


def _ask_once(did, log_dir, base_url, **params):
    """Start a node on ``base_url``, ask it one question, stop it: (final chunk, node log)."""
    node = _remote_node(did, log_dir, base_url, **params)
    try:
        client = LlmClient(did)
        try:
            client.wait_ready()
            final, _ = _ask(client, "Hello", max_new_tokens=4)
        finally:
            client.close()
        assert node.proc.poll() is None, "the node must keep running"
    finally:
        assert node.stop() == 0, node.log()
    return final, node.log()


def test_wrong_port_is_a_clear_error(tmp_path):
    from domain_coordinator import domain_id as reserve
    port = free_port()
    with reserve() as did:
        final, log = _ask_once(did, tmp_path, f"http://127.0.0.1:{port}/v1", model="m",
                               **{"remote.max_retries": 1})
    assert final.finish_reason == "error"
    assert f"connection refused: is the server running and listening on 127.0.0.1:{port}" \
        in final.error, final.error
    assert "after 1 retries" in final.error
    assert "connection refused" in log   # the startup probe warned already


def test_bad_key_is_a_clear_error_and_the_key_is_never_logged(tmp_path, monkeypatch):
    from domain_coordinator import domain_id as reserve
    monkeypatch.setenv("SLM_TEST_REMOTE_KEY", "not-the-key-123")
    with StubServer(api_key="the-real-key") as locked, reserve() as did:
        final, log = _ask_once(did, tmp_path, locked.base_url, model="m",
                               **{"remote.api_key_env": "SLM_TEST_REMOTE_KEY"})
        assert locked.requests[-1]["headers"]["authorization"] == "Bearer not-the-key-123"
    assert final.finish_reason == "error"
    assert "401 Unauthorized" in final.error and "$SLM_TEST_REMOTE_KEY" in final.error
    assert "not-the-key-123" not in log + final.error


def test_wrong_model_names_what_the_server_serves(tmp_path):
    from domain_coordinator import domain_id as reserve
    with StubServer() as stub, reserve() as did:
        stub.script(status(404, "The model `no-such-model` does not exist."))
        final, _ = _ask_once(did, tmp_path, stub.base_url, model="no-such-model")
    assert "404 Not Found: no model 'no-such-model'" in final.error
    assert "the server serves: stub-model" in final.error


def test_retry_after_429_and_stream_cut_through_the_node(tmp_path):
    from domain_coordinator import domain_id as reserve
    with StubServer() as stub, reserve() as did:
        node = _remote_node(did, tmp_path, stub.base_url)
        client = LlmClient(did)
        try:
            client.wait_ready()
            stub.script(status(429, "busy", retry_after="0.3"), ok(text="Answer after a wait."),
                        cut(after_pieces=2, text="Partial answer then nothing."))
            final, text = _ask(client)
            assert (final.finish_reason, text) == ("stop", "Answer after a wait.")
            final, text = _ask(client)
            assert final.finish_reason == "error" and text == "Partial answer"
            assert "cut" in final.error
        finally:
            client.close()
            assert node.stop() == 0, node.log()


def test_vision_node_sends_the_frame_as_a_data_url(tmp_path):
    from domain_coordinator import domain_id as reserve
    with StubServer() as stub, reserve() as did:
        stub.script(ok(text="A green square."))
        node = _remote_node(did, tmp_path, stub.base_url, executable="vision_node",
                            model="vlm", image_max_side=64)
        client = VisionClient(did)
        try:
            client.wait_ready()
            rgb = np.zeros((120, 160, 3), np.uint8)
            rgb[..., 1] = 255
            sent = client.publish_rgb(rgb, frame_id="cam0")
            feedback = []
            handle = client.send_goal("What do you see?", feedback)
            answer = wait_future(handle.get_result_async()).result.answer
        finally:
            client.close()
            assert node.stop() == 0, node.log()
        assert answer.finish_reason == "stop", answer.error
        assert answer.text == "A green square." and answer.header.frame_id == "cam0"
        assert answer.header.stamp == sent.header.stamp
        content = stub.requests[-1]["body"]["messages"][-1]["content"]
        assert content[0] == {"type": "text", "text": "What do you see?"}
        url = content[1]["image_url"]["url"]
        jpeg = base64.b64decode(url.split(",", 1)[1])
        image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert image.shape == (48, 64, 3)            # image_max_side applied before sending
        assert image[..., 1].mean() > 240 and image[..., 0].mean() < 15   # green (BGR)
