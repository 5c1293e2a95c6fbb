#!/usr/bin/env bash
# Entry point of the slm_ros images: source ROS and the workspace, then run the launch file.
#   docker run ... IMAGE                          -> ros2 launch slm_ros slm.launch.py (image CMD args)
#   docker run ... IMAGE profile:=orin-nx-16gb    -> the same with these launch arguments
#   docker run ... IMAGE vision.launch.py ...     -> another launch file of the package
#   docker run ... IMAGE bash                     -> any other command, in the sourced environment
set -eo pipefail
# shellcheck disable=SC1090,SC1091
source "/opt/ros/${ROS_DISTRO}/setup.bash"
# shellcheck disable=SC1091
source /ws/install/setup.bash
if [ "$#" -eq 0 ] || [[ "$1" == *:=* ]]; then
  exec ros2 launch slm_ros slm.launch.py "$@"
elif [[ "$1" == *.launch.py ]]; then
  exec ros2 launch slm_ros "$@"
fi
exec "$@"
