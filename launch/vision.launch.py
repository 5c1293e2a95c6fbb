"""The vision node alone, on a camera: questions about the live image.

    ros2 launch slm_ros vision.launch.py model:=/models/SmolVLM-256M-Instruct \
        camera_topic:=/camera/image_raw
    ros2 launch slm_ros vision.launch.py profile:=orin-nano-8gb     # the profile's vision model
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
            description="Namespace of the node, its topics and actions."),
        DeclareLaunchArgument(
            "profile", default_value="",
            description="Board profile (config/profiles/); empty = the node's defaults."),
        DeclareLaunchArgument(
            "model", default_value="",
            description="Vision-language model: a card of config/models/ (e.g. "
                        "smolvlm-256m-instruct) or a checkpoint directory; empty = the "
                        "profile's default vision model (no VLM ships with slm_ros)."),
        DeclareLaunchArgument(
            "backend", default_value="",
            description="Backend override; empty = the profile's and card's choice."),
        DeclareLaunchArgument(
            "params_file", default_value="",
            description="Extra ROS parameters YAML applied last (e.g. config/vision.yaml)."),
        DeclareLaunchArgument(
            "camera_topic", default_value="/camera/image_raw",
            description="Camera image topic (its compressed variant is <topic>/compressed)."),
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(PathJoinSubstitution(
                [FindPackageShare("slm_ros"), "launch", "slm_node.launch.py"])),
            launch_arguments={
                "node": "vision_node", "namespace": LaunchConfiguration("namespace"),
                "profile": LaunchConfiguration("profile"), "model": LaunchConfiguration("model"),
                "backend": LaunchConfiguration("backend"),
                "params_file": LaunchConfiguration("params_file"),
                "camera_topic": LaunchConfiguration("camera_topic")}.items()),
    ])
