"""The vision node: questions about the live camera, answered by a small vision-language model.

Interfaces (relative to the node namespace, e.g. ``/slm``; remap ``image`` to a camera):

* subscribes ``image`` (sensor_msgs/Image) and ``image/compressed`` (sensor_msgs/CompressedImage)
  with best-effort, depth-1 QoS (matches reliable and best-effort publishers). Only the newest frame
  is kept, undecoded: the camera callback swaps a reference, decoding happens when a question is
  answered;
* subscribes ``question`` (std_msgs/String): answered on the newest frame at inference start;
* publishes ``answer_tokens`` (slm_ros/TokenChunk, streamed) and ``answer`` (slm_ros/VisionAnswer,
  one per question, stamped with the header of the frame that was looked at);
* action server ``ask`` (slm_ros/action/AskImage): feedback = chunks, result = VisionAnswer,
  cancellable; a goal may carry its own image instead of using the camera;
* periodic mode: ``periodic_question`` at ``rate_hz`` on the newest frame. A frame is answered at
  most once, and frames arriving while the model is busy are skipped, never queued.

Lifecycle as the LLM node: the model loads in ``on_configure``; ``autostart`` (default) configures
and activates at start.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from typing import Optional

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.lifecycle import TransitionCallbackReturn
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from slm_ros.action import AskImage
from slm_ros.backends.registry import available_backends
from slm_ros.core.errors import ConfigError, ImageError, SlmError
from slm_ros.core.types import Chunk, FinishReason, Request, SamplingOverrides
from slm_ros.core.vision import (FIT_POLICIES, EncodedImage, FrameSlot, RawImage, check_fit,
                                 check_frame, check_size, fit_image)
from slm_ros.msg import TokenChunk, VisionAnswer
from slm_ros.ros import qos
from slm_ros.ros.conversions import (response_format_from_msg, sampling_from_msg, stamp_from_ns,
                                     stamp_ns, stats_to_msg)
from slm_ros.ros.diagnostics import shorten
from slm_ros.ros.model_node import GoalRun, ModelNode, model_parameters, run
from slm_ros.ros.params import ParamSpec

PARAMETERS = model_parameters(
    available_backends("vision"), "",
    "Vision-language model: a local Hugging Face checkpoint directory (e.g. SmolVLM-256M-Instruct,"
    " SmolVLM-500M-Instruct, llava-interleave-qwen-0.5b) or an artifact directory made by the "
    "engine builder. Required (no VLM ships with the package); read at configure; no downloads.",
) + (
    ParamSpec("image_max_side", 512,
              "Frames are downscaled so the longest side is at most this (pixels) before the model's "
              "processor; 0 = no limit.", int_range=(0, 16384)),
    ParamSpec("resize_policy", "downscale",
              f"How frames are fitted: {', '.join(FIT_POLICIES)}. pad_square keeps the whole field "
              f"of view for processors that centre-crop."),
    ParamSpec("camera_qos", "best_effort",
              "best_effort: matches reliable and best-effort camera publishers. reliable: only "
              "reliable publishers, but no large frame is lost to a dropped UDP fragment (measured "
              "on loopback at 640x480 rgb8 30 Hz: 13 vs 30 frames/s received).",
              read_only=True),
    ParamSpec("max_frame_age_ms", 1000.0,
              "Refuse to answer on a frame that arrived longer ago than this (the camera stopped?); "
              "0 = any age.", float_range=(0.0, 3.6e6)),
    ParamSpec("no_frame_timeout_s", 5.0,
              "A question asked before any frame arrived waits this long for one, then fails.",
              float_range=(0.0, 3600.0)),
    ParamSpec("processor_options", "",
              "JSON object of image-processor settings for the transformers backend, overriding the "
              "checkpoint's. For SmolVLM on a CPU: {\"do_image_splitting\": false, \"size\": "
              "{\"longest_edge\": 512}} (one 512 px view instead of up to 17 tiles: ~10x less "
              "prefill). Empty = the checkpoint's settings."),
    ParamSpec("max_image_pixels", 4096 * 4096,
              "Frames (camera or goal) with more pixels than this (width x height, read from the "
              "message or the PNG/JPEG header) are refused before decoding, with an error naming "
              "the limit; 0 = no limit.", int_range=(0, 1 << 40)),
    ParamSpec("max_image_bytes", 64 << 20,
              "Frames (camera or goal) whose data is larger than this many bytes are refused "
              "before decoding; 0 = no limit.", int_range=(0, 1 << 40)),
    ParamSpec("periodic_question", "",
              "Asked about the newest frame at rate_hz (empty = periodic mode off)."),
    ParamSpec("rate_hz", 0.0,
              "Periodic questions per second at most (0 = off). Busy periods skip frames.",
              float_range=(0.0, 100.0)),
)

#: Seconds between two log lines about bad frames nobody asked about.
_BAD_FRAME_LOG_S = 5.0


class VisionNode(ModelNode):
    """Lifecycle node answering questions about camera frames (see the module docstring)."""

    modality = "vision"
    PARAMETERS = PARAMETERS
    serves = "question, the ask action and image / image/compressed"
    diagnostic_task = "vision answers"

    def __init__(self, node_name: str = "vision", **kwargs) -> None:
        super().__init__(node_name, **kwargs)
        self._slot = FrameSlot(self.resolve_topic_name("image"))
        self._frame_arrived = threading.Condition()
        self._camera_group = MutuallyExclusiveCallbackGroup()   # never waits behind answers
        self._command_group = MutuallyExclusiveCallbackGroup()
        self._periodic_busy = False
        self._last_periodic_frame = None
        self._last_bad_log = 0.0
        self.frames_received = 0
        self.frames_decoded = 0

    # -- interfaces --------------------------------------------------------------------------------

    def create_interfaces(self) -> None:
        p = self.params()
        camera = qos.CAMERA_RELIABLE if p["camera_qos"] == "reliable" else qos.CAMERA
        self._tokens_pub = self.create_publisher(TokenChunk, "answer_tokens", qos.TOKEN_STREAM)
        self._answer_pub = self.create_publisher(VisionAnswer, "answer", qos.RESULTS)
        self._entities = [
            self._tokens_pub, self._answer_pub,
            self.create_subscription(Image, "image", self._on_image, camera,
                                     callback_group=self._camera_group),
            self.create_subscription(CompressedImage, "image/compressed", self._on_compressed,
                                     camera, callback_group=self._camera_group),
            self.create_subscription(String, "question", self._on_question, qos.COMMANDS,
                                     callback_group=self._command_group),
        ]
        if p["periodic_question"] and p["rate_hz"] > 0:
            self._entities.append(self.create_timer(1.0 / p["rate_hz"], self._on_periodic,
                                                    callback_group=self._command_group))
        self.create_generation_action(AskImage, "ask", self._start_goal)

    def destroy_interfaces(self) -> None:
        # Not once the context is shut down (Ctrl-C, SIGTERM): the line could not reach /rosout.
        if self._entities and self.context.ok():
            self.get_logger().info(f"camera: {self.frames_received} frames received, "
                                   f"{self.frames_decoded} decoded")
        self._slot.clear()

    def _configure(self, log) -> TransitionCallbackReturn:
        # Settings this node adds are checked before the (slow) model load, with a clear reason.
        p = self.params()
        try:
            if not p["model"] and not p["wait_for_builder"] and p["backend"] != "openai":
                raise ConfigError("parameter `model` is empty: point it at a local vision-language "
                                  "model directory (e.g. SmolVLM-256M-Instruct; see README)")
            check_fit(p["resize_policy"], p["image_max_side"])
            _processor_options(p["processor_options"])
            if p["camera_qos"] not in ("best_effort", "reliable"):
                raise ConfigError(f"camera_qos must be best_effort or reliable, got "
                                  f"{p['camera_qos']!r}")
        except ConfigError as exc:
            return self.configure_failed(log, f"invalid parameter: {exc}")
        return super()._configure(log)

    def diagnostic_values(self):
        return (("frames_received", str(getattr(self, "frames_received", 0))),
                ("frames_decoded", str(getattr(self, "frames_decoded", 0))))

    def backend_config(self, backend_name, model_path, p, engine_config):
        config = super().backend_config(backend_name, model_path, p, engine_config)
        if backend_name != "transformers":
            return config
        from slm_ros.backends.transformers_vlm_backend import VlmBackendConfig
        return VlmBackendConfig(**{f.name: getattr(config, f.name)
                                   for f in dataclasses.fields(config)},
                                image_options=_processor_options(p["processor_options"]))

    # -- camera ------------------------------------------------------------------------------------

    def _on_image(self, msg: Image) -> None:
        self._store(RawImage(encoding=msg.encoding, width=msg.width, height=msg.height,
                             step=msg.step, data=msg.data, is_bigendian=bool(msg.is_bigendian),
                             stamp_ns=stamp_ns(msg.header.stamp), frame_id=msg.header.frame_id))

    def _on_compressed(self, msg: CompressedImage) -> None:
        self._store(EncodedImage(format=msg.format, data=msg.data,
                                 stamp_ns=stamp_ns(msg.header.stamp),
                                 frame_id=msg.header.frame_id))

    def _store(self, frame) -> None:
        # O(1) sanity checks only (sizes, encoding); decoding waits for a question. A bad frame is
        # still stored: a question about it gets the error, the next good frame replaces it.
        problem = check_frame(frame)
        if problem:
            now = time.monotonic()
            if now - self._last_bad_log >= _BAD_FRAME_LOG_S:
                self._last_bad_log = now
                self.get_logger().warning(f"bad camera frame (further ones not logged for "
                                          f"{_BAD_FRAME_LOG_S:.0f} s): {problem}")
        self._slot.put(frame)
        self.frames_received += 1
        with self._frame_arrived:
            self._frame_arrived.notify_all()

    # -- answering ---------------------------------------------------------------------------------

    def _image_source(self, record: dict, goal_image: Optional[Image] = None):
        """The callable the engine calls at inference start: picks the frame, decodes and fits it,
        and notes which frame it was (for the answer's header and frame_age_ms)."""
        p = self.params()

        def source():
            if goal_image is not None:
                frame = RawImage(encoding=goal_image.encoding, width=goal_image.width,
                                 height=goal_image.height, step=goal_image.step,
                                 data=goal_image.data, is_bigendian=bool(goal_image.is_bigendian),
                                 stamp_ns=stamp_ns(goal_image.header.stamp),
                                 frame_id=goal_image.header.frame_id)
            else:
                frame = self._wait_for_frame(p["no_frame_timeout_s"])
                frame = self._slot.take(p["max_frame_age_ms"] / 1000.0)
            record["frame"] = frame
            check_size(frame, p["max_image_pixels"], p["max_image_bytes"])
            self.frames_decoded += 1
            now_ns = self.get_clock().now().nanoseconds
            record["age_ms"] = ((now_ns - frame.stamp_ns) / 1e6 if frame.stamp_ns
                                else (time.monotonic() - frame.received_monotonic) * 1e3)
            return fit_image(frame.decode(), p["image_max_side"], p["resize_policy"])

        return source

    def _wait_for_frame(self, timeout_s: float):
        deadline = time.monotonic() + timeout_s
        with self._frame_arrived:
            while self._slot.latest() is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ImageError(f"no image received on {self.resolve_topic_name('image')} or "
                                     f"{self.resolve_topic_name('image/compressed')} within "
                                     f"{timeout_s:g} s (no_frame_timeout_s); is the camera "
                                     f"publishing and remapped?")
                self._frame_arrived.wait(left)
        return self._slot.latest()

    def _sink(self, question: str, record: dict, goal_handle=None,
              done: Optional[threading.Event] = None, out: Optional[list] = None):
        texts = []

        def sink(chunk: Chunk) -> None:
            texts.append(chunk.text)
            answer = None
            if chunk.is_final:
                answer = self._answer(chunk, question, "".join(texts), record)
                if out is not None:
                    out.append((chunk, answer))
            self.publish_chunk(chunk, self._tokens_pub, goal_handle, AskImage.Feedback)
            if answer is not None:
                self._answer_pub.publish(answer)

        return self.goal_sink(sink, done)

    def _answer(self, chunk: Chunk, question: str, text: str, record: dict) -> VisionAnswer:
        """The VisionAnswer of a final chunk; if building it fails (a frame field a message cannot
        hold), an error answer naming the problem, so the question is still answered."""
        try:
            answer = VisionAnswer(request_id=chunk.request_id, question=question, text=text,
                                  finish_reason=chunk.finish_reason.value, error=chunk.error)
            frame = record.get("frame")
            if frame is not None:
                answer.header.stamp.sec, answer.header.stamp.nanosec = stamp_from_ns(
                    frame.stamp_ns)
                answer.header.frame_id = frame.frame_id
                answer.frame_age_ms = float(record.get("age_ms", 0.0))
            if chunk.stats is not None:
                answer.stats = stats_to_msg(chunk.stats)
            return answer
        except Exception as exc:  # noqa: BLE001 - the question must be answered whatever the frame
            error = f"could not build the answer: {type(exc).__name__}: {shorten(exc)}"
            self.get_logger().error(f"request {chunk.request_id}: {error}")
            return VisionAnswer(request_id=chunk.request_id, question=question, text=text,
                                finish_reason=FinishReason.ERROR.value, error=error)

    def _submit(self, question: str, sink_factory, request_id: str = "", session_id: str = "",
                sampling=None, goal_image: Optional[Image] = None, periodic: bool = False,
                response_format=None):
        record: dict = {}
        sink = sink_factory(question, record)
        engine = self._engine
        request_id = request_id or uuid.uuid4().hex
        if engine is None:   # cleaned up between the callback and here: still one final chunk
            sink(Chunk(request_id, session_id, 0, is_final=True, finish_reason=FinishReason.ERROR,
                       error="the vision node is not configured"))
            return request_id
        try:
            # Without a session id a question is one-off: no history from earlier frames.
            request = Request(prompt=question, request_id=request_id, session_id=session_id,
                              reset_session=not session_id,
                              sampling=(sampling_from_msg(sampling) if sampling is not None
                                        else SamplingOverrides()),
                              image=self._image_source(record, goal_image),
                              response_format=(response_format_from_msg(response_format)
                                               if response_format is not None else None))
        except SlmError as exc:
            engine.reject(f"invalid request: {exc}", sink, request_id, session_id)
            return request_id
        engine.submit(request, sink)
        return request_id

    def _on_question(self, msg: String) -> None:
        self._submit(msg.data, lambda q, r: self._sink(q, r))

    def _on_periodic(self) -> None:
        """Ask the periodic question when idle and a frame not answered yet is there."""
        engine = self._engine
        frame = self._slot.latest()
        if engine is None or self._periodic_busy or engine.busy or engine.queue_depth:
            return   # busy: this tick's frame is skipped, never queued
        if frame is None or frame is self._last_periodic_frame:
            return
        self._periodic_busy = True
        question = self.get_parameter("periodic_question").value

        def factory(q, record):
            inner = self._sink(q, record)

            def sink(chunk: Chunk) -> None:
                inner(chunk)
                if chunk.is_final:
                    self._last_periodic_frame = record.get("frame", frame)
                    self._periodic_busy = False
            return sink

        self._submit(question, factory)

    def _start_goal(self, goal_handle) -> GoalRun:
        """Submit the goal's question (see ModelNode.create_generation_action)."""
        goal = goal_handle.request
        done, out = threading.Event(), []
        request_id = uuid.uuid4().hex
        self.track_goal(goal_handle, request_id)
        image = goal.image if (goal.image.width or goal.image.height or len(goal.image.data)) \
            else None
        self._submit(goal.question, lambda q, r: self._sink(q, r, goal_handle, done, out),
                     request_id=request_id, session_id=goal.session_id, sampling=goal.sampling,
                     goal_image=image, response_format=goal.response_format)
        if goal_handle.is_cancel_requested and self._engine is not None:
            self._engine.cancel(request_id)
        return GoalRun(done, out, lambda _chunk, answer: AskImage.Result(answer=answer),
                       lambda error: self._error_result(request_id, goal.question, error))

    def goal_error_result(self, goal_handle, error: str) -> AskImage.Result:
        with self._goal_lock:
            request_id = self._goal_requests.get(bytes(goal_handle.goal_id.uuid), "")
        return self._error_result(request_id, goal_handle.request.question, error)

    @staticmethod
    def _error_result(request_id: str, question: str, error: str) -> AskImage.Result:
        return AskImage.Result(answer=VisionAnswer(
            request_id=request_id, question=question, finish_reason=FinishReason.ERROR.value,
            error=error))


def _processor_options(text: str) -> dict:
    """The ``processor_options`` parameter: empty or a JSON object; ConfigError otherwise."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"processor_options is not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"processor_options must be a JSON object, got {text!r}")
    return value


def main(args=None) -> int:
    """Entry point of ``ros2 run slm_ros vision_node``."""
    return run(VisionNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
