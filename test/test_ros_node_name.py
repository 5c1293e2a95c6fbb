"""Tier 3: a model node renamed on its command line (`-r __node:=...`, which launch_ros passes to every
node it starts) keeps its name to itself while it waits for the engine builder, and its log lines
reach /rosout after the engine is ready. Real node processes, real DDS on loopback; the test process
plays the engine builder by publishing a READY status (transient local, as the builder does)."""

import time

import pytest
from rcl_interfaces.msg import Log
from rclpy.qos import QoSDurabilityPolicy, QoSProfile, QoSReliabilityPolicy

from ros_helpers import NodeProcess, RosParticipant
from slm_ros.msg import EngineStatus
from slm_ros.ros import qos

NAMESPACE = "/t"


class BuilderStandIn(RosParticipant):
    """Publishes one engine status and collects /rosout and the graph's node names."""

    def __init__(self, domain_id: int) -> None:
        super().__init__(domain_id, "builder_stand_in", NAMESPACE)
        self.logs = []
        self.status_pub = self.node.create_publisher(EngineStatus, "engine_status",
                                                     qos.ENGINE_STATUS)
        rosout = QoSProfile(depth=1000, reliability=QoSReliabilityPolicy.RELIABLE,
                            durability=QoSDurabilityPolicy.TRANSIENT_LOCAL)
        self.node.create_subscription(Log, "/rosout", self._on_log, rosout)
        self.start(threads=2)

    def _on_log(self, msg: Log) -> None:
        with self._cv:
            self.logs.append(msg)
            self._cv.notify_all()

    def nodes_named(self, name: str):
        return [(n, ns) for n, ns in self.node.get_node_names_and_namespaces()
                if n == name and ns == NAMESPACE]

    def logged(self, logger: str, text: str) -> bool:
        return any(m.name == logger and text in m.msg for m in self.logs)

    def ready(self, backend: str, artifact: str) -> None:
        self.status_pub.publish(EngineStatus(state=EngineStatus.STATE_READY, phase="cache",
                                             progress=1.0, backend=backend,
                                             artifact_path=artifact, cache_hit=True))


def _check_renamed_node(domain_id, tmp_path, executable: str, name: str, backend: str,
                        artifact: str, **params) -> None:
    stand_in = BuilderStandIn(domain_id)
    node = NodeProcess(domain_id, tmp_path / f"{executable}.log", namespace=NAMESPACE,
                       executable=executable, remaps=[f"__node:={name}"], wait_for_builder=True,
                       builder_timeout_s=120.0, **params)
    try:
        assert node.wait_for_log("waiting for the engine builder", 60), node.log()
        # While it waits: the node's own name once in the graph, the helper under its own name.
        deadline = time.monotonic() + 10
        while not stand_in.nodes_named(f"{name}_engine_wait") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stand_in.nodes_named(f"{name}_engine_wait"), stand_in.node.get_node_names()
        assert len(stand_in.nodes_named(name)) == 1, stand_in.node.get_node_names_and_namespaces()

        stand_in.ready(backend, artifact)
        assert node.wait_for_log("active: serving", 120), node.log()
        logger = f"{NAMESPACE.strip('/')}.{name}"
        for line in ("engine ready", "configured:", "active: serving"):
            assert stand_in.wait_for(lambda: stand_in.logged(logger, line), 20), \
                (line, [(m.name, m.msg) for m in stand_in.logs])
        assert len(stand_in.nodes_named(name)) == 1
        assert not stand_in.nodes_named(f"{name}_engine_wait")   # gone with the wait
        assert "already registered" not in node.log(), node.log()
    finally:
        stand_in.close()
        assert node.stop() == 0, node.log()
    assert "Failed to publish log message" not in node.log(), node.log()


def test_llm_node_renamed_waits_under_its_own_name_and_logs_to_rosout(domain_id, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from slm_ros.models import embedded_gguf
    _check_renamed_node(domain_id, tmp_path, "llm_node", "talker_llm", "llama_cpp",
                        str(embedded_gguf()), default_max_new_tokens=4)


def test_vision_node_renamed_waits_under_its_own_name_and_logs_to_rosout(domain_id, tmp_path):
    from vlm_fixtures import build_tiny_llava
    vlm = build_tiny_llava(tmp_path / "vlm")
    _check_renamed_node(domain_id, tmp_path, "vision_node", "eyes", "transformers", str(vlm),
                        dtype="float32")
