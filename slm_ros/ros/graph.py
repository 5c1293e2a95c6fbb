"""The node graph of ``launch/slm.launch.py``, in one process: what ``slm-ros up`` runs.

``ros2 launch`` is not always there (the PyPI ROS wheels have no ``launch``), so this module starts
the same nodes from the same YAML files in one process: :func:`plan_graph` asks
:func:`slm_ros.ros.deployment.plan_node` for each node exactly as ``launch/slm_node.launch.py``
does, and :func:`run_graph` creates the nodes with those parameter files (as node-specific
``--ros-args --params-file``, so rcl applies them with its own matching rules) and the overrides
(typed, as ``parameter_overrides``), spins them on one MultiThreadedExecutor and drives them up
on a bring-up thread, as a launch file's lifecycle events would: the builder's startup build, then
configure and activate of each model node in order.

One difference from the launch, where every node is a process of its own: here the bring-ups run
one after the other, never two at once. Loading two models concurrently in one process is not safe
(transformers/accelerate build a model on the "meta" device by patching module classes process-wide;
seen here as "Cannot copy out of meta tensor" when the builder saved one model while the vision node
loaded another), so the vision node starts loading after the LLM node is up.
"""

from __future__ import annotations

import threading
from typing import List, Optional

from slm_ros.core.errors import ConfigError
from slm_ros.ros.deployment import NODES, NodePlan, builder_needed, check_plan, plan_node


def plan_graph(*, namespace: str = "/slm", profile: str = "", model: str = "", backend: str = "",
               device: str = "", params_file: str = "", builder: bool = False,
               vision: bool = False, vision_model: str = "", camera_topic: str = "",
               share=None) -> List[NodePlan]:
    """The nodes of the graph, in start order, each checked against its declared parameters.

    Raises :class:`ConfigError` (file and key named) for anything that would make a node fail to
    start or silently ignore a setting, including ``builder`` with a remote profile (there is no
    engine to build for a model on a server; unlike the launch file's ``use_builder``, which
    defaults to true, ``--builder`` is always asked for, so it is refused rather than ignored).
    """
    common = dict(namespace=namespace, profile=profile, backend=backend, params_file=params_file,
                  share=share)
    plans = []
    if builder:
        plan = plan_node("engine_builder_node", model=model, **common)
        if plan.skip:
            raise ConfigError(f"{plan.skip}: drop --builder")
        plans.append(plan)
    llm = plan_node("llm_node", model=model, wait_for_builder=builder or None, **common)
    reason = builder_needed(llm)
    if reason:
        raise ConfigError(f"{reason}: add --builder")
    plans.append(llm)
    if vision:
        if not vision_model and not profile:
            raise ConfigError("--vision needs --vision-model: a vision-language model card (e.g. "
                              "smolvlm-256m-instruct) or checkpoint directory; no VLM ships with "
                              "slm_ros (README 'Vision node')")
        plans.append(plan_node("vision_node", model=vision_model, camera_topic=camera_topic,
                               **common))
    for plan in plans:
        if device:
            plan.overrides["device"] = device
        check_plan(plan)
    return plans


def describe(plans: List[NodePlan]) -> str:
    """A readable summary of the plans (``slm-ros up --check``)."""
    from slm_ros.ros.param_files import display_path
    lines = []
    for plan in plans:
        lines.append(f"{plan.fqn} ({plan.executable})")
        for path in plan.param_files:
            lines.append(f"    --params-file {display_path(path)}")
        for key, value in plan.overrides.items():
            shown = str(value).lower() if isinstance(value, bool) else value
            lines.append(f"    -p {key}:={shown}")
        for src, dst in plan.remappings:
            lines.append(f"    -r {src}:={dst}")
    return "\n".join(lines)


def _create(plan: NodePlan):
    from rclpy.parameter import Parameter
    cls = NODES[plan.executable].node_class()
    overrides = [Parameter(key, value=value) for key, value in plan.overrides.items()]
    return cls(namespace=plan.namespace, cli_args=plan.ros_arguments(),
               parameter_overrides=overrides)


def _bring_up(nodes, stop: threading.Event) -> None:
    """The builder's startup build, then configure + activate of each model node, one at a time
    (see the module docstring); failures are logged by the nodes, which stay up."""
    from slm_ros.nodes.engine_builder_node import EngineBuilderNode
    for node in nodes:
        if stop.is_set():
            return
        try:
            if isinstance(node, EngineBuilderNode):
                if node.get_parameter("build_on_start").value:
                    node.run_build(force=bool(node.get_parameter("force_rebuild").value))
            elif node.autostart:
                node.bring_up()
        except Exception as exc:  # noqa: BLE001 - after Ctrl-C the context is gone mid-transition
            node.get_logger().warning(f"bring-up stopped: {type(exc).__name__}: {exc}")
            return


def run_graph(plans: List[NodePlan]) -> int:
    """Create, start and spin every node of ``plans`` until Ctrl-C; returns an exit code."""
    import sys

    import rclpy
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

    from slm_ros.core.errors import SlmError
    from slm_ros.nodes.engine_builder_node import EngineBuilderNode
    from slm_ros.ros.spinning import spin_until_shutdown

    rclpy.init(args=[sys.argv[0]])
    nodes = []
    stop = threading.Event()
    executor: Optional[MultiThreadedExecutor] = None
    try:
        for plan in plans:
            nodes.append(_create(plan))
    except SlmError as exc:  # e.g. a bad device_profile of the engine builder
        print(f"slm-ros up: cannot start {plan.fqn}: {exc}", file=sys.stderr)
        for node in nodes:
            node.destroy_node()
        rclpy.try_shutdown()
        return 2
    # Size the pool for every model node's goals at once (ModelNode.goal_threads), plus spares.
    workers = 4 + sum(n.goal_threads() + 4 for n in nodes if not isinstance(n, EngineBuilderNode))
    executor = MultiThreadedExecutor(num_threads=workers)
    for node in nodes:
        executor.add_node(node)
    bring_up = threading.Thread(target=_bring_up, args=(nodes, stop), daemon=True,
                                name="slm-up-bring-up")
    try:
        bring_up.start()
        spin_until_shutdown(executor)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        stop.set()
        for node in nodes:
            if isinstance(node, EngineBuilderNode):
                node.cancel_build()
        bring_up.join(timeout=2.0)
        for node in nodes:
            if not isinstance(node, EngineBuilderNode):
                node._release()
        executor.shutdown()
        for node in nodes:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0
