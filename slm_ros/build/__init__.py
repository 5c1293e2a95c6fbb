"""Engine builder: turns a checkpoint into a prepared, cached artifact for one backend and device.

ROS-free. :class:`~slm_ros.build.builder.Builder` hashes the checkpoint, plans memory
(:mod:`~slm_ros.build.planner`), runs the backend's build step (:mod:`~slm_ros.build.steps`) in a
temporary directory and publishes it atomically in the cache (:mod:`~slm_ros.build.cache`) with a
``manifest.json`` that says what it was built from and for. Importing this package imports nothing
heavy; torch and TensorRT-LLM load only when their step is asked for.
"""
