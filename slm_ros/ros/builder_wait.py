"""Waiting for the engine builder: the LLM and vision nodes load the artifact it announces.

The builder publishes ``engine_status`` (slm_ros/EngineStatus) with transient-local QoS, so a node
that starts after the build finished still receives the last state at once.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor

from slm_ros.core.errors import ModelLoadError
from slm_ros.msg import EngineStatus
from slm_ros.ros import qos


def wait_for_engine(context: Context, namespace: str, topic: str, timeout_s: float,
                    log: Callable[[str], None], node_name: str = "slm_ros_engine_wait",
                    poll_s: float = 0.1) -> EngineStatus:
    """Block until the builder on ``topic`` reports READY and return that status.

    ``topic`` should be fully qualified, resolved by the calling node
    (``node.resolve_topic_name``), so that the caller's remaps apply to it.

    Uses a private helper node on a private executor (not rclpy's process-wide global one, which
    would outlive the wait), so it works before the caller's executor spins (autostart) and from
    inside a lifecycle transition. The helper ignores the process's command-line arguments: a
    global ``-r __node:=llm`` (launch_ros passes one for every node) would otherwise rename it to
    the caller's name, putting two nodes of that name in the graph and taking over the caller's
    ``/rosout`` publisher registration. Raises :class:`ModelLoadError` when the build FAILED (with
    the builder's reason) or no READY arrived within ``timeout_s``.
    """
    node = rclpy.create_node(node_name, namespace=namespace or "/", context=context,
                             start_parameter_services=False, use_global_arguments=False,
                             enable_rosout=False)
    latest: list = []
    node.create_subscription(EngineStatus, topic, latest.append, qos.ENGINE_STATUS)
    resolved = node.resolve_topic_name(topic)
    log(f"waiting for the engine builder on {resolved} (timeout {timeout_s:.0f} s)")
    deadline = time.monotonic() + timeout_s
    last_note = 0.0
    status: Optional[EngineStatus] = None
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    try:
        while time.monotonic() < deadline:
            executor.spin_once(timeout_sec=poll_s)
            if latest:
                status = latest[-1]
                if status.state == EngineStatus.STATE_READY:
                    log(f"engine ready: {status.artifact_path}"
                        f"{' (from the cache)' if status.cache_hit else ''}")
                    return status
                if status.state == EngineStatus.STATE_FAILED:
                    raise ModelLoadError(
                        f"the engine builder failed for model {status.model!r} "
                        f"({status.backend}, {status.quantization}): {status.error}")
                if time.monotonic() - last_note > 10.0:
                    log(f"engine builder: {status.state} {status.phase} {status.progress:.0%}")
                    last_note = time.monotonic()
    finally:
        executor.shutdown()
        node.destroy_node()
    seen = f"last state {status.state} {status.phase}" if status else "no status received"
    raise ModelLoadError(f"no READY engine on {resolved} within {timeout_s:.0f} s ({seen}); is the "
                         f"engine_builder node running in this namespace?")
