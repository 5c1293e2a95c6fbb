"""Lifecycle transitions that the current state does not have are refused, not fatal.

``ros2 lifecycle set <node> 2`` (a transition by id) that the current state does not offer makes
rclpy's ``change_state`` service raise ``RCLError: ... Transition is not registered`` out of
``executor.spin()``: the node process exits (ros2/rclpy#1209; fixed upstream by ros2/rclpy#1319, not
in the Jazzy wheels nor in Humble). By label rclpy answers ``success=False``. This module gives
requests by id the same answer on every distro: ``success=False``, with a log line naming the
transition and the state.
"""

from __future__ import annotations

from lifecycle_msgs.msg import Transition

from slm_ros.ros.spinning import RCLError as _RCLError

#: Transition ids by name, for log lines (lifecycle_msgs/Transition constants).
_NAMES = {getattr(Transition, n): n[len("TRANSITION_"):].lower() for n in dir(Transition)
          if n.startswith("TRANSITION_") and isinstance(getattr(Transition, n), int)}


def guard_change_state(node) -> bool:
    """Wrap ``node``'s ``change_state`` service callback so that a transition the current state
    does not have is answered ``success=False`` and logged. Returns False when the node has no
    such service (``enable_communication_interface=False``)."""
    service = getattr(node, "_service_change_state", None)
    if service is None or not callable(getattr(service, "callback", None)):
        return False
    original = service.callback

    def on_change_state(request, response):
        transition = request.transition
        machine = node._state_machine
        state_id, state = machine.current_state
        if not transition.label:
            available = {t[0] for t in machine.available_transitions}
            if transition.id not in available:
                return _refuse(node, response, transition.id, state, available)
        try:
            return original(request, response)
        except _RCLError as exc:   # anything else rcl refuses: answer, keep serving
            node.get_logger().warning(
                f"lifecycle transition {transition.label or transition.id} refused in state "
                f"{state!r}: {exc}")
            response.success = False
            return response

    service.callback = on_change_state
    return True


def _refuse(node, response, transition_id: int, state: str, available) -> object:
    names = ", ".join(f"{i} ({_NAMES.get(i, '?')})" for i in sorted(available)) or "none"
    node.get_logger().warning(
        f"lifecycle transition {transition_id} ({_NAMES.get(transition_id, 'unknown id')}) "
        f"refused: state {state!r} has transitions {names}")
    response.success = False
    return response
