"""Spinning a node process's executor until it is told to stop."""

from __future__ import annotations

from rclpy.executors import ExternalShutdownException

#: The exception rclpy raises for rcl errors (its module path differs between distros).
try:
    from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
    RCLError = _rclpy.RCLError
except (ImportError, AttributeError):  # pragma: no cover - every supported distro has it
    RCLError = RuntimeError


def spin_until_shutdown(executor) -> None:
    """``executor.spin()`` until Ctrl-C, SIGTERM or ``rclpy.shutdown()``; returns normally then.

    A shutdown (rclpy's signal handler) that lands while the executor builds its wait set makes the
    Jazzy wheels raise ``RCLError: failed to initialize wait set: the given context is not valid``
    instead of ExternalShutdownException (seen once in CI as a node stopped by SIGINT exiting 1):
    with the context shut down that is a shutdown too. Any other error, or one while the context is
    still valid, is raised.
    """
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except RCLError:
        if executor.context.ok():
            raise
