"""Thin ROS 2 adapters: QoS, parameters, message conversions and the outcome → status mapping."""
