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
import traceback
from typing import Dict, Optional

import rclpy
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from std_msgs.msg import String

from slm_ros.action import Generate
from slm_ros.backends.base import Backend, BackendConfig
from slm_ros.backends.registry import available_backends, create_backend
from slm_ros.core.engine import Engine, EngineConfig
from slm_ros.core.errors import SlmError
from slm_ros.core.types import Chunk, FinishReason, SamplingParams
from slm_ros.models import resolve_model
from slm_ros.msg import GenerateRequest, TokenChunk
from slm_ros.ros import qos
from slm_ros.ros.conversions import (chunk_to_msg, request_from_msg, request_from_prompt,
                                     stats_to_msg)
from slm_ros.ros.outcome import finish_goal
from slm_ros.ros.params import ParamSpec, declare_all, values

_D = SamplingParams()

PARAMETERS = (
    ParamSpec("backend", "transformers",
              f"Model backend: {', '.join(available_backends())}. Read at configure."),
    ParamSpec("model", "default",
              "Model to load: 'default' (embedded SmolLM2-135M-Instruct), a Hugging Face checkpoint "
              "directory or a .gguf file. Read at configure; no downloads."),
    ParamSpec("device", "auto", "auto, cpu, cuda or cuda:N. auto = CUDA when available."),
    ParamSpec("dtype", "auto",
              "auto, float32, bfloat16 or float16. auto: GPU bfloat16 (float16 without bf16 support); CPU "
              "bfloat16 with native bf16 instructions, else float32 (faster prefill)."),
    ParamSpec("threads", 0, "CPU threads for the backend; 0 = library default.", int_range=(0, 256)),
    ParamSpec("system_prompt", "",
              "System prompt for requests that bring none; empty = the model's chat-template default."),
    ParamSpec("default_max_new_tokens", _D.max_new_tokens,
              "Tokens generated at most when a request leaves max_new_tokens at 0.",
              int_range=(1, 1 << 20)),
    ParamSpec("default_temperature", _D.temperature,
              "Temperature when a request leaves it at 0; 0.0 = greedy decoding.",
              float_range=(0.0, 100.0)),
    ParamSpec("default_top_p", _D.top_p, "top_p when a request leaves it at 0; 1.0 = off.",
              float_range=(0.0, 1.0)),
    ParamSpec("default_top_k", _D.top_k, "top_k when a request leaves it at 0; 0 = off.",
              int_range=(0, 1 << 20)),
    ParamSpec("default_repetition_penalty", _D.repetition_penalty,
              "Repetition penalty when a request leaves it at 0; 1.0 = off. Around 1.1 keeps small "
              "models from looping.", float_range=(0.0, 10.0)),
    ParamSpec("default_seed", _D.seed, "Sampling seed when a request leaves it at 0; 0 = unseeded.",
              int_range=(0, (1 << 63) - 1)),
    ParamSpec("default_stop", [], "Stop strings when a request brings none."),
    ParamSpec("max_queue", 16,
              "Requests that may wait behind the running one; more are refused with a 'queue full' "
              "error chunk.", int_range=(0, 4096)),
    ParamSpec("max_history_turns", 8, "Finished turns kept per chat session; 0 = no history.",
              int_range=(0, 1024)),
    ParamSpec("max_context_tokens", 0,
              "Context window used (prompt + answer); 0 = the model's own. History is trimmed "
              "oldest-first to fit; a prompt that alone does not fit is refused.",
              int_range=(0, 1 << 24)),
    ParamSpec("autostart", True,
              "Configure and activate on start. False = wait for lifecycle transitions.",
              read_only=True),
)


def configs_from_params(p: Dict) -> tuple:
    """(backend name, model spec, BackendConfig-without-model fields, EngineConfig) from parameters.

    Raises :class:`SlmError` naming the parameter that is wrong.
    """
    try:
        defaults = SamplingParams(
            max_new_tokens=p["default_max_new_tokens"], temperature=p["default_temperature"],
            top_p=p["default_top_p"], top_k=p["default_top_k"],
            repetition_penalty=p["default_repetition_penalty"], seed=p["default_seed"],
            stop=tuple(p["default_stop"]))
        engine = EngineConfig(defaults=defaults, system_prompt=p["system_prompt"],
                              max_queue=p["max_queue"], max_history_turns=p["max_history_turns"],
                              max_context_tokens=p["max_context_tokens"])
    except SlmError as exc:
        raise type(exc)(f"invalid parameter: {exc}") from exc
    return p["backend"], p["model"], engine


class LlmNode(LifecycleNode):
    """Lifecycle node serving text generation from one model (see the module docstring)."""

    def __init__(self, node_name: str = "llm", **kwargs) -> None:
        super().__init__(node_name, **kwargs)
        declare_all(self, PARAMETERS)
        self._backend: Optional[Backend] = None
        self._engine: Optional[Engine] = None
        self._entities = []
        self._goal_requests: Dict[bytes, str] = {}
        self._goal_lock = threading.Lock()
        # Commands (prompt/request/cancel) never wait behind a goal; goals run concurrently.
        self._command_group = MutuallyExclusiveCallbackGroup()
        self._goal_group = ReentrantCallbackGroup()

    @property
    def autostart(self) -> bool:
        return bool(self.get_parameter("autostart").value)

    # -- lifecycle -----------------------------------------------------------------------------

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Load the model. FAILURE (logged with the reason) leaves the node unconfigured."""
        log = self.get_logger()
        try:
            return self._configure(log)
        except Exception as exc:  # noqa: BLE001 - rclpy drops transition exceptions silently
            log.error(f"configure failed unexpectedly: {type(exc).__name__}: {exc}\n"
                      f"{traceback.format_exc()}")
            self._release()
            return TransitionCallbackReturn.ERROR

    def _configure(self, log) -> TransitionCallbackReturn:
        try:
            backend_name, model, engine_config = configs_from_params(values(self, PARAMETERS))
            resolved = resolve_model(model, progress=log.info)
            backend = create_backend(backend_name)
            log.info(f"loading {resolved.name} with backend {backend_name} ...")
            backend.load(BackendConfig(
                model=resolved.path, device=self.get_parameter("device").value,
                dtype=self.get_parameter("dtype").value,
                max_context_tokens=engine_config.max_context_tokens,
                threads=self.get_parameter("threads").value))
            backend.warmup()
        except SlmError as exc:
            log.error(f"configure failed: {exc}")
            return TransitionCallbackReturn.FAILURE
        self._backend = backend
        self._engine = Engine(backend, engine_config, logger=log)
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
        self._action_server = ActionServer(
            self, Generate, "generate", execute_callback=self._execute,
            goal_callback=lambda _goal: GoalResponse.ACCEPT,
            cancel_callback=self._on_cancel_goal, callback_group=self._goal_group,
            feedback_pub_qos_profile=qos.ACTION_FEEDBACK)
        info = backend.describe()
        log.info(f"configured: {resolved.name} ({info.get('parameters', 0) / 1e6:.0f} M parameters) "
                 f"on {info.get('device', '?')} {info.get('dtype', '')}, context "
                 f"{self._engine.context_tokens} tokens, max_queue {engine_config.max_queue}")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._engine.start()
        self.get_logger().info("active: serving prompt, request and the generate action")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._engine.stop("the node was deactivated")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def _release(self) -> None:
        """Stop serving and free the model (idempotent)."""
        if self._engine is not None:
            self._engine.stop("the node is shutting down")
            self._engine = None
        if getattr(self, "_action_server", None) is not None:
            self._action_server.destroy()
            self._action_server = None
        for entity in self._entities:
            if hasattr(entity, "topic_name") and hasattr(entity, "publish"):
                self.destroy_publisher(entity)
            else:
                self.destroy_subscription(entity)
        self._entities = []
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    # -- requests --------------------------------------------------------------------------------

    def _sink(self, goal_handle=None, done: Optional[threading.Event] = None, out: Optional[list] = None):
        """Chunk consumer for one request: publishes on ``tokens`` (and as goal feedback), and on
        the final chunk publishes ``response`` and wakes a waiting goal."""
        texts = []

        def sink(chunk: Chunk) -> None:
            msg = chunk_to_msg(chunk, self.get_clock().now().to_msg())
            self._tokens_pub.publish(msg)
            if goal_handle is not None:
                goal_handle.publish_feedback(Generate.Feedback(chunk=msg))
            texts.append(chunk.text)
            if chunk.is_final:
                text = "".join(texts)
                if chunk.finish_reason is not FinishReason.ERROR:
                    self._response_pub.publish(String(data=text))
                if out is not None:
                    out.append((chunk, text))
                if done is not None:
                    done.set()

        return sink

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
        if not self._engine.cancel(msg.data.strip()):
            self.get_logger().warning(f"cancel: no queued or running request {msg.data.strip()!r}")

    def _execute(self, goal_handle) -> Generate.Result:
        done, out = threading.Event(), []
        sink = self._sink(goal_handle, done, out)
        goal_key = bytes(goal_handle.goal_id.uuid)
        engine = self._engine
        try:
            request = request_from_msg(goal_handle.request.request)
        except SlmError as exc:
            engine.reject(f"invalid request: {exc}", sink, goal_handle.request.request.request_id,
                          goal_handle.request.request.session_id)
        else:
            with self._goal_lock:
                self._goal_requests[goal_key] = request.request_id
            if goal_handle.is_cancel_requested:  # cancelled before we knew its request id
                engine.cancel(request.request_id)
            engine.submit(request, sink)
        done.wait()
        with self._goal_lock:
            self._goal_requests.pop(goal_key, None)
        chunk, text = out[0]
        finish_goal(goal_handle, chunk.finish_reason)
        return Generate.Result(
            request_id=chunk.request_id, text=text, finish_reason=chunk.finish_reason.value,
            error=chunk.error, stats=stats_to_msg(chunk.stats))

    def _on_cancel_goal(self, goal_handle) -> CancelResponse:
        with self._goal_lock:
            request_id = self._goal_requests.get(bytes(goal_handle.goal_id.uuid))
        if request_id is not None and self._engine is not None:
            self._engine.cancel(request_id)
        return CancelResponse.ACCEPT


def main(args=None) -> int:
    """Entry point of ``ros2 run slm_ros llm_node``."""
    rclpy.init(args=args)
    node = LlmNode()
    # Each running goal waits on a thread while the engine streams; size the pool for a full queue.
    threads = int(node.get_parameter("max_queue").value) + 4
    executor = MultiThreadedExecutor(num_threads=threads)
    executor.add_node(node)
    try:
        if node.autostart:
            if node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
                node.trigger_activate()
            else:
                node.get_logger().error(
                    "not serving: configure failed (see above); fix the parameters and trigger "
                    "configure again, e.g. `ros2 lifecycle set /llm configure`")
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node._release()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
