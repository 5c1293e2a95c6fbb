"""The one place where a generation outcome becomes a ROS action status."""

from __future__ import annotations

from slm_ros.core.types import FinishReason


def finish_goal(goal_handle, finish_reason: FinishReason) -> str:
    """Move ``goal_handle`` to its terminal state and return the state's name.

    stop / length → succeeded; cancelled → canceled when the client asked for it (rclpy allows
    ``canceled()`` only then), otherwise aborted (cancelled through the ``cancel`` topic); error →
    aborted.
    """
    if finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
        goal_handle.succeed()
        return "succeeded"
    if finish_reason is FinishReason.CANCELLED and goal_handle.is_cancel_requested:
        goal_handle.canceled()
        return "canceled"
    goal_handle.abort()
    return "aborted"
