"""What the LLM and vision nodes share: a lifecycle node holding one model behind an Engine.

``on_configure`` (optionally) waits for the engine builder, resolves the model, creates the backend
for the node's modality, loads it and warms it up, then calls :meth:`ModelNode.create_interfaces`;
``on_activate`` starts the engine; ``on_cleanup``/``on_shutdown`` free everything. Subclasses add
their own topics/actions and parameters. :func:`run` is the shared ``main``. Every model node
publishes its health on ``/diagnostics`` (:mod:`slm_ros.ros.diagnostics`) in every lifecycle state.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import traceback
from typing import Callable, Dict, FrozenSet, Optional, Sequence, Tuple, Type, Union

import rclpy
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from slm_ros.backends.base import BackendBase, BackendConfig, RemoteConfig
from slm_ros.backends.registry import choose_backend, create_backend
from slm_ros.core.engine import Engine, EngineConfig
from slm_ros.core.errors import SlmError
from slm_ros.core.streaming import call_in_thread
from slm_ros.core.types import SamplingParams
from slm_ros.models import DEFAULT_MODEL, ResolvedModel, resolve_model
from slm_ros.ros import diagnostics, qos
from slm_ros.ros.builder_wait import wait_for_engine
from slm_ros.ros.conversions import chunk_to_msg
from slm_ros.ros.lifecycle_guard import guard_change_state
from slm_ros.ros.outcome import finish_goal
from slm_ros.ros.params import ParamSpec, declare_all, values
from slm_ros.ros.spinning import spin_until_shutdown

_D = SamplingParams()
_R = RemoteConfig()


def model_parameters(backends: Sequence[str], default_model: str,
                     model_help: str) -> Tuple[ParamSpec, ...]:
    """The parameters every model node declares (backend, model, engine, builder wait)."""
    return (
        ParamSpec("backend", "auto",
                  f"Model backend: auto, {', '.join(backends)}. auto = the engine an "
                  f"engine-builder artifact was built for (onnxruntime_genai, openvino), llama_cpp "
                  f"for a GGUF text model (default included) on the CPU when llama-cpp-python is "
                  f"installed, else transformers. Read at configure."),
        ParamSpec("model", default_model, model_help),
        ParamSpec("device", "auto", "auto, cpu, cuda or cuda:N. auto = CUDA when available."),
        ParamSpec("dtype", "auto",
                  "auto, float32, bfloat16 or float16. auto: GPU bfloat16 (float16 without bf16 "
                  "support); CPU bfloat16 with native bf16 instructions, else float32 (faster "
                  "prefill)."),
        ParamSpec("threads", 0, "CPU threads for the backend; 0 = library default.",
                  int_range=(0, 256)),
        ParamSpec("kv_cache_fraction", 0.5,
                  "tensorrt_llm: fraction of free GPU memory the KV cache may take. The library "
                  "default 0.9 would starve the CPU side on Jetson (shared memory).",
                  float_range=(0.05, 0.95)),
        ParamSpec("system_prompt", "",
                  "System prompt for requests that bring none; empty = the model's chat-template "
                  "default."),
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
                  "Repetition penalty when a request leaves it at 0; 1.0 = off. Around 1.1 keeps "
                  "small models from looping.", float_range=(0.0, 10.0)),
        ParamSpec("default_seed", _D.seed,
                  "Sampling seed when a request leaves it at 0; 0 = unseeded.",
                  int_range=(0, (1 << 63) - 1)),
        ParamSpec("default_stop", [], "Stop strings when a request brings none."),
        ParamSpec("max_queue", 16,
                  "Requests that may wait behind the running one; more are refused with a 'queue "
                  "full' error chunk.", int_range=(0, 4096)),
        ParamSpec("max_history_turns", 8,
                  "Finished turns kept per chat session at most; past it only the newest half is "
                  "kept (trimmed in blocks, so the prompt's start, whose KV cache llama_cpp reuses, "
                  "stays the same for several turns); 0 = no history.",
                  int_range=(0, 1024)),
        ParamSpec("max_context_tokens", 0,
                  "Context window used (prompt + answer); 0 = the model's own. History is trimmed "
                  "oldest-first to fit; a prompt that alone does not fit is refused.",
                  int_range=(0, 1 << 24)),
        ParamSpec("max_prompt_bytes", 262_144,
                  "Requests whose prompt and system prompt take more UTF-8 bytes than this are "
                  "refused before tokenizing (error chunk naming the limit); 0 = no limit.",
                  int_range=(0, 1 << 31)),
        ParamSpec("request_timeout_s", 0.0,
                  "A request still unfinished this many seconds after it was accepted (queue wait "
                  "included) is stopped with an error chunk: a backstop for requests whose client "
                  "is gone without a trace (topic requests; goals are also watched, see "
                  "goal_client_check_s). 0 = off.", float_range=(0.0, 86400.0)),
        ParamSpec("goal_result_timeout_s", 30.0,
                  "Seconds a finished goal's result (its request, prompt or image included) is kept "
                  "for clients that ask for it late; rclpy's default keeps it 15 minutes. rclpy "
                  "clients ask as soon as the goal is accepted. Read at configure.",
                  float_range=(1.0, 86400.0)),
        ParamSpec("goal_client_check_s", 1.0,
                  "How often running and queued goals are checked for a client that left the ROS "
                  "graph (a killed process): its goals are cancelled (final chunk: cancelled, with "
                  "the reason). DDS notices a killed participant when its lease expires (Fast DDS: "
                  "20 s by default; see README 'Clients that die'). 0 = no check.",
                  float_range=(0.0, 3600.0)),
        ParamSpec("stream_interval_ms", 50,
                  "Shortest time between two streamed chunks of one request: text generated "
                  "meanwhile goes out together in the next chunk (at most 20 chunks/s at the "
                  "default 50, so messages do not cost decode speed on a small CPU; README "
                  "'Streaming granularity'). The first and the final chunk are never held back. "
                  "0 = a chunk per token.", int_range=(0, 10000)),
        ParamSpec("remote.base_url", _R.base_url,
                  "openai backend: base URL of the OpenAI-compatible server, up to and including "
                  "/v1 (trtllm-serve, vLLM, NIM, Ollama, llama.cpp server). `model` is then the "
                  "served model's name; default = the first model the server lists."),
        ParamSpec("remote.api_key_env", _R.api_key_env,
                  "openai backend: name of the environment variable holding the API key (sent as "
                  "a Bearer token; never a parameter value, never logged). Unset or empty "
                  "variable = no key."),
        ParamSpec("remote.connect_timeout_s", _R.connect_timeout_s,
                  "openai backend: seconds to open the connection to the server.",
                  float_range=(0.01, 3600.0)),
        ParamSpec("remote.first_token_timeout_s", _R.first_token_timeout_s,
                  "openai backend: seconds from sending a request to its first token (queueing "
                  "and prefill on the server).", float_range=(0.01, 3600.0)),
        ParamSpec("remote.token_timeout_s", _R.token_timeout_s,
                  "openai backend: seconds allowed between two streamed tokens before the "
                  "request fails as stalled.", float_range=(0.01, 3600.0)),
        ParamSpec("remote.max_in_flight", _R.max_in_flight,
                  "openai backend: requests sent to the server at once; more wait in the queue "
                  "(max_queue). Read at configure.", int_range=(1, 256)),
        ParamSpec("remote.max_retries", _R.max_retries,
                  "openai backend: retries of a request that failed before its first token "
                  "(connection refused, 429, 502/503/504); never after, so text is never "
                  "duplicated.", int_range=(0, 100)),
        ParamSpec("remote.max_retry_wait_s", _R.max_retry_wait_s,
                  "openai backend: longest wait before a retry; a 429 Retry-After above it fails "
                  "the request instead.", float_range=(0.0, 3600.0)),
        ParamSpec("remote.extra_sampling", _R.extra_sampling,
                  "openai backend: also send top_k and the repetition penalty (repetition_penalty "
                  "for vLLM/trtllm-serve, repeat_penalty for llama.cpp), which the OpenAI API "
                  "does not define. False = standard fields only, for strict servers."),
        ParamSpec("remote.json_schema_style", _R.json_schema_style,
                  "openai backend: how a JSON Schema response_format is sent: openai "
                  "({type: json_schema, json_schema: {schema}}: vLLM, trtllm-serve, Ollama) or "
                  "json_object ({type: json_object, schema}: llama-cpp-python's server). The "
                  "output is validated on the robot either way."),
        ParamSpec("wait_for_builder", False,
                  "Wait at configure for the engine builder's READY status and load the artifact "
                  "it announces (its backend and path replace `backend` and `model`)."),
        ParamSpec("builder_status_topic", "engine_status",
                  "EngineStatus topic of the engine builder (relative to this node's namespace)."),
        ParamSpec("builder_timeout_s", 3600.0,
                  "Seconds to wait for the builder before configure fails. Engine builds on an "
                  "8 GB Orin take tens of minutes.", float_range=(0.0, 86400.0)),
        ParamSpec("autostart", True,
                  "Configure and activate on start. False = wait for lifecycle transitions.",
                  read_only=True),
    )


def engine_config_from_params(p: Dict) -> EngineConfig:
    """The engine settings from parameter values; raises :class:`SlmError` naming the parameter."""
    try:
        defaults = SamplingParams(
            max_new_tokens=p["default_max_new_tokens"], temperature=p["default_temperature"],
            top_p=p["default_top_p"], top_k=p["default_top_k"],
            repetition_penalty=p["default_repetition_penalty"], seed=p["default_seed"],
            stop=tuple(p["default_stop"]))
        return EngineConfig(defaults=defaults, system_prompt=p["system_prompt"],
                            max_queue=p["max_queue"], max_history_turns=p["max_history_turns"],
                            max_context_tokens=p["max_context_tokens"],
                            stream_interval_ms=p["stream_interval_ms"],
                            max_prompt_bytes=p["max_prompt_bytes"],
                            request_timeout_s=p["request_timeout_s"])
    except SlmError as exc:
        raise type(exc)(f"invalid parameter: {exc}") from exc


def remote_config_from_params(p: Dict) -> RemoteConfig:
    """The ``remote.*`` parameters as a :class:`RemoteConfig` (raises ConfigError naming one)."""
    return RemoteConfig(**{f.name: p[f"remote.{f.name}"] for f in dataclasses.fields(RemoteConfig)})


#: Longest parameter-derived text a log line repeats (a 1 MB `model` value is not logged whole).
LOG_TEXT = 2000

#: Seconds a lifecycle shutdown/cleanup waits for running goals to be answered before the action
#: server goes away (their requests were stopped; this is only the result's way out).
GOAL_DRAIN_S = 5.0


@dataclasses.dataclass
class GoalRun:
    """A goal's request handed to the engine: its sink sets ``done`` on the final chunk, after
    appending ``(final chunk, value)`` to ``out``; ``result(chunk, value)`` builds the action's
    result from them. ``failed(message)`` builds the result of a goal whose final chunk could
    not be delivered (``out`` empty when ``done`` is set)."""

    done: threading.Event
    out: list
    result: Callable[[object, object], object]
    failed: Callable[[str], object]


class ModelNode(LifecycleNode):
    """A lifecycle node serving one model through an :class:`Engine`; see the module docstring."""

    #: "text" or "vision": which backend family :func:`create_backend` picks.
    modality: str = "text"
    #: The node's parameter table (subclasses extend :func:`model_parameters`).
    PARAMETERS: Tuple[ParamSpec, ...] = ()
    #: What the node serves once active (for the log line "active: serving ...").
    serves: str = "requests"
    #: What its /diagnostics status is about (the status name is "<node>: <this>").
    diagnostic_task: str = "model server"

    def __init__(self, node_name: str, **kwargs) -> None:
        super().__init__(node_name, **kwargs)
        declare_all(self, self.PARAMETERS)
        self._backend: Optional[BackendBase] = None
        self._engine: Optional[Engine] = None
        self._entities = []
        # Goals run concurrently, each waiting for its request; goal id -> request id for cancels.
        self._goal_group = ReentrantCallbackGroup()
        self._goal_requests: Dict[bytes, str] = {}
        self._goal_runs: Dict[bytes, Union[GoalRun, str]] = {}   # str: why it failed
        # Goal id -> the participants (DDS GUID prefixes) subscribed to the action's feedback
        # when it was accepted: the client that sent it is one of them (see _check_goal_clients).
        self._goal_clients: Dict[bytes, FrozenSet[bytes]] = {}
        self._executing = 0          # execute callbacks not yet returned
        self._goal_lock = threading.Lock()
        self._feedback_topic = ""
        self._action_server: Optional[ActionServer] = None
        self._model_label = ""
        self._configure_error = ""
        self._last_sample: Optional[diagnostics.ModelNodeSample] = None
        self._diagnostics = diagnostics.DiagnosticsPublisher(
            self, f"{self.get_fully_qualified_name()}: {self.diagnostic_task}",
            self._health).start()
        guard_change_state(self)

    @property
    def autostart(self) -> bool:
        return bool(self.get_parameter("autostart").value)

    def params(self) -> Dict:
        return values(self, self.PARAMETERS)

    def goal_threads(self) -> int:
        """Executor threads the node's goals can hold at once: each running or queued goal waits
        on one while the engine streams (a remote backend runs up to ``remote.max_in_flight``)."""
        return int(self.get_parameter("max_queue").value) + \
            int(self.get_parameter("remote.max_in_flight").value)

    def bring_up(self) -> None:
        """Configure and activate (what ``autostart`` does); on failure log how to retry. The
        node stays up either way."""
        if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            self.trigger_activate()
            return
        self.get_logger().error(
            f"not serving: configure failed (see above); fix the parameters and trigger configure "
            f"again, e.g. `ros2 lifecycle set {self.get_fully_qualified_name()} configure`")

    # -- subclass hooks ------------------------------------------------------------------------

    def create_interfaces(self) -> None:
        """Create topics/actions (called at the end of a successful configure)."""

    def create_generation_action(self, action_type, name: str,
                                 start: Callable[[object], GoalRun]) -> None:
        """The node's streaming action server: every goal accepted, cancel mapped to the engine,
        feedback and services on the deep QoS profiles (rclpy's depth-10 defaults drop chunks and
        goals under load).

        ``start(goal_handle)`` submits the goal's request to the engine without blocking and
        returns its :class:`GoalRun`. ``start`` runs as soon as the goal is accepted, in the
        executor callback that accepted it: generation does not wait for the executor to dispatch
        the execute callback (1-3 ms on a small CPU), which only waits for the final chunk, ends
        the goal and returns its result."""
        p = self.params()
        self._action_server = ActionServer(
            self, action_type, name, execute_callback=self._execute_goal,
            goal_callback=lambda _goal: GoalResponse.ACCEPT,
            handle_accepted_callback=lambda goal_handle: self._accept_goal(goal_handle, start),
            cancel_callback=self._on_cancel_goal, callback_group=self._goal_group,
            feedback_pub_qos_profile=qos.ACTION_FEEDBACK,
            goal_service_qos_profile=qos.ACTION_SERVICES,
            result_service_qos_profile=qos.ACTION_SERVICES,
            cancel_service_qos_profile=qos.ACTION_SERVICES,
            result_timeout=max(1, round(p["goal_result_timeout_s"])))
        self._feedback_topic = f"{self.resolve_topic_name(name)}/_action/feedback"
        if p["goal_client_check_s"] > 0:
            self._entities.append(self.create_timer(
                p["goal_client_check_s"], self._check_goal_clients,
                callback_group=MutuallyExclusiveCallbackGroup()))

    def _action_clients(self) -> FrozenSet[bytes]:
        """The participants (12-byte DDS GUID prefixes of the endpoint GIDs) with a subscription to
        the action's feedback topic: every rclpy/rclcpp action client has one."""
        return frozenset(bytes(info.endpoint_gid)[:12]
                         for info in self.get_subscriptions_info_by_topic(self._feedback_topic))

    def _check_goal_clients(self) -> None:
        """Cancel the goals whose client left the ROS graph (timer, ``goal_client_check_s``).

        The action server does not say which participant sent a goal (rclpy exposes no request
        writer GUID), so a goal remembers the action clients present when it was accepted; it is
        orphaned once none of them is left. With one client at a time (a robot's executive) that
        is exactly its client; with several, a goal outlives a dead client while another one
        stays, and ``request_timeout_s`` is the backstop. DDS drops a killed participant when its
        lease expires (Fast DDS default 20 s, 3 s with config/fastdds/short_lease.xml)."""
        with self._goal_lock:
            watched = dict(self._goal_clients)
        if not watched or self._engine is None:
            return
        present = self._action_clients()
        orphaned = []
        with self._goal_lock:
            for key, candidates in watched.items():
                if key not in self._goal_clients:
                    continue
                if not candidates:   # accepted before its client's endpoints were discovered
                    if present:
                        self._goal_clients[key] = present
                elif not candidates & present:
                    del self._goal_clients[key]
                    orphaned.append(self._goal_requests.get(key))
        engine = self._engine
        cancelled = [rid for rid in orphaned if rid and engine is not None and engine.cancel(
            rid, note="cancelled by the node: the goal's action client left the ROS graph")]
        if cancelled:
            self.get_logger().warning(
                f"{len(cancelled)} goal(s) cancelled: their action client left the ROS graph "
                f"(requests {', '.join(cancelled[:5])}{' ...' if len(cancelled) > 5 else ''})")

    def publish_chunk(self, chunk, tokens_pub, goal_handle=None, feedback_type=None) -> None:
        """Publish one engine chunk: as the goal's feedback first (its waiting client is the
        latency-critical one), then on the node's chunk topic ``tokens_pub`` if anything
        subscribes to it.

        The topic is volatile, so a publication with no matched subscriber reaches nobody; skipping
        it saves its conversion and write (~50 us a chunk on a small CPU, measured), which on a
        machine whose cores all run the model comes out of decoding."""
        if not self.context.ok():   # Ctrl-C / SIGTERM: the engine is being stopped, nobody to tell
            return
        msg = chunk_to_msg(chunk, self.get_clock().now().to_msg())
        if goal_handle is not None:
            goal_handle.publish_feedback(feedback_type(chunk=msg))
        if tokens_pub.get_subscription_count():
            tokens_pub.publish(msg)

    def _accept_goal(self, goal_handle, start: Callable[[object], GoalRun]) -> None:
        try:
            run: Union[GoalRun, str] = start(goal_handle)
        except Exception as exc:  # noqa: BLE001 - a goal must end even when starting it fails
            error = f"the node could not start this goal: {type(exc).__name__}: {exc}"
            self.get_logger().error(f"goal {bytes(goal_handle.goal_id.uuid).hex()}: "
                                    f"{diagnostics.shorten(error, LOG_TEXT)}")
            run = diagnostics.shorten(error)
        key = bytes(goal_handle.goal_id.uuid)
        clients = self._action_clients() if self._feedback_topic else frozenset()
        with self._goal_lock:
            self._goal_runs[key] = run
            self._goal_clients[key] = clients
            self._executing += 1
        goal_handle.execute()   # EXECUTING; schedules _execute_goal

    def goal_error_result(self, goal_handle, error: str):
        """The action result of a goal that ends in ``error`` before its request reached the
        engine (subclasses fill their result type's error fields)."""
        return self._action_server.action_type.Result()

    def _execute_goal(self, goal_handle):
        key = bytes(goal_handle.goal_id.uuid)
        try:
            with self._goal_lock:
                run = self._goal_runs.pop(key)
            if isinstance(run, str):   # start failed (logged): the reason
                goal_handle.abort()
                return self.goal_error_result(goal_handle, run)
            run.done.wait()
            if not run.out:   # the final chunk could not be delivered (logged by the engine)
                goal_handle.abort()
                return run.failed("the node failed while delivering this goal's result; see its "
                                  "log")
            chunk, value = run.out[0]
            finish_goal(goal_handle, chunk.finish_reason)
            return run.result(chunk, value)
        finally:
            with self._goal_lock:
                self._goal_requests.pop(key, None)
                self._goal_clients.pop(key, None)
                self._executing -= 1

    def goal_sink(self, sink: Callable, done: Optional[threading.Event]) -> Callable:
        """``sink`` for a goal's request that sets ``done`` after the final chunk whatever
        ``sink`` does with it (raises included), so the goal always ends and its executor thread
        is released."""
        if done is None:
            return sink

        def deliver(chunk) -> None:
            try:
                sink(chunk)
            finally:
                if chunk.is_final:
                    done.set()

        return deliver

    def track_goal(self, goal_handle, request_id: str) -> None:
        """Remember which request a goal runs, so a goal cancel reaches the engine."""
        with self._goal_lock:
            self._goal_requests[bytes(goal_handle.goal_id.uuid)] = request_id

    def _on_cancel_goal(self, goal_handle) -> CancelResponse:
        with self._goal_lock:
            request_id = self._goal_requests.get(bytes(goal_handle.goal_id.uuid))
        if request_id is not None and self._engine is not None:
            self._engine.cancel(request_id)
        return CancelResponse.ACCEPT

    def destroy_interfaces(self) -> None:
        """Destroy what :meth:`create_interfaces` made that is not in ``self._entities``."""

    def diagnostic_values(self) -> Tuple[Tuple[str, str], ...]:
        """Node-specific key/values for /diagnostics."""
        return ()

    def backend_config(self, backend_name: str, model_path: str, p: Dict,
                       engine_config: EngineConfig) -> BackendConfig:
        """What the backend loads with; subclasses add backend-specific settings."""
        return BackendConfig(
            model=model_path, device=p["device"], dtype=p["dtype"],
            max_context_tokens=engine_config.max_context_tokens, threads=p["threads"],
            kv_cache_fraction=p["kv_cache_fraction"], remote=remote_config_from_params(p))

    # -- lifecycle -----------------------------------------------------------------------------

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Load the model. FAILURE (logged with the reason) leaves the node unconfigured."""
        log = self.get_logger()
        self._configure_error = ""
        self._diagnostics.publish_now()
        try:
            result = self._configure(log)
        except Exception as exc:  # noqa: BLE001 - rclpy drops transition exceptions silently
            log.error(f"configure failed unexpectedly: {type(exc).__name__}: "
                      f"{diagnostics.shorten(exc, LOG_TEXT)}\n"
                      f"{diagnostics.shorten(traceback.format_exc(), 4 * LOG_TEXT)}")
            self._configure_error = diagnostics.shorten(f"{type(exc).__name__}: {exc}")
            self._release()
            result = TransitionCallbackReturn.ERROR
        self._diagnostics.publish_now()
        return result

    def configure_failed(self, log, reason: str) -> TransitionCallbackReturn:
        """Log why configure failed, keep it for /diagnostics, and return FAILURE."""
        log.error(f"configure failed: {diagnostics.shorten(reason, LOG_TEXT)}")
        self._configure_error = diagnostics.shorten(reason)
        return TransitionCallbackReturn.FAILURE

    def _configure(self, log) -> TransitionCallbackReturn:
        p = self.params()
        self._model_label = p["model"]
        try:
            engine_config = engine_config_from_params(p)
            backend_name, model = p["backend"], p["model"]
            if p["wait_for_builder"]:
                status = wait_for_engine(self.context, self.get_namespace(),
                                         self.resolve_topic_name(p["builder_status_topic"]),
                                         p["builder_timeout_s"],
                                         log.info, node_name=f"{self.get_name()}_engine_wait")
                backend_name, model = status.backend, status.artifact_path
            backend_name = choose_backend(backend_name, model, p["device"], self.modality)
            backend = create_backend(backend_name, self.modality)
            if backend.remote:   # the model is a name on the server, not a local file
                resolved = ResolvedModel(model or DEFAULT_MODEL, model, model)
            else:
                resolved = resolve_model(model, progress=log.info,
                                         prefer_gguf=backend_name == "llama_cpp")
            log.info(f"loading {resolved.name} with backend {backend_name} ...")
            backend.load(self.backend_config(backend_name, resolved.path, p, engine_config))
            # On a thread that ends: this executor thread lives on, and would otherwise keep an
            # OpenMP pool beside the engine worker's (see call_in_thread).
            call_in_thread(backend.warmup, name="slm-warmup")
        except SlmError as exc:
            return self.configure_failed(log, str(exc))
        info = backend.describe()
        self._model_label = (info.get("model") if backend.remote else "") or resolved.name
        self._backend = backend
        self._engine = Engine(backend, engine_config, logger=log)
        self.create_interfaces()
        if backend.remote:
            if info.get("warning"):
                log.warning(f"{info['warning']}; requests fail with the reason until it answers")
            context = self._engine.context_tokens
            log.info(f"configured: model {self._model_label!r} on {info.get('server')} "
                     f"({self._engine.workers} requests in flight at most, context "
                     f"{f'{context} tokens' if context else 'set by the server'}), max_queue "
                     f"{engine_config.max_queue}")
        else:
            log.info(f"configured: {resolved.name} ({info.get('parameters', 0) / 1e6:.0f} M "
                     f"parameters) on {info.get('device', '?')} {info.get('dtype', '')}, context "
                     f"{self._engine.context_tokens} tokens, max_queue {engine_config.max_queue}")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._engine.start()
        self.get_logger().info(f"active: serving {self.serves}")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._engine.stop("the node was deactivated")
        return super().on_deactivate(state)

    # -- diagnostics -----------------------------------------------------------------------------

    def _sample(self) -> diagnostics.ModelNodeSample:
        """This node's numbers for /diagnostics (read from the diagnostics thread)."""
        p = self.params()
        engine, backend = self._engine, self._backend
        info = backend.describe() if backend is not None else {}
        device = str(info.get("device") or p["device"])
        counters = engine.counters if engine is not None else None
        return diagnostics.ModelNodeSample(
            state=self._state_machine.current_state[1],
            backend=str(info.get("backend") or p["backend"]),
            model=self._model_label or p["model"], device=device, error=self._configure_error,
            queue_depth=engine.queue_depth if engine is not None else 0, max_queue=p["max_queue"],
            busy=engine.busy if engine is not None else False,
            accepted=counters.accepted if counters else 0,
            rejected=counters.rejected if counters else 0,
            succeeded=counters.succeeded if counters else 0,
            cancelled=counters.cancelled if counters else 0,
            failed=counters.failed if counters else 0,
            last_ttft_ms=counters.last_ttft_ms if counters else 0.0,
            tokens_per_second=counters.last_tokens_per_second if counters else 0.0,
            rss_bytes=diagnostics.process_rss_bytes(),
            gpu_used_bytes=diagnostics.gpu_used_bytes(device),
            extra=self.diagnostic_values())

    def _health(self) -> diagnostics.Health:
        sample = self._sample()
        # A new engine (reconfigured) restarts its counters: compare against nothing then.
        before = self._last_sample
        if before is not None and (sample.failed < before.failed or
                                   sample.rejected < before.rejected):
            before = None
        self._last_sample = sample
        return diagnostics.model_node_health(sample, before)

    def destroy_node(self) -> None:
        self._diagnostics.stop()
        super().destroy_node()

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release("the node was cleaned up (lifecycle cleanup)")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release("the node was shut down (lifecycle shutdown)")
        return TransitionCallbackReturn.SUCCESS

    def _release(self, reason: str = "the node is shutting down") -> None:
        """Stop serving and free the model (idempotent). Running goals are answered (an error
        naming ``reason``) before the action server goes away, while the executor still spins."""
        answering = self._executing   # before stop: the goals' execute callbacks end with it
        if self._engine is not None:
            self._engine.stop(reason)
            self._engine = None
        if self._action_server is not None and answering and self.context.ok():
            deadline = time.monotonic() + GOAL_DRAIN_S
            while self._executing and time.monotonic() < deadline:
                time.sleep(0.01)
            if self._executing:
                self.get_logger().warning(f"{self._executing} goal(s) not answered within "
                                          f"{GOAL_DRAIN_S:g} s of stopping")
            else:
                time.sleep(0.2)   # rclpy sends a finished goal's result from an executor task
        self.destroy_interfaces()
        if self._action_server is not None:
            self._action_server.destroy()
            self._action_server = None
        for entity in self._entities:
            if hasattr(entity, "topic_name") and hasattr(entity, "publish"):
                self.destroy_publisher(entity)
            elif hasattr(entity, "timer_period_ns"):
                self.destroy_timer(entity)
            else:
                self.destroy_subscription(entity)
        self._entities = []
        if self._backend is not None:
            self._backend.close()
            self._backend = None


def run(node_cls: Type[ModelNode], args=None, extra_threads: int = 4) -> int:
    """``main`` of a model node: build, autostart, spin, shut down."""
    rclpy.init(args=args)
    node = node_cls()
    executor = MultiThreadedExecutor(num_threads=node.goal_threads() + extra_threads)
    executor.add_node(node)
    try:
        if node.autostart:
            node.bring_up()
        spin_until_shutdown(executor)
    except (KeyboardInterrupt, ExternalShutdownException):   # during bring-up
        pass
    finally:
        node._release()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0
