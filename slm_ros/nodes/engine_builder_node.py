"""The engine-builder node: turns a checkpoint into the artifact a backend runs fastest, cached.

Interfaces (relative to the node namespace, e.g. ``/slm``):

* publishes ``engine_status`` (slm_ros/EngineStatus, reliable + transient local: a node that starts
  later still gets the last state) - PENDING, BUILDING with phase and progress, then READY with the
  artifact path and manifest, or FAILED with the reason;
* action server ``build_engine`` (slm_ros/action/BuildEngine): on-demand builds with progress
  feedback, cancellable (nothing is published for a cancelled build).

With ``build_on_start`` (default) it builds from its parameters at startup; the LLM and vision nodes
started with ``wait_for_builder: true`` load what it announces. Builds run one at a time; a second
builder process for the same key waits on the cache's file lock and reuses the result. The node holds
no model between builds, so it is a plain node, not a lifecycle node. Its last status is repeated on
``/diagnostics`` every second (ERROR after a failed build).
"""

from __future__ import annotations

import json
import threading
import time
import traceback
from typing import Dict, Optional

import rclpy
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node

from slm_ros.action import BuildEngine
from slm_ros.build.builder import Builder, BuildResult
from slm_ros.build.device import PRESETS, detect_profile, preset
from slm_ros.build.spec import BuildCancelled, BuildSpec
from slm_ros.core.errors import SlmError
from slm_ros.models import resolve_model
from slm_ros.msg import EngineStatus
from slm_ros.ros import diagnostics, qos
from slm_ros.ros.params import ParamSpec, declare_all, values
from slm_ros.ros.spinning import spin_until_shutdown

PARAMETERS = (
    ParamSpec("model", "default",
              "Checkpoint to build from: 'default' (embedded SmolLM2-135M-Instruct), a Hugging Face "
              "checkpoint directory or a .gguf file. No downloads.", read_only=True),
    ParamSpec("backend", "transformers",
              "Backend the artifact is for: transformers, llama_cpp, tensorrt_llm, "
              "onnxruntime_genai or openvino."),
    ParamSpec("quantization", "none",
              "transformers: none | int8_dynamic. llama_cpp: none | f16 | q8_0 | q4_0 | q4_k_m | "
              "q5_k_m | ... (requantizes a GGUF). tensorrt_llm: w4a16_awq | w4a16 | w8a16 | w8a8_sq "
              "| fp16 | bf16 (fp8 and w4a8 need SM >= 89; Orin is SM 87). onnxruntime_genai: int4 "
              "| int8 | fp16 | bf16 | fp32 | none (int4/int8: blocks of 32). openvino: int4 | int8 | "
              "fp16 | none (NNCF weight compression)."),
    ParamSpec("dtype", "auto", "auto, float32, float16 or bfloat16 for unquantized weights."),
    ParamSpec("device", "auto", "Device the artifact will run on: auto, cpu, cuda, cuda:N."),
    ParamSpec("max_input_len", 2048, "Longest prompt (tokens) the artifact accepts.",
              int_range=(1, 1 << 20)),
    ParamSpec("max_seq_len", 4096, "Longest prompt + answer (tokens); sizes the KV cache.",
              int_range=(1, 1 << 20)),
    ParamSpec("max_batch_size", 1, "Concurrent sequences the artifact serves.",
              int_range=(1, 256)),
    ParamSpec("calib_dataset", "",
              "Local calibration data for w4a16_awq / w8a8_sq (directory or text/JSON file). Empty "
              "refuses those quantizations instead of downloading a dataset.", read_only=True),
    ParamSpec("cache_dir", "",
              "Artifact cache root; empty = $SLM_ROS_CACHE/engines or ~/.cache/slm_ros/engines.",
              read_only=True),
    ParamSpec("max_cache_gb", 0.0,
              "Cache size limit; least recently used artifacts are evicted beyond it. 0 = no limit.",
              float_range=(0.0, 1e6)),
    ParamSpec("device_profile", "",
              f"Memory profile the plan is checked against: empty = this machine, or one of "
              f"{', '.join(PRESETS)} (to build for a board on a host)."),
    ParamSpec("check_memory", True,
              "Refuse, before building, a configuration the memory planner says cannot fit."),
    ParamSpec("build_on_start", True, "Build from these parameters at startup.", read_only=True),
    ParamSpec("force_rebuild", False, "Rebuild at startup even when the cache has a match.",
              read_only=True),
)

#: Status messages per second at most while building (phase changes always go out).
_STATUS_HZ = 5.0


def merge_overrides(p: Dict, overrides: Optional[Dict]) -> Dict:
    """Parameter values with the non-empty, non-zero fields of a goal replacing them."""
    fields = dict(p)
    fields.update({k: v for k, v in (overrides or {}).items() if v not in ("", 0, None)})
    return fields


def spec_from_params(p: Dict, overrides: Optional[Dict] = None, progress=None) -> BuildSpec:
    """A :class:`BuildSpec` from parameters (and non-empty goal fields); ``model`` is resolved to a
    local path here (the embedded default is converted once). Raises :class:`SlmError`."""
    fields = merge_overrides(p, overrides)
    # llama_cpp builds from the GGUF file itself, not from the converted checkpoint.
    resolved = resolve_model(fields["model"], progress=progress,
                             prefer_gguf=fields["backend"] == "llama_cpp")
    return BuildSpec(
        model=resolved.path, backend=fields["backend"], quantization=fields["quantization"],
        dtype=fields["dtype"], device=fields["device"], max_input_len=int(fields["max_input_len"]),
        max_seq_len=int(fields["max_seq_len"]), max_batch_size=int(fields["max_batch_size"]),
        calib_dataset=fields["calib_dataset"])


class EngineBuilderNode(Node):
    """Builds (or finds in the cache) model artifacts and announces them; see the module docstring."""

    def __init__(self, node_name: str = "engine_builder", **kwargs) -> None:
        super().__init__(node_name, **kwargs)
        declare_all(self, PARAMETERS)
        p = values(self, PARAMETERS)
        profile = preset(p["device_profile"]) if p["device_profile"] else None
        self._builder = Builder(
            cache_root=p["cache_dir"] or None,
            max_cache_bytes=int(p["max_cache_gb"] * (1 << 30)),
            logger=_LogAdapter(self.get_logger()), device_profile=profile,
            check_memory=bool(p["check_memory"]))
        self._build_lock = threading.Lock()   # one build at a time in this node
        self._cancel: Optional[threading.Event] = None   # of the build running now
        self._goal_cancels: Dict[bytes, threading.Event] = {}
        self._goals_lock = threading.Lock()
        self._status_pub = self.create_publisher(EngineStatus, "engine_status", qos.ENGINE_STATUS)
        self._group = ReentrantCallbackGroup()
        self._action_server = ActionServer(
            self, BuildEngine, "build_engine", execute_callback=self._execute,
            goal_callback=lambda _goal: GoalResponse.ACCEPT,
            cancel_callback=self._on_cancel, callback_group=self._group,
            goal_service_qos_profile=qos.ACTION_SERVICES,
            result_service_qos_profile=qos.ACTION_SERVICES,
            cancel_service_qos_profile=qos.ACTION_SERVICES)
        self._last_status = 0.0
        self._last_phase = ""
        self._status_msg = self.publish_status(EngineStatus.STATE_PENDING, model=p["model"],
                                               backend=p["backend"], quantization=p["quantization"])
        self._diagnostics = diagnostics.DiagnosticsPublisher(
            self, f"{self.get_fully_qualified_name()}: engine build", self._health).start()
        self.get_logger().info(f"engine cache: {self._builder.root}; profile: "
                               f"{(profile or detect_profile('cpu')).name}")

    # -- status ----------------------------------------------------------------------------------

    def publish_status(self, state: str, **fields) -> EngineStatus:
        msg = EngineStatus(state=state)
        msg.header.stamp = self.get_clock().now().to_msg()
        for key, value in fields.items():
            setattr(msg, key, value)
        self._status_pub.publish(msg)
        self._status_msg = msg
        return msg

    def _health(self) -> diagnostics.Health:
        s = self._status_msg
        return diagnostics.builder_health(
            s.state, phase=s.phase, progress=s.progress, model=s.model, backend=s.backend,
            quantization=s.quantization, artifact=s.artifact_path, cache_hit=s.cache_hit,
            error=s.error, rss_bytes=diagnostics.process_rss_bytes())

    def destroy_node(self) -> None:
        self._diagnostics.stop()
        super().destroy_node()

    def _status_from_result(self, spec: BuildSpec, result: BuildResult) -> EngineStatus:
        return self.publish_status(
            EngineStatus.STATE_READY, key=result.key, phase="cache" if result.cache_hit else "done",
            progress=1.0, model=spec.model, backend=spec.backend, quantization=spec.quantization,
            artifact_path=str(result.path), manifest_json=json.dumps(result.manifest, sort_keys=True),
            cache_hit=bool(result.cache_hit))

    # -- building --------------------------------------------------------------------------------

    def run_build(self, overrides: Optional[Dict] = None, force: bool = False,
                  feedback=None, cancel: Optional[threading.Event] = None) -> EngineStatus:
        """Build once, publishing status all along; returns the final status (READY or FAILED).
        Never raises for a failed build: the reason goes into the status and the log."""
        log = self.get_logger()
        p = values(self, PARAMETERS)
        merged = merge_overrides(p, overrides)
        ident = dict(model=str(merged["model"]), backend=merged["backend"],
                     quantization=merged["quantization"])
        cancel = cancel or threading.Event()
        with self._build_lock:
            if cancel.is_set():
                return self.publish_status(EngineStatus.STATE_FAILED, error="cancelled", **ident)
            self._cancel = cancel
            try:
                spec = spec_from_params(merged, progress=log.info)
                ident["model"] = spec.model
                self._last_phase = ""

                def progress(phase: str, fraction: float) -> None:
                    now = time.monotonic()
                    if phase != self._last_phase or now - self._last_status >= 1.0 / _STATUS_HZ:
                        if phase != self._last_phase:
                            log.info(f"build: {phase} ({fraction:.0%})")
                        self._last_phase, self._last_status = phase, now
                        self.publish_status(EngineStatus.STATE_BUILDING, phase=phase,
                                            progress=float(fraction), **ident)
                        if feedback is not None:
                            feedback(phase, float(fraction))

                t0 = time.monotonic()
                result = self._builder.build(spec, progress=progress, cancel=cancel, force=force)
                log.info(f"engine READY in {time.monotonic() - t0:.1f} s: {result.path} "
                         f"({result.reason})")
                return self._status_from_result(spec, result)
            except BuildCancelled as exc:
                log.warning(f"build cancelled: {exc}")
                return self.publish_status(EngineStatus.STATE_FAILED, error="cancelled", **ident)
            except SlmError as exc:
                log.error(f"build FAILED: {exc}")
                return self.publish_status(EngineStatus.STATE_FAILED, error=str(exc), **ident)
            except Exception as exc:  # noqa: BLE001 - a failed build must never kill the node
                log.error(f"build FAILED unexpectedly: {type(exc).__name__}: {exc}\n"
                          f"{traceback.format_exc()}")
                return self.publish_status(EngineStatus.STATE_FAILED,
                                           error=f"{type(exc).__name__}: {exc}", **ident)
            finally:
                self._cancel = None

    def start_build_on_start(self) -> Optional[threading.Thread]:
        """Start the startup build on its own thread (the executor keeps serving meanwhile)."""
        if not self.get_parameter("build_on_start").value:
            return None
        force = bool(self.get_parameter("force_rebuild").value)
        thread = threading.Thread(target=self.run_build, kwargs={"force": force},
                                  name="slm-engine-build", daemon=True)
        thread.start()
        return thread

    def cancel_build(self) -> None:
        cancel = self._cancel
        if cancel is not None:
            cancel.set()

    # -- action ------------------------------------------------------------------------------------

    def _execute(self, goal_handle) -> BuildEngine.Result:
        goal = goal_handle.request
        overrides = {"model": goal.model, "backend": goal.backend,
                     "quantization": goal.quantization, "dtype": goal.dtype,
                     "max_input_len": goal.max_input_len, "max_seq_len": goal.max_seq_len,
                     "max_batch_size": goal.max_batch_size}

        def feedback(phase: str, fraction: float) -> None:
            goal_handle.publish_feedback(BuildEngine.Feedback(phase=phase, progress=fraction))

        cancel = threading.Event()
        key = bytes(goal_handle.goal_id.uuid)
        with self._goals_lock:
            self._goal_cancels[key] = cancel
        try:
            status = self.run_build(overrides, force=bool(goal.force), feedback=feedback,
                                    cancel=cancel)
        finally:
            with self._goals_lock:
                self._goal_cancels.pop(key, None)
        if status.state == EngineStatus.STATE_READY:
            goal_handle.succeed()
        elif status.error == "cancelled" and goal_handle.is_cancel_requested:
            goal_handle.canceled()
        else:
            goal_handle.abort()
        return BuildEngine.Result(status=status)

    def _on_cancel(self, goal_handle) -> CancelResponse:
        with self._goals_lock:
            cancel = self._goal_cancels.get(bytes(goal_handle.goal_id.uuid))
        if cancel is not None:
            cancel.set()
        return CancelResponse.ACCEPT


class _LogAdapter:
    """The builder logs through ``logging``-style calls; route them to the ROS logger."""

    def __init__(self, ros_logger) -> None:
        self._log = ros_logger

    def debug(self, msg, *args) -> None:
        self._log.debug(msg % args if args else str(msg))

    def info(self, msg, *args) -> None:
        self._log.info(msg % args if args else str(msg))

    def warning(self, msg, *args) -> None:
        self._log.warning(msg % args if args else str(msg))

    def error(self, msg, *args) -> None:
        self._log.error(msg % args if args else str(msg))

    def exception(self, msg, *args) -> None:
        self._log.error(msg % args if args else str(msg))


def main(args=None) -> int:
    """Entry point of ``ros2 run slm_ros engine_builder_node``."""
    rclpy.init(args=args)
    try:
        node = EngineBuilderNode()
    except SlmError as exc:  # a bad device_profile / cache_dir: say which and stop
        rclpy.logging.get_logger("engine_builder").fatal(f"cannot start: {exc}")
        rclpy.try_shutdown()
        return 2
    executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    try:
        node.start_build_on_start()
        spin_until_shutdown(executor)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.cancel_build()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
