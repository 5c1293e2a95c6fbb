"""An rclpy action client that may send goals from any thread.

rclpy's ``ActionClient`` (Humble, and Jazzy as shipped) sends a request first and registers the
future waiting for its response afterwards, without a lock. When an executor spins the client on
another thread and the server answers quickly (a goal refused at once, a result already there), the
response can be handled in that gap: rclpy logs "Ignoring unexpected goal response. There may be
more than one action server" and the future never completes. test/test_node_hardening.py hit it
sending 50 goals from the test thread. :class:`ThreadSafeActionClient` holds one lock around each
send and its registration and around the handling of responses, so a response is never looked up
before its request is registered.

Use it wherever goals are sent from a thread other than the one spinning the client (a
``MultiThreadedExecutor`` on a background thread, as robot executives often do); a client spun with
``spin_until_future_complete`` on the sending thread (the ``slm-ros`` CLI) does not need it.
"""

import threading

from rclpy.action import ActionClient


class ThreadSafeActionClient(ActionClient):
    """``rclpy.action.ActionClient`` whose requests may be sent from any thread (module doc)."""

    def __init__(self, *args, **kwargs) -> None:
        # Re-entrant: a done callback run while handling a response may send the next request.
        self._send_lock = threading.RLock()
        super().__init__(*args, **kwargs)

    async def execute(self, taken_data):
        with self._send_lock:
            return await super().execute(taken_data)

    def send_goal_async(self, goal, feedback_callback=None, goal_uuid=None):
        with self._send_lock:
            return super().send_goal_async(goal, feedback_callback=feedback_callback,
                                           goal_uuid=goal_uuid)

    def _cancel_goal_async(self, goal_handle):
        with self._send_lock:
            return super()._cancel_goal_async(goal_handle)

    def _get_result_async(self, goal_handle):
        with self._send_lock:
            return super()._get_result_async(goal_handle)
