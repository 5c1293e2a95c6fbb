"""The LLM node alone: ``ros2 launch slm_ros llm.launch.py [namespace:=/slm] [model:=...]``.

Without a profile it serves the embedded SmolLM2-135M-Instruct with the node's default backend. For
a TensorRT-LLM engine use slm.launch.py (it starts the engine builder the node waits for).
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
            description="Namespace of the node and its topics/action."),
        DeclareLaunchArgument(
            "profile", default_value="",
            description="Board profile (config/profiles/); empty = the node's defaults."),
        DeclareLaunchArgument(
            "model", default_value="",
            description="A card of config/models/, 'default', a checkpoint directory or a "
                        ".gguf file; empty = the profile's default model, else 'default'."),
        DeclareLaunchArgument(
            "backend", default_value="",
            description="Backend override; empty = the profile's and card's choice."),
        DeclareLaunchArgument(
            "params_file", default_value="",
            description="Extra ROS parameters YAML for the node, applied last (e.g. "
                        "config/llm.yaml)."),
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(PathJoinSubstitution(
                [FindPackageShare("slm_ros"), "launch", "slm_node.launch.py"])),
            launch_arguments={
                "node": "llm_node", "namespace": LaunchConfiguration("namespace"),
                "profile": LaunchConfiguration("profile"), "model": LaunchConfiguration("model"),
                "backend": LaunchConfiguration("backend"),
                "params_file": LaunchConfiguration("params_file")}.items()),
    ])
