"""The one place where a generation outcome becomes a ROS action status."""

from __future__ import annotations

import time

from slm_ros.core.types import FinishReason

#: How long a cancelled goal waits for rclpy to mark the client's cancel request (see finish_goal).
CANCEL_STATE_WAIT_S = 0.5


def finish_goal(goal_handle, finish_reason: FinishReason) -> str:
    """Move ``goal_handle`` to its terminal state and return the state's name.

    stop / length → succeeded; cancelled → canceled when the client asked for it (rclpy allows
    ``canceled()`` only then), otherwise aborted (cancelled through the ``cancel`` topic); error →
    aborted.

    A request still queued is cancelled at once, inside the server's cancel callback, and rclpy
    moves the goal to CANCELING only after that callback returns: a cancelled request waits up to
    ``CANCEL_STATE_WAIT_S`` for that state before it is taken for a cancel through the topic (the
    reliability suite saw client-cancelled goals end ABORTED without this).
    """
    if finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
        goal_handle.succeed()
        return "succeeded"
    if finish_reason is FinishReason.CANCELLED:
        deadline = time.monotonic() + CANCEL_STATE_WAIT_S
        while not goal_handle.is_cancel_requested and time.monotonic() < deadline:
            time.sleep(0.005)
    if finish_reason is FinishReason.CANCELLED and goal_handle.is_cancel_requested:
        goal_handle.canceled()
        return "canceled"
    goal_handle.abort()
    return "aborted"
