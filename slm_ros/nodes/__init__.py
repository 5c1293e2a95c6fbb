"""ROS 2 nodes of slm_ros, one node class per module."""
