"""/diagnostics: the rules (plain functions) and node processes publishing them over real DDS."""

import threading
import time
from pathlib import Path

import pytest

from slm_ros.ros.diagnostics import (ERROR, OK, WARN, ModelNodeSample, builder_health,
                                     gpu_used_bytes, level_of, model_node_health,
                                     process_rss_bytes, to_status, values_of)


def sample(**fields):
    base = dict(state="active", backend="transformers", model="m", device="cpu", max_queue=10)
    base.update(fields)
    return ModelNodeSample(**base)


def test_active_idle_node_is_ok_with_every_value():
    health = model_node_health(sample(succeeded=3, accepted=3, last_ttft_ms=12.5,
                                      tokens_per_second=40.0, rss_bytes=300 << 20))
    assert (health.level, health.message) == (OK, "idle")
    values = dict(health.values)
    assert values["lifecycle_state"] == "active" and values["requests_served"] == "3"
    assert values["last_ttft_ms"] == "12.5" and values["tokens_per_second"] == "40.0"
    assert values["process_rss_mb"] == "300" and "gpu_memory_used_mb" not in values
    assert model_node_health(sample(busy=True)).message == "generating"


def test_overload_and_refusals_warn_failures_are_errors_per_period():
    assert model_node_health(sample(queue_depth=8)).level == WARN
    assert "overloaded: queue 8/10" in model_node_health(sample(queue_depth=8)).message
    assert model_node_health(sample(queue_depth=7)).level == OK
    before = sample(rejected=2, failed=1)
    refused = model_node_health(sample(rejected=5, failed=1), before)
    assert refused.level == WARN and "3 request(s) refused" in refused.message
    failed = model_node_health(sample(rejected=5, failed=3), before)
    assert failed.level == ERROR and "2 request(s) failed" in failed.message
    # The next period without new failures is OK again.
    assert model_node_health(sample(failed=3), sample(failed=3)).level == OK


def test_not_serving_is_a_warning_a_failed_configure_an_error():
    assert model_node_health(sample(state="unconfigured")).level == WARN
    assert model_node_health(sample(state="inactive")).message == "inactive: not serving"
    assert model_node_health(sample(state="configuring")).level == OK
    failed = model_node_health(sample(state="unconfigured", error="model '/x' not found"))
    assert failed.level == ERROR and failed.message.endswith("configure failed: model '/x' "
                                                             "not found")
    assert failed.value("last_error") == "model '/x' not found"


def test_builder_levels_and_message():
    assert builder_health("BUILDING", phase="convert", progress=0.42).message == \
        "building: convert 42%"
    ready = builder_health("READY", artifact="/c/a", cache_hit=True)
    assert ready.level == OK and ready.message == "ready (cache hit): /c/a"
    failed = builder_health("FAILED", error="out of memory")
    assert failed.level == ERROR and failed.value("error") == "out of memory"


def test_status_message_round_trip_and_process_readings():
    health = model_node_health(sample(extra=(("frames_received", "7"),)))
    msg = to_status(health, "/slm/llm: text generation", "robot")
    assert level_of(msg) == OK and msg.name == "/slm/llm: text generation"
    assert values_of(msg)["frames_received"] == "7" and msg.hardware_id == "robot"
    assert process_rss_bytes() > 10 << 20
    assert gpu_used_bytes("cpu") is None


# -- node processes over DDS ---------------------------------------------------------------------


class DiagnosticsListener:
    def __init__(self, domain_id):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor

        from slm_ros.ros import qos
        self._rclpy = rclpy
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node("diag_listener", context=self.context)
        self.history = {}
        self._cv = threading.Condition()
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on, qos.DIAGNOSTICS)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()

    def _on(self, msg):
        with self._cv:
            for status in msg.status:
                self.history.setdefault(status.name, []).append(status)
            self._cv.notify_all()

    def wait_for(self, name, predicate, timeout=60.0):
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for status in self.history.get(name, ()):
                    if predicate(status):
                        return status
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(level_of(s), s.message) for s in self.history.get(name, ())][-5:]
                    raise AssertionError(f"{name}: no matching status; last: {seen}")
                self._cv.wait(left)

    def close(self):
        self.executor.shutdown()
        self._thread.join(timeout=5)
        self.node.destroy_node()
        self._rclpy.try_shutdown(context=self.context)


def test_node_processes_report_failures_as_errors(tmp_path, domain_id):
    """A model node whose configure failed and a builder whose build failed stay up and say why
    on /diagnostics (ERROR). Serving nodes (OK, counters, TTFT, memory) are checked on the
    `slm-ros up` graph in test_launch_files.py."""
    from ros_helpers import NodeProcess

    listener = DiagnosticsListener(domain_id)
    bad = NodeProcess(domain_id, tmp_path / "bad.log", namespace="/bad",
                      model=str(tmp_path / "no-such-model"))
    builder = NodeProcess(domain_id, tmp_path / "builder.log", namespace="/b",
                          executable="engine_builder_node", model=str(tmp_path / "missing"),
                          cache_dir=str(tmp_path / "cache"))
    try:
        failed = listener.wait_for("/bad/llm: text generation",
                                   lambda s: level_of(s) == ERROR, timeout=90)
        assert "configure failed" in failed.message and "no-such-model" in failed.message
        values = values_of(failed)
        assert values["lifecycle_state"] == "unconfigured" and "no-such-model" in \
            values["last_error"]
        assert int(values["process_rss_mb"]) > 20 and values["requests_served"] == "0"
        build = listener.wait_for("/b/engine_builder: engine build",
                                  lambda s: values_of(s)["state"] == "FAILED", timeout=90)
        assert level_of(build) == ERROR and "missing" in build.message
        # Repeated about once a second, not only on changes.
        seen = len(listener.history["/bad/llm: text generation"])
        listener.wait_for("/bad/llm: text generation",
                          lambda s: len(listener.history["/bad/llm: text generation"]) >= seen + 2,
                          timeout=5)
    finally:
        listener.close()
        codes = [p.stop() for p in (bad, builder)]
    assert codes == [0, 0], (bad.log()[-2000:], builder.log()[-2000:])


@pytest.mark.skipif(not (Path("/dev/nvidiactl").exists() or Path("/etc/nv_tegra_release").exists()),
                    reason="no NVIDIA GPU here: the GPU memory reading needs one")
def test_gpu_memory_is_reported_on_a_gpu():
    import torch
    if not torch.cuda.is_available():
        pytest.skip("an NVIDIA device exists but torch sees no CUDA GPU")
    torch.zeros(1, device="cuda")
    used = gpu_used_bytes("cuda:0")
    assert used is not None and used > 0
