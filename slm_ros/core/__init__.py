"""ROS-free core of slm_ros: request types, streaming, sessions and the request engine.

Nothing under this package (or :mod:`slm_ros.backends`) imports rclpy; a test enforces it.
"""
