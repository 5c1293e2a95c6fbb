"""Tier 3: the installed llm_node in its own process, real DDS on loopback, tiny real model."""

import time
import uuid

import pytest
from std_msgs.msg import String

from ros_helpers import (LlmClient, NodeProcess, assert_feedback_ok, assert_stream_ok, served_by,
                         wait_future)


@pytest.fixture(scope="module")
def node_and_client(tiny_model_dir, tmp_path_factory):
    from domain_coordinator import domain_id as reserve
    with reserve() as did:
        log = tmp_path_factory.mktemp("llm_node") / "llm_node.log"
        node = NodeProcess(did, log, model=tiny_model_dir, max_queue=32, dtype="float32",
                           default_max_new_tokens=24, max_context_tokens=512,
                           default_repetition_penalty=1.0)
        assert node.wait_for_log("active: serving", 120), node.log()
        with served_by(node, LlmClient) as client:
            yield node, client


def test_topic_prompt_streams_chunks_matching_response(node_and_client):
    _, client = node_and_client
    before = set(client.chunks)
    client.prompt_pub.publish(String(data="Hello robot"))
    assert client.wait_for(lambda: any(any(c.is_final for c in client.chunks[r])
                                       for r in set(client.chunks) - before), 30)
    (rid,) = set(client.chunks) - before
    text = assert_stream_ok(client.chunks[rid])
    assert client.wait_for(lambda: text in client.responses, 10)
    final = client.chunks[rid][-1]
    assert final.session_id == "default" and final.stats.completion_tokens > 0
    assert final.stats.prompt_tokens > 0 and final.stats.total_ms > 0


def test_action_feedback_and_result(node_and_client):
    _, client = node_and_client
    feedback = []
    handle = client.send_goal("Describe the room", feedback, max_new_tokens=30, top_k=1)
    result = wait_future(handle.get_result_async()).result
    assert result.finish_reason in ("length", "stop")
    assert_feedback_ok(feedback, result.text)
    assert feedback[-1].request_id == result.request_id
    assert result.stats.completion_tokens >= sum(len(c.token_ids) for c in feedback)
    # Every chunk, the final one included, is on the tokens topic.
    assert client.wait_for(lambda: any(c.is_final for c in client.chunks[result.request_id]), 10)
    assert assert_stream_ok(client.chunks[result.request_id]) == result.text
    assert result.stats.completion_tokens == sum(
        len(c.token_ids) for c in client.chunks[result.request_id])


def test_action_cancel_mid_stream(node_and_client):
    _, client = node_and_client
    feedback = []
    handle = client.send_goal("count forever", feedback, max_new_tokens=3000)
    assert client.wait_for(lambda: len(feedback) >= 3, 30)
    wait_future(handle.cancel_goal_async())
    response = wait_future(handle.get_result_async())
    assert response.result.finish_reason == "cancelled"
    assert response.status == 5  # GoalStatus.STATUS_CANCELED
    assert response.result.stats.completion_tokens < 3000
    assert_feedback_ok(feedback, response.result.text)


def test_cancel_topic_mid_stream(node_and_client):
    _, client = node_and_client
    rid = f"cancel-{uuid.uuid4().hex[:6]}"
    client.request("count forever", rid, sampling={"max_new_tokens": 3000})
    assert client.wait_for(lambda: len(client.chunks.get(rid, ())) >= 3, 30)
    client.cancel_pub.publish(String(data=rid))
    final = client.wait_final(rid)
    assert final.finish_reason == "cancelled"
    assert_stream_ok(client.chunks[rid])


def test_twenty_concurrent_requests_each_get_one_final_chunk(node_and_client):
    _, client = node_and_client
    rids = [f"burst-{i}-{uuid.uuid4().hex[:6]}" for i in range(20)]
    for i, rid in enumerate(rids):
        client.request(f"question {i}", rid, session_id=f"s{i}", sampling={"max_new_tokens": 8})
    for rid in rids:
        client.wait_final(rid, timeout=120)
    time.sleep(0.5)  # nothing more may arrive
    for rid in rids:
        chunks = client.chunks[rid]
        assert_stream_ok(chunks)
        assert chunks[-1].finish_reason in ("stop", "length"), chunks[-1].error


@pytest.mark.parametrize("prompt,fields,error", [
    ("", {}, "empty prompt"),
    ("word " * 600, {}, "prompt is too long"),
    ("hi", {"sampling": {"temperature": -1.0}}, "temperature must be >= 0"),
    ("hi", {"sampling": {"top_p": 1.5}}, "top_p must be in (0, 1]"),
])
def test_bad_requests_get_error_chunk_and_node_keeps_serving(node_and_client, prompt, fields,
                                                             error):
    _, client = node_and_client
    rid = f"bad-{uuid.uuid4().hex[:6]}"
    client.request(prompt, rid, **fields)
    final = client.wait_final(rid)
    assert final.finish_reason == "error" and error in final.error, final.error
    assert_stream_ok(client.chunks[rid])
    ok = f"ok-{uuid.uuid4().hex[:6]}"
    client.request("still there?", ok, sampling={"max_new_tokens": 4})
    assert client.wait_final(ok).finish_reason in ("stop", "length")


def test_duplicate_active_request_id(node_and_client):
    _, client = node_and_client
    rid = f"dup-{uuid.uuid4().hex[:6]}"
    client.request("long answer", rid, sampling={"max_new_tokens": 3000})
    assert client.wait_for(lambda: len(client.chunks.get(rid, ())) >= 2, 30)
    client.request("again", rid)
    # Refused under an id of its own (README): rid's stream is untouched.
    assert client.wait_for(lambda: any(r.startswith(f"{rid}#duplicate-") for r in client.chunks),
                           30)
    refusal = [r for r in client.chunks if r.startswith(f"{rid}#duplicate-")][0]
    assert f"duplicate request_id {rid!r}" in client.wait_final(refusal).error
    assert not any(c.is_final for c in client.chunks[rid])
    client.cancel_pub.publish(String(data=rid))
    assert client.wait_for(lambda: any(c.finish_reason == "cancelled" for c in client.chunks[rid]),
                           30)


def test_bad_goal_sampling_aborts_with_error(node_and_client):
    _, client = node_and_client
    handle = client.send_goal("hi", [], temperature=-2.0)
    response = wait_future(handle.get_result_async())
    assert response.status == 6  # GoalStatus.STATUS_ABORTED
    assert response.result.finish_reason == "error" and "temperature" in response.result.error


def test_unknown_model_path_fails_configure_and_node_stays_up(tmp_path, domain_id):
    from lifecycle_msgs.srv import GetState
    node = NodeProcess(domain_id, tmp_path / "bad.log", model=str(tmp_path / "no-such-model"))
    try:
        assert node.wait_for_log("configure failed", 60), node.log()
        assert "does not exist" in node.log()
        client = LlmClient(domain_id)
        try:
            get_state = client.node.create_client(GetState, "llm/get_state")
            assert get_state.wait_for_service(timeout_sec=30)
            state = wait_future(get_state.call_async(GetState.Request())).current_state
            assert state.label == "unconfigured"
        finally:
            client.close()
        assert node.proc.poll() is None
    finally:
        assert node.stop() == 0


def test_stream_interval_coalesces_the_stream(tiny_model_dir, tmp_path, domain_id):
    """stream_interval_ms: with an interval longer than the answer, the stream is the first chunk
    (sent at once) and the final chunk carrying the rest; nothing is lost."""
    node = NodeProcess(domain_id, tmp_path / "interval.log", model=tiny_model_dir, dtype="float32",
                       default_repetition_penalty=1.0, stream_interval_ms=10000)
    try:
        assert node.wait_for_log("active: serving", 120), node.log()
        client = LlmClient(domain_id)
        try:
            client.wait_ready()
            handle = client.send_goal("Describe the room", [], max_new_tokens=30, top_k=1)
            result = wait_future(handle.get_result_async()).result
            assert result.stats.completion_tokens >= 2, result
            rid = result.request_id
            assert client.wait_for(lambda: any(c.is_final for c in client.chunks[rid]), 10)
            chunks = client.chunks[rid]
            assert assert_stream_ok(chunks) == result.text
            assert len(chunks) == 2 and chunks[0].text and chunks[1].is_final
            assert sum(len(c.token_ids) for c in chunks) == result.stats.completion_tokens
        finally:
            client.close()
    finally:
        assert node.stop() == 0
