"""The engine builder alone: build (or find in the cache) the artifact for a model and a board.

    ros2 launch slm_ros engine_build.launch.py profile:=orin-nano-8gb model:=tinyllama-1.1b-chat

It keeps running and announces the artifact on engine_status (transient local): LLM nodes started
later with wait_for_builder:=true load it; the build_engine action builds others on demand. To
build for a board on a larger host with the same JetPack, use that board's profile: its
device_profile makes the planner check the board's memory, not the host's.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.substitutions import FindPackageShare


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument(
            "namespace", default_value="/slm",
            description="Namespace of the builder, its engine_status topic and action."),
        DeclareLaunchArgument(
            "profile", default_value="",
            description="Board profile (config/profiles/): backend, quantization and memory "
                        "preset; empty = transformers on this machine."),
        DeclareLaunchArgument(
            "model", default_value="",
            description="Text model: a card of config/models/, 'default', a checkpoint "
                        "directory or a .gguf; empty = the profile's default model."),
        DeclareLaunchArgument(
            "backend", default_value="",
            description="Backend override (transformers, llama_cpp, tensorrt_llm); empty "
                        "= the profile's and card's choice."),
        DeclareLaunchArgument(
            "params_file", default_value="",
            description="Extra ROS parameters YAML applied last (e.g. "
                        "config/engine_builder.yaml)."),
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(PathJoinSubstitution(
                [FindPackageShare("slm_ros"), "launch", "slm_node.launch.py"])),
            launch_arguments={
                "node": "engine_builder_node", "namespace": LaunchConfiguration("namespace"),
                "profile": LaunchConfiguration("profile"), "model": LaunchConfiguration("model"),
                "backend": LaunchConfiguration("backend"),
                "params_file": LaunchConfiguration("params_file")}.items()),
    ])
