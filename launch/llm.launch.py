"""Start the LLM node: ``ros2 launch slm_ros llm.launch.py [namespace:=/slm] [params_file:=...]``."""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory("slm_ros"), "config", "llm.yaml")
    return LaunchDescription([
        DeclareLaunchArgument("namespace", default_value="/slm",
                              description="Namespace of the node and its topics/action."),
        DeclareLaunchArgument("params_file", default_value=default_params,
                              description="YAML file with the llm node's parameters."),
        DeclareLaunchArgument("model", default_value="default",
                              description="'default', a checkpoint directory or a .gguf file."),
        Node(package="slm_ros", executable="llm_node", name="llm",
             namespace=LaunchConfiguration("namespace"), output="screen",
             parameters=[LaunchConfiguration("params_file"),
                         {"model": LaunchConfiguration("model")}]),
    ])
