"""Base launch file: one slm_ros node from a board profile, a model card and a parameters file.

    ros2 launch slm_ros slm_node.launch.py node:=llm_node profile:=orin-nano-8gb \
        model:=tinyllama-1.1b-chat

The use-case files (slm.launch.py, vision.launch.py, engine_build.launch.py, llm.launch.py)
include this one once per node. Which parameter files and overrides the node gets is decided by
``slm_ros.ros.deployment.plan_node``, the function ``slm-ros up`` uses too, so both start the same
node from the same files: the profile (config/profiles/<profile>.yaml), the model card
(config/models/<model>.yaml) and ``params_file``, later ones winning; then the overrides. A file
that sets a parameter the node does not declare, or a value of the wrong type, stops the launch
with the file and key named, instead of being dropped silently by the node.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, LogInfo, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def _flag(text):
    """A launch argument as True/False, or None when empty (keep the files' value)."""
    text = text.strip().lower()
    if not text:
        return None
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _start_node(context):
    # Imported at launch time: the installed slm_ros package, with the nodes' parameter tables.
    from slm_ros.ros.deployment import builder_needed, check_plan, plan_node

    plan = plan_node(
        LaunchConfiguration("node").perform(context),
        namespace=LaunchConfiguration("namespace").perform(context),
        profile=LaunchConfiguration("profile").perform(context),
        model=LaunchConfiguration("model").perform(context),
        backend=LaunchConfiguration("backend").perform(context),
        params_file=LaunchConfiguration("params_file").perform(context),
        camera_topic=LaunchConfiguration("camera_topic").perform(context),
        wait_for_builder=_flag(LaunchConfiguration("wait_for_builder").perform(context)))
    if plan.skip:
        # The engine builder under a remote profile: slm.launch.py's use_builder defaults to true,
        # so a remote profile works without use_builder:=false; say why nothing starts.
        return [LogInfo(msg=f"{plan.fqn} not started: {plan.skip}")]
    reason = builder_needed(plan)
    if reason:
        raise RuntimeError(f"{reason}: launch slm.launch.py with use_builder:=true")
    check_plan(plan)
    parameters = list(plan.param_files)
    if plan.overrides:
        parameters.append(plan.overrides)
    return [Node(package="slm_ros", executable=plan.executable, name=plan.name,
                 namespace=plan.namespace, parameters=parameters, remappings=plan.remappings,
                 output="screen", emulate_tty=True)]


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument(
            "node", default_value="llm_node",
            choices=["llm_node", "vision_node", "engine_builder_node"],
            description="Node to start (its name is llm, vision or engine_builder)."),
        DeclareLaunchArgument(
            "namespace", default_value="/slm",
            description="Namespace of the node, its topics and actions."),
        DeclareLaunchArgument(
            "profile", default_value="",
            description="Board profile: cpu, x86-cuda, x86-intel, orin-nano-8gb, orin-nx-16gb, "
                        "agx-orin-64gb, remote (generation on a server) "
                        "(config/profiles/<profile>.yaml) or a YAML path; empty = the node's own "
                        "defaults."),
        DeclareLaunchArgument(
            "model", default_value="",
            description="Model card of config/models/ (e.g. tinyllama-1.1b-chat), 'default' "
                        "(embedded SmolLM2-135M-Instruct), a checkpoint directory or a .gguf "
                        "(profile remote: the served model's name); empty = the profile's "
                        "default model for this node, else the node's default."),
        DeclareLaunchArgument(
            "backend", default_value="",
            description="Backend override (auto, transformers, llama_cpp, tensorrt_llm, "
                        "openai); empty = the profile's and model card's choice."),
        DeclareLaunchArgument(
            "params_file", default_value="",
            description="Extra ROS parameters YAML applied after the profile and model card "
                        "(sections /**/llm, /**/vision, /**/engine_builder or /**)."),
        DeclareLaunchArgument(
            "wait_for_builder", default_value="",
            description="true: the LLM/vision node loads the engine builder's artifact; empty = "
                        "the parameter files' value (false)."),
        DeclareLaunchArgument(
            "camera_topic", default_value="",
            description="vision_node only: camera image topic its image input is remapped to "
                        "(image/compressed follows); empty = no remapping."),
        OpaqueFunction(function=_start_node),
    ])
