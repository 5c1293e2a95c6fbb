"""Tier 3: the installed engine_builder_node and an llm_node waiting for it, each in its own process,
real DDS on loopback, real builds of a tiny real model into a real cache directory."""

import json
import time
from pathlib import Path

import pytest

from ros_helpers import LlmClient, NodeProcess, RosParticipant, wait_future
from slm_ros.action import BuildEngine
from slm_ros.msg import EngineStatus
from slm_ros.ros import qos
from slm_ros.ros.action_client import ThreadSafeActionClient


class StatusClient(RosParticipant):
    """Subscribes engine_status (transient local) from the test process and keeps every state."""

    def __init__(self, domain_id: int, namespace: str = "/t") -> None:
        super().__init__(domain_id, "status_client", namespace)
        self.statuses = []
        self.node.create_subscription(EngineStatus, "engine_status", self._on_status,
                                      qos.ENGINE_STATUS)
        self.action = ThreadSafeActionClient(self.node, BuildEngine, "build_engine")
        self.start(threads=2)

    def _on_status(self, msg) -> None:
        with self._cv:
            self.statuses.append(msg)
            self._cv.notify_all()

    def wait_final(self, timeout: float = 120.0) -> EngineStatus:
        deadline = time.monotonic() + timeout
        with self._cv:
            while not (self.statuses and self.statuses[-1].state in ("READY", "FAILED")):
                left = deadline - time.monotonic()
                assert left > 0, f"no final status: {[s.state for s in self.statuses]}"
                self._cv.wait(timeout=left)
            return self.statuses[-1]



def _builder(did, tmp_path, cache, model, **params):
    log = tmp_path / f"builder-{time.monotonic_ns()}.log"
    node = NodeProcess(did, log, executable="engine_builder_node", model=model,
                       cache_dir=str(cache), dtype="float32", max_input_len=256, max_seq_len=512,
                       **params)
    return node


def test_status_sequence_late_joiner_and_llm_node_serving_the_artifact(tiny_model_dir, tmp_path):
    from domain_coordinator import domain_id as reserve
    cache = tmp_path / "cache"
    with reserve() as did:
        status = StatusClient(did)
        builder = _builder(did, tmp_path, cache, tiny_model_dir)
        llm = None
        try:
            final = status.wait_final()
            assert final.state == "READY", final.error
            states = [s.state for s in status.statuses]
            assert states[-1] == "READY" and "BUILDING" in states, states
            progress = [s.progress for s in status.statuses if s.state == "BUILDING"]
            assert progress == sorted(progress) and all(0 <= p <= 1 for p in progress)
            assert not final.cache_hit
            artifact = Path(final.artifact_path)
            assert (artifact / "manifest.json").is_file() and artifact.parent == cache
            manifest = json.loads(final.manifest_json)
            assert manifest == json.loads((artifact / "manifest.json").read_text())

            # A late joiner gets the last state at once (transient local).
            late = StatusClient(did)
            try:
                assert late.wait_final(10).artifact_path == final.artifact_path
            finally:
                late.close()

            # An LLM node told to wait for the builder loads the artifact and serves.
            llm = NodeProcess(did, tmp_path / "llm.log", wait_for_builder=True,
                              builder_timeout_s=60.0, dtype="float32", default_max_new_tokens=8,
                              default_repetition_penalty=1.0)
            assert llm.wait_for_log("active: serving", 120), llm.log()
            assert f"engine ready: {final.artifact_path}" in llm.log()
            client = LlmClient(did)
            try:
                client.wait_ready()
                feedback = []
                handle = client.send_goal("Hello", feedback)
                result = wait_future(handle.get_result_async()).result
                assert result.finish_reason in ("stop", "length"), result.error
            finally:
                client.close()
        finally:
            status.close()
            if llm is not None:
                assert llm.stop() == 0, llm.log()
            assert builder.stop() == 0, builder.log()

        # Relaunch: a cache hit, announced as such.
        status = StatusClient(did)
        builder = _builder(did, tmp_path, cache, tiny_model_dir)
        try:
            again = status.wait_final()
            assert again.state == "READY" and again.cache_hit, again.error
            assert again.artifact_path == final.artifact_path
        finally:
            status.close()
            assert builder.stop() == 0, builder.log()


@pytest.mark.parametrize("case", ["missing config", "unknown architecture", "corrupt weights"])
def test_bad_checkpoint_fails_with_reason_and_node_stays_alive(case, tiny_model_dir, tmp_path):
    import shutil
    bad = tmp_path / "bad-model"
    shutil.copytree(tiny_model_dir, bad)
    if case == "missing config":
        (bad / "config.json").unlink()
        words = "config.json"
    elif case == "unknown architecture":
        config = json.loads((bad / "config.json").read_text())
        config["model_type"] = "no_such_arch"
        config["architectures"] = ["NoSuchArchForCausalLM"]
        (bad / "config.json").write_text(json.dumps(config))
        words = "no_such_arch"
    else:
        weights = next(bad.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:1000])
        words = "safetensors"
    from domain_coordinator import domain_id as reserve
    with reserve() as did:
        status = StatusClient(did)
        builder = _builder(did, tmp_path, tmp_path / "cache", str(bad))
        try:
            final = status.wait_final()
            assert final.state == "FAILED"
            assert words in final.error, final.error
            assert not list((tmp_path / "cache").glob("*/manifest.json")), "published a failure"
            # Still alive: an on-demand build of a good model through the action succeeds.
            assert status.action.wait_for_server(timeout_sec=30)
            goal = BuildEngine.Goal(model=tiny_model_dir)
            handle = wait_future(status.action.send_goal_async(goal))
            result = wait_future(handle.get_result_async(), timeout=120)
            assert result.result.status.state == "READY", result.result.status.error
            assert result.status == 4  # SUCCEEDED
        finally:
            status.close()
            assert builder.stop() == 0, builder.log()


def test_llm_node_waiting_for_a_failed_build_fails_configure_with_the_reason(tmp_path):
    from domain_coordinator import domain_id as reserve
    bad = tmp_path / "empty-model"
    bad.mkdir()
    with reserve() as did:
        builder = _builder(did, tmp_path, tmp_path / "cache", str(bad))
        llm = NodeProcess(did, tmp_path / "llm.log", wait_for_builder=True, builder_timeout_s=60.0)
        try:
            assert llm.wait_for_log("not serving", 120), llm.log()
            assert "the engine builder failed" in llm.log()
            assert llm.proc.poll() is None, "the node must stay up for a later configure"
        finally:
            assert llm.stop() == 0, llm.log()
            assert builder.stop() == 0, builder.log()
