"""The LLM node: text prompts in, streamed token chunks out.

Interfaces (relative to the node namespace, e.g. ``/slm``):

* subscribes ``prompt`` (std_msgs/String, one request in the default session), ``request``
  (slm_ros/GenerateRequest) and ``cancel`` (std_msgs/String holding a request_id);
* publishes ``tokens`` (slm_ros/TokenChunk, every chunk of every request, whatever its source) and
  ``response`` (std_msgs/String, the full text of each request that did not fail);
* action server ``generate`` (slm_ros/action/Generate), feedback = chunks, cancellable.

Lifecycle: the model is loaded in ``on_configure`` and freed in ``on_cleanup``; requests are served
only while active (others get an error chunk). With ``autostart`` (default) the node configures and
activates itself, so ``ros2 run slm_ros llm_node`` serves right away.
"""

from __future__ import annotations

import threading
from typing import Optional

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from std_msgs.msg import String

from slm_ros.action import Generate
from slm_ros.backends.registry import available_backends
from slm_ros.core.errors import SlmError
from slm_ros.core.types import Chunk, FinishReason
from slm_ros.msg import GenerateRequest, TokenChunk
from slm_ros.ros import qos
from slm_ros.ros.conversions import (request_from_msg, request_from_prompt, stats_to_msg,
                                     tool_calls_to_msg)
from slm_ros.ros.diagnostics import shorten
from slm_ros.ros.model_node import GoalRun, ModelNode, model_parameters, run

#: Seconds between two log lines about cancels of unknown request ids (a flood is one line).
CANCEL_LOG_S = 5.0

PARAMETERS = model_parameters(
    available_backends("text"), "default",
    "Model to load: 'default' (embedded SmolLM2-135M-Instruct), a Hugging Face checkpoint "
    "directory, a .gguf file, or an engine/artifact directory made by the engine builder. Read at "
    "configure; no downloads.")


class LlmNode(ModelNode):
    """Lifecycle node serving text generation from one model (see the module docstring)."""

    modality = "text"
    PARAMETERS = PARAMETERS
    serves = "prompt, request and the generate action"
    diagnostic_task = "text generation"

    def __init__(self, node_name: str = "llm", **kwargs) -> None:
        super().__init__(node_name, **kwargs)
        # Commands (prompt/request/cancel) never wait behind a goal; goals run concurrently.
        self._command_group = MutuallyExclusiveCallbackGroup()

    def create_interfaces(self) -> None:
        self._tokens_pub = self.create_publisher(TokenChunk, "tokens", qos.TOKEN_STREAM)
        self._response_pub = self.create_publisher(String, "response", qos.RESULTS)
        self._entities = [
            self._tokens_pub, self._response_pub,
            self.create_subscription(String, "prompt", self._on_prompt, qos.COMMANDS,
                                     callback_group=self._command_group),
            self.create_subscription(GenerateRequest, "request", self._on_request, qos.COMMANDS,
                                     callback_group=self._command_group),
            self.create_subscription(String, "cancel", self._on_cancel_topic, qos.COMMANDS,
                                     callback_group=self._command_group),
        ]
        self.create_generation_action(Generate, "generate", self._start_goal)

    # -- requests --------------------------------------------------------------------------------

    def _sink(self, goal_handle=None, done: Optional[threading.Event] = None,
              out: Optional[list] = None):
        """Chunk consumer for one request: publishes on ``tokens`` (and as goal feedback), and on
        the final chunk publishes ``response`` and wakes a waiting goal (see goal_sink)."""
        texts = []

        def sink(chunk: Chunk) -> None:
            texts.append(chunk.text)
            if chunk.is_final and out is not None:
                out.append((chunk, "".join(texts)))
            self.publish_chunk(chunk, self._tokens_pub, goal_handle, Generate.Feedback)
            if chunk.is_final and chunk.finish_reason is not FinishReason.ERROR:
                self._response_pub.publish(String(data="".join(texts)))

        return self.goal_sink(sink, done)

    def _on_prompt(self, msg: String) -> None:
        self._engine.submit(request_from_prompt(msg.data), self._sink())

    def _on_request(self, msg: GenerateRequest) -> None:
        sink = self._sink()
        try:
            request = request_from_msg(msg)
        except SlmError as exc:  # invalid sampling fields: answered with an error chunk
            self._engine.reject(f"invalid request: {exc}", sink, msg.request_id, msg.session_id)
            return
        self._engine.submit(request, sink)

    def _on_cancel_topic(self, msg: String) -> None:
        request_id = msg.data.strip()
        if not self._engine.cancel(request_id):
            self.get_logger().warning(
                f"cancel: no queued or running request {shorten(request_id, 80)!r} (such lines "
                f"at most every {CANCEL_LOG_S:g} s)", throttle_duration_sec=CANCEL_LOG_S)

    def _start_goal(self, goal_handle) -> GoalRun:
        """Submit the goal's request (see ModelNode.create_generation_action)."""
        done, out = threading.Event(), []
        sink = self._sink(goal_handle, done, out)
        engine = self._engine
        try:
            request = request_from_msg(goal_handle.request.request)
        except SlmError as exc:
            engine.reject(f"invalid request: {exc}", sink, goal_handle.request.request.request_id,
                          goal_handle.request.request.session_id)
        else:
            # Tracked under the id the engine runs it as (a duplicate id is refused under another
            # one: a cancel of this goal must never reach the other request).
            request_id = engine.submit(request, sink)
            self.track_goal(goal_handle, request_id)
            if goal_handle.is_cancel_requested:  # cancelled before we knew its request id
                engine.cancel(request_id)
        return GoalRun(done, out, lambda chunk, text: Generate.Result(
            request_id=chunk.request_id, text=text, finish_reason=chunk.finish_reason.value,
            error=chunk.error, stats=stats_to_msg(chunk.stats),
            tool_calls=tool_calls_to_msg(chunk.tool_calls)),
            lambda error: self.goal_error_result(goal_handle, error))

    def goal_error_result(self, goal_handle, error: str) -> Generate.Result:
        return Generate.Result(request_id=goal_handle.request.request.request_id,
                               finish_reason=FinishReason.ERROR.value, error=error)


def main(args=None) -> int:
    """Entry point of ``ros2 run slm_ros llm_node``."""
    return run(LlmNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
