"""The language stack of a robot: engine builder -> LLM node, and optionally the vision node.

    ros2 launch slm_ros slm.launch.py                                  # CPU, embedded model
    ros2 launch slm_ros slm.launch.py profile:=orin-nano-8gb           # TinyLlama, int4 engine
    ros2 launch slm_ros slm.launch.py profile:=orin-nx-16gb with_vision:=true \
        camera_topic:=/camera/image_raw
    ros2 launch slm_ros slm.launch.py profile:=remote params_file:=server.yaml   # on a server

Each node comes from launch/slm_node.launch.py, in a scoped group so that one node's arguments do
not leak into the next. The LLM node waits for the builder through its parameters
(wait_for_builder, builder_status_topic, builder_timeout_s), not a delay: it subscribes to the
builder's transient-local engine_status and loads the artifact announced READY. `slm-ros up` starts
the same graph in one process where `ros2 launch` is not installed.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, GroupAction, IncludeLaunchDescription
from launch.conditions import IfCondition
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.substitutions import FindPackageShare


def _base():
    """A fresh source of the base launch file for each include (a source caches what it loads)."""
    return PythonLaunchDescriptionSource(
        PathJoinSubstitution([FindPackageShare("slm_ros"), "launch", "slm_node.launch.py"]))


def generate_launch_description():
    namespace = LaunchConfiguration("namespace")
    profile = LaunchConfiguration("profile")
    backend = LaunchConfiguration("backend")
    params_file = LaunchConfiguration("params_file")
    use_builder = LaunchConfiguration("use_builder")
    return LaunchDescription([
        DeclareLaunchArgument(
            "namespace", default_value="/slm",
            description="Namespace of every node, topic and action."),
        DeclareLaunchArgument(
            "profile", default_value="",
            description="Board profile: cpu, x86-cuda, x86-intel, orin-nano-8gb, orin-nx-16gb, "
                        "agx-orin-64gb, remote (generation on an OpenAI-compatible server) "
                        "(config/profiles/) or a YAML path; empty = the nodes' defaults "
                        "(backend auto, device auto, embedded model)."),
        DeclareLaunchArgument(
            "model", default_value="",
            description="Text model: a card of config/models/ (e.g. qwen2.5-1.5b-instruct), "
                        "'default', a checkpoint directory or a .gguf (profile remote: the "
                        "served model's name); empty = the profile's default model."),
        DeclareLaunchArgument(
            "vision_model", default_value="",
            description="Vision-language model for the vision node: a card (e.g. "
                        "smolvlm-256m-instruct) or a checkpoint directory; empty = the "
                        "profile's default vision model."),
        DeclareLaunchArgument(
            "backend", default_value="",
            description="Backend override for every node; empty = the profile's and cards' "
                        "choice."),
        DeclareLaunchArgument(
            "params_file", default_value="",
            description="Extra ROS parameters YAML applied to every node after the profile and "
                        "model card (sections /**/llm, /**/vision, /**/engine_builder)."),
        DeclareLaunchArgument(
            "use_builder", default_value="true",
            description="Start the engine builder and make the LLM node load its artifact "
                        "(TensorRT-LLM engines and quantized models need it; transformers "
                        "models also run without: false). Ignored, with a log line, under a "
                        "remote profile: nothing to build."),
        DeclareLaunchArgument(
            "with_vision", default_value="false",
            description="Also start the vision node (needs a vision model checkpoint)."),
        DeclareLaunchArgument(
            "camera_topic", default_value="/camera/image_raw",
            description="Camera image topic the vision node listens to (its compressed "
                        "variant is <topic>/compressed)."),
        GroupAction([
            IncludeLaunchDescription(_base(), launch_arguments={
                "node": "engine_builder_node", "namespace": namespace, "profile": profile,
                "model": LaunchConfiguration("model"), "backend": backend,
                "params_file": params_file}.items()),
        ], condition=IfCondition(use_builder)),
        GroupAction([
            IncludeLaunchDescription(_base(), launch_arguments={
                "node": "llm_node", "namespace": namespace, "profile": profile,
                "model": LaunchConfiguration("model"), "backend": backend,
                "params_file": params_file, "wait_for_builder": use_builder}.items()),
        ]),
        GroupAction([
            IncludeLaunchDescription(_base(), launch_arguments={
                "node": "vision_node", "namespace": namespace, "profile": profile,
                "model": LaunchConfiguration("vision_model"), "backend": backend,
                "params_file": params_file,
                "camera_topic": LaunchConfiguration("camera_topic")}.items()),
        ], condition=IfCondition(LaunchConfiguration("with_vision"))),
    ])
