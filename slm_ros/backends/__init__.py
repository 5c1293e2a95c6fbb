"""Model backends behind one interface (:class:`slm_ros.backends.base.Backend`).

Backends are imported lazily by :func:`slm_ros.backends.registry.create_backend`, so a machine without
PyTorch or TensorRT-LLM can still import slm_ros and get a one-line reason when it asks for them.
"""
