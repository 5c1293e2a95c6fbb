"""Reliability suite, part 2 (marker ``reliability``): what an adversarial run found against the
installed nodes — invalid lifecycle transitions, a client killed with goals in flight, goals and
frames that hold memory, a frame whose stamp a message cannot hold, shutdown with a goal running, a
duplicate request id, a flood of unknown cancels, oversize and invisible prompts, a megabyte model
parameter. Real node processes over real DDS on loopback, the embedded SmolLM2 on llama.cpp and a
tiny random VLM. Figures are printed (``-s`` shows them)."""

import collections
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from action_msgs.msg import GoalStatus
from diagnostic_msgs.msg import DiagnosticArray
from lifecycle_msgs.msg import State, Transition
from lifecycle_msgs.srv import ChangeState, GetState
from std_msgs.msg import String

from ros_helpers import (LlmClient, NodeProcess, RosParticipant, VisionClient, _die_with_parent,
                         assert_stream_ok, wait_future)
from slm_ros.ros import deployment, qos

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the suite runs the "
                                        "embedded model on llama.cpp)")
pytestmark = pytest.mark.reliability

HERE = Path(__file__).parent
CLIENT = HERE / "reliability_client.py"
SHORT_LEASE = deployment.share_dir() / "config" / "fastdds" / "short_lease.xml"   # installed
LLM = dict(backend="llama_cpp", model="default", default_max_new_tokens=16,
           max_context_tokens=1024)


def figures(name: str, **numbers) -> None:
    print(f"\n[hardening] {name}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


class Lifecycle(RosParticipant):
    """change_state / get_state clients of one lifecycle node, and /diagnostics."""

    def __init__(self, domain_id: int, node: str) -> None:
        super().__init__(domain_id, f"lifecycle_client_{uuid.uuid4().hex[:6]}")
        self.change = self.node.create_client(ChangeState, f"{node}/change_state")
        self.get = self.node.create_client(GetState, f"{node}/get_state")
        self.diagnostics = []
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag,
                                      qos.DIAGNOSTICS)
        self.start(threads=2)
        assert self.change.wait_for_service(timeout_sec=60)

    def _on_diag(self, msg) -> None:
        with self._cv:
            self.diagnostics.append(msg)
            self._cv.notify_all()

    def set(self, transition_id: int = 0, label: str = "") -> bool:
        request = ChangeState.Request(transition=Transition(id=transition_id, label=label))
        return wait_future(self.change.call_async(request), timeout=30).success

    def state(self) -> str:
        return wait_future(self.get.call_async(GetState.Request()), timeout=10).current_state.label


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def answers_a_prompt(client: LlmClient) -> None:
    rid = f"ok-{uuid.uuid4().hex[:8]}"
    client.request("Name a colour.", rid, session_id=rid, reset_session=True)
    final = client.wait_final(rid, 60)
    assert final.finish_reason in ("stop", "length"), final.error
    assert assert_stream_ok(client.chunks[rid]).strip()


@pytest.fixture
def llm(domain_id, tmp_path):
    node = NodeProcess(domain_id, tmp_path / "llm.log", **LLM)
    assert node.wait_for_log("active: serving", 120), node.log()
    client = LlmClient(domain_id)
    client.wait_ready()
    yield node, client
    client.close()
    node.stop()


# ------------------------------------------------------------------- 1. invalid lifecycle transitions

def test_invalid_transitions_by_id_are_refused_and_the_node_keeps_serving(llm, domain_id,
                                                                         tmp_path):
    node, client = llm
    lifecycle = Lifecycle(domain_id, "/t/llm")
    try:
        for transition in (Transition.TRANSITION_CLEANUP, Transition.TRANSITION_CONFIGURE,
                           Transition.TRANSITION_ACTIVATE, 99, 250):
            assert lifecycle.set(transition) is False, transition
            assert node.proc.poll() is None, node.log()
        assert lifecycle.state() == "active"
        answers_a_prompt(client)
        assert "lifecycle transition 2 (cleanup) refused: state 'active'" in node.log()
        # Shut down by id (valid), then configure (no longer valid): refused, process alive.
        assert lifecycle.set(Transition.TRANSITION_ACTIVE_SHUTDOWN) is True
        assert lifecycle.state() == "finalized"
        assert lifecycle.set(Transition.TRANSITION_CONFIGURE) is False
        assert lifecycle.set(label="configure") is False
        assert node.proc.poll() is None and lifecycle.state() == "finalized"
    finally:
        lifecycle.close()
    assert node.stop() == 0, node.log()
    figures("lifecycle", refused_by_id=6, node_alive=True)


def test_activate_after_a_failed_configure_is_refused(domain_id, tmp_path):
    node = NodeProcess(domain_id, tmp_path / "bad.log", backend="llama_cpp",
                       model=str(tmp_path / "missing.gguf"))
    lifecycle = None
    try:
        assert node.wait_for_log("not serving: configure failed", 60), node.log()
        lifecycle = Lifecycle(domain_id, "/t/llm")
        assert lifecycle.set(Transition.TRANSITION_ACTIVATE) is False
        assert lifecycle.state() == "unconfigured" and node.proc.poll() is None
    finally:
        if lifecycle is not None:
            lifecycle.close()
        assert node.stop() == 0, node.log()


# ------------------------------------------------------------------- 2. a client dies with goals in flight

def test_goals_of_a_killed_client_are_cancelled_and_the_queue_frees(domain_id, tmp_path):
    """20 goals (long answers) from a client process killed mid-stream: once DDS drops the
    client (its 3 s lease, config/fastdds/short_lease.xml), the node cancels every one and serves
    a new client."""
    node = NodeProcess(domain_id, tmp_path / "llm.log", backend="llama_cpp", model="default",
                       max_queue=16, default_max_new_tokens=400)
    proc = None
    try:
        assert node.wait_for_log("active: serving", 120), node.log()
        # Fast DDS ignores a profile file that does not exist (default 20 s lease then).
        assert SHORT_LEASE.is_file(), f"{SHORT_LEASE} is not installed (scripts/setup.sh)"
        env = dict(os.environ, ROS_DOMAIN_ID=str(domain_id),
                   ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
                   FASTRTPS_DEFAULT_PROFILES_FILE=str(SHORT_LEASE))
        ready = tmp_path / "ready"
        proc = subprocess.Popen([sys.executable, str(CLIENT), "goals", "--tag", "doomed",
                                 "--count", "20", "--max-new-tokens", "400",
                                 "--ready-file", str(ready)],
                                env=env, cwd=str(tmp_path), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 90
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.05)
        time.sleep(1.0)
        t_kill = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert node.wait_for_log("their action client left the ROS graph", 30), node.log()
        t_cancel = time.monotonic() - t_kill
        # A new client is served: nothing of the dead client's is left in the queue.
        client = LlmClient(domain_id)
        try:
            client.wait_ready()
            t0 = time.monotonic()
            handle = client.send_goal("Name a colour.", max_new_tokens=16)
            result = wait_future(handle.get_result_async(), timeout=60).result
            assert result.finish_reason in ("stop", "length"), (result.error, node.log())
            t_served = time.monotonic() - t_kill
        finally:
            client.close()
        log = node.log()
        cancelled = sum(int(line.split(" goal(s) cancelled")[0].rsplit(" ", 1)[-1])
                        for line in log.splitlines() if " goal(s) cancelled" in line)
        figures("killed client", goals=20, cancelled=cancelled, seconds_to_cancel=round(t_cancel, 1),
                seconds_to_serve_a_new_client=round(t_served, 1), new_request_wait_s=round(
                    time.monotonic() - t0, 1))
        assert cancelled >= 12, log   # those still queued or running when it died (17 accepted)
        assert t_cancel < 10.0, t_cancel   # 3 s lease + the 1 s check (README), slack for CI
    finally:
        if proc is not None:
            proc.kill()
        assert node.stop() == 0, node.log()


# ------------------------------------------------------------------- 3. memory held by goals and frames

def test_oversize_prompts_are_refused_and_finished_goals_release_memory(domain_id, tmp_path):
    # goal_result_timeout_s: long enough that a result asked for at acceptance is always there on
    # a loaded CI machine, short enough for three bursts in under a minute.
    keep_s = 10.0
    node = NodeProcess(domain_id, tmp_path / "llm.log", goal_result_timeout_s=keep_s, **LLM)
    client = None
    try:
        assert node.wait_for_log("active: serving", 120), node.log()
        client = LlmClient(domain_id)
        client.wait_ready()
        answers_a_prompt(client)
        base = rss_mb(node.proc.pid)
        big = "x" * (2 << 20)
        after, burst_s = [], []
        for burst in range(3):
            # Each result asked for at once, as rclpy clients do (a goal's result is kept only
            # goal_result_timeout_s after it finished).
            t0 = time.monotonic()
            futures = [client.send_goal(big).get_result_async() for _ in range(50)]
            responses = [wait_future(f, timeout=60) for f in futures]
            burst_s.append(round(time.monotonic() - t0, 1))
            statuses = collections.Counter(r.status for r in responses)
            bad = [r for r in responses if not (
                r.status == GoalStatus.STATUS_ABORTED and r.result.finish_reason == "error" and
                "max_prompt_bytes 262144" in r.result.error)]
            assert not bad, (f"burst {burst} ({burst_s[-1]} s): statuses {dict(statuses)}; first "
                             f"unexpected {bad[0]}", node.log()[-4000:])
            time.sleep(keep_s + 3.0)   # then the server has dropped the goals
            after.append(rss_mb(node.proc.pid))
        answers_a_prompt(client)
        figures("2 MB prompts", goals=150, rss_before_mb=round(base), seconds_per_burst=burst_s,
                rss_after_each_burst_mb=[round(a) for a in after])
        # Each burst's goals are released: memory does not grow burst after burst (with rclpy's
        # 15-minute default each burst kept its 100 MB).
        assert after[2] < after[0] + 40, (base, after)
    finally:
        if client is not None:
            client.close()
        assert node.stop() == 0, node.log()


# ------------------------------------------------------------------- vision: stamps, huge frames, lifecycle

def _png_declaring(width: int, height: int) -> bytes:
    """A PNG header declaring width x height (its pixel data is never reached: refused first)."""
    import struct
    import zlib
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk +
            struct.pack(">I", zlib.crc32(chunk)) + b"\x00" * 64)


def test_vision_node_answers_every_goal_whatever_the_frame(domain_id, tmp_path):
    from sensor_msgs.msg import CompressedImage, Image
    from vlm_fixtures import build_tiny_llava
    vlm = build_tiny_llava(tmp_path / "vlm")
    node = NodeProcess(domain_id, tmp_path / "vision.log", executable="vision_node", model=vlm,
                       dtype="float32", default_max_new_tokens=4, image_max_side=64,
                       max_frame_age_ms=0.0, no_frame_timeout_s=2.0,
                       # rclpy then checks field values: an out-of-range stamp raises
                       env={"ROS_PYTHON_CHECK_FIELDS": "1"})
    client = lifecycle = None
    try:
        assert node.wait_for_log("active: serving", 120), node.log()
        client = VisionClient(domain_id)
        client.wait_ready()
        lifecycle = Lifecycle(domain_id, "/t/vision")
        # 4. A frame stamped at the end of int32 time: every goal gets a result, the node serves.
        rgb = np.zeros((32, 32, 3), np.uint8)
        image = Image(encoding="rgb8", width=32, height=32, step=96, data=rgb.tobytes())
        image.header.stamp.sec, image.header.stamp.nanosec = 2**31 - 1, 2**32 - 1
        for _ in range(25):
            result = wait_future(client.send_goal("What is this?", image=image)
                                 .get_result_async(), timeout=60).result
            assert result.answer.finish_reason in ("stop", "length"), result.answer.error
            assert (result.answer.header.stamp.sec, result.answer.header.stamp.nanosec) == \
                (2**31 - 1, 10**9 - 1)
        assert lifecycle.state() == "active"
        # 3. A PNG declaring 15000x15000 in a few bytes: refused before decoding.
        before = rss_mb(node.proc.pid)
        msg = CompressedImage(format="png", data=_png_declaring(15000, 15000))
        client.compressed_pub.publish(msg)
        time.sleep(0.5)
        answer = client.ask_topic("What is in the huge picture?", timeout=60)
        assert answer.finish_reason == "error" and "max_image_pixels" in answer.error, answer
        big = Image(encoding="rgb8", width=15000, height=15000, step=45000, data=b"\x00" * 16)
        result = wait_future(client.send_goal("And this?", image=big).get_result_async(),
                             timeout=60).result
        assert "max_image_pixels" in result.answer.error, result.answer
        after = rss_mb(node.proc.pid)
        figures("vision", end_of_time_goals=25, huge_png_rss_delta_mb=round(after - before))
        assert after < before + 100, (before, after)
        # 1. Invalid transitions by id on the vision node too.
        for transition in (Transition.TRANSITION_CLEANUP, 99):
            assert lifecycle.set(transition) is False
        assert lifecycle.state() == "active" and node.proc.poll() is None
    finally:
        for participant in (client, lifecycle):
            if participant is not None:
                participant.close()
        assert node.stop() == 0, node.log()


# ------------------------------------------------------------------- 5. shutdown with a goal running

def test_shutdown_answers_the_running_goal(llm, domain_id):
    node, client = llm
    lifecycle = Lifecycle(domain_id, "/t/llm")
    try:
        feedback = []
        handle = client.send_goal("Write a very long story about a robot.", feedback=feedback,
                                  max_new_tokens=500)
        result = handle.get_result_async()   # asked before the shutdown, as rclpy clients do
        assert client.wait_for(lambda: len(feedback) >= 3, 60)
        assert lifecycle.set(Transition.TRANSITION_ACTIVE_SHUTDOWN) is True
        response = wait_future(result, timeout=30)
        assert response.status == 6, response   # ABORTED
        assert response.result.finish_reason == "error"
        assert "shut down" in response.result.error, response.result.error
        assert lifecycle.state() == "finalized"
    finally:
        lifecycle.close()


# ------------------------------------------------------------------- 6. duplicate request ids, 9. smalls

def test_a_duplicate_request_id_never_touches_the_running_stream(llm):
    node, client = llm
    rid = f"dup-{uuid.uuid4().hex[:6]}"
    client.request("Write a very long story about a robot.", rid, session_id=rid,
                   sampling={"max_new_tokens": 60})
    assert client.wait_for(lambda: len(client.chunks.get(rid, ())) >= 2, 60)
    client.request("Another question.", rid, session_id=rid)
    final = client.wait_final(rid, 120)
    assert final.finish_reason in ("stop", "length"), final
    assert_stream_ok(client.chunks[rid])   # one stream: gapless, one final chunk
    refusals = [r for r in client.chunks if r.startswith(f"{rid}#duplicate-")]
    assert len(refusals) == 1, list(client.chunks)
    refusal = client.wait_final(refusals[0], 10)
    assert refusal.finish_reason == "error" and f"duplicate request_id {rid!r}" in refusal.error


def test_unknown_cancels_blank_prompts_and_tiny_temperatures(llm):
    node, client = llm
    for i in range(1000):
        client.cancel_pub.publish(String(data=f"nobody-{i}"))
    for text in (" \u200b ", "\u200b\u200d\ufeff", "\t\u2060"):
        rid = f"blank-{uuid.uuid4().hex[:6]}"
        client.request(text, rid)
        assert "empty prompt" in client.wait_final(rid, 30).error
    answers = {}
    for temperature in (1e-38, 1e-6):
        rid = f"cold-{uuid.uuid4().hex[:6]}"
        client.request("Name a colour.", rid, session_id=rid, reset_session=True,
                       sampling={"temperature": temperature, "max_new_tokens": 16})
        client.wait_final(rid, 60)
        answers[temperature] = assert_stream_ok(client.chunks[rid])
    rid = f"greedy-{uuid.uuid4().hex[:6]}"
    client.request("Name a colour.", rid, session_id=rid, reset_session=True,
                   sampling={"top_k": 1, "max_new_tokens": 16})
    client.wait_final(rid, 60)
    greedy = assert_stream_ok(client.chunks[rid])
    assert answers[1e-38] == answers[1e-6] == greedy, (answers, greedy)
    time.sleep(1.0)
    warnings = node.log().count("cancel: no queued or running request")
    figures("unknown cancels", published=1000, log_lines=warnings)
    assert 1 <= warnings <= 5, warnings


def test_a_megabyte_model_parameter_is_not_repeated(domain_id, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("/**:\n  ros__parameters:\n    model: '" + "m" * (1 << 20) + "'\n")
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain_id), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
    from slm_ros.cli import node_executable
    log = open(tmp_path / "llm.log", "w")
    proc = subprocess.Popen([node_executable("llm_node"), "--ros-args", "-r", "__ns:=/t",
                             "--params-file", str(params)], stdout=log, stderr=subprocess.STDOUT,
                            env=env, preexec_fn=_die_with_parent)
    lifecycle = None
    try:
        lifecycle = Lifecycle(domain_id, "/t/llm")
        assert lifecycle.wait_for(lambda: any(
            s.name.startswith("/t/llm") and s.message for a in lifecycle.diagnostics
            for s in a.status), 60)
        time.sleep(3.0)
        sizes = [len(str(s.message)) + sum(len(kv.value) for kv in s.values)
                 for a in lifecycle.diagnostics for s in a.status]
        figures("1 MB model", diagnostics_status_chars_max=max(sizes))
        assert max(sizes) < 8192, max(sizes)
        assert lifecycle.state() == "unconfigured" and proc.poll() is None
    finally:
        if lifecycle is not None:
            lifecycle.close()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
        log.close()
    assert (tmp_path / "llm.log").stat().st_size < 64 << 10


def test_a_truncated_gguf_for_transformers_names_the_file(tmp_path):
    from slm_ros.core.errors import ModelLoadError
    from slm_ros.models import embedded_gguf, resolve_model
    for size in (1000, 200_000):
        cut = tmp_path / f"cut{size}.gguf"
        cut.write_bytes(embedded_gguf().read_bytes()[:size])
        with pytest.raises(ModelLoadError, match=f"GGUF file .*cut{size}.gguf is truncated"):
            resolve_model(str(cut))
