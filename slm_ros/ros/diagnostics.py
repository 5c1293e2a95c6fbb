"""Node health on ``/diagnostics`` (diagnostic_msgs/DiagnosticArray), about once a second.

Two halves. :func:`model_node_health` and :func:`builder_health` are plain functions: numbers in
(lifecycle state, engine counters, queue, memory), a :class:`Health` out (level, one-line message,
key/values), so the rules are unit-tested without ROS. :class:`DiagnosticsPublisher` is the ROS
adapter: it publishes one ``DiagnosticStatus`` per node from a thread of its own, because the
statuses that matter most are sent while a lifecycle transition blocks (loading a model, waiting up
to an hour for an engine build), and with ``autostart`` that transition runs before the executor
spins, so a timer would stay silent exactly then.

Levels: ERROR when the node cannot serve because something failed (configure failed, build failed)
or a request failed during the last period; WARN when it does not serve (unconfigured, inactive) or
is overloaded (queue 80 % full, requests refused during the last period); OK otherwise.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
from typing import Callable, Optional, Sequence, Tuple

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

from slm_ros.ros import qos

OK, WARN, ERROR = (int.from_bytes(DiagnosticStatus.OK, "little"),
                   int.from_bytes(DiagnosticStatus.WARN, "little"),
                   int.from_bytes(DiagnosticStatus.ERROR, "little"))
LEVEL_NAMES = {OK: "OK", WARN: "WARN", ERROR: "ERROR"}

#: Queue fill (of max_queue) from which a node reports overload.
OVERLOAD_FRACTION = 0.8

KeyValues = Tuple[Tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class Health:
    """One diagnostic status: level (OK/WARN/ERROR), a one-line message and key/values."""

    level: int
    message: str
    values: KeyValues = ()

    def value(self, key: str) -> str:
        return dict(self.values)[key]


@dataclasses.dataclass(frozen=True)
class ModelNodeSample:
    """What a model node (LLM or vision) reports, read at one instant."""

    state: str                      # lifecycle state label: unconfigured, configuring, active, ...
    backend: str
    model: str
    device: str = ""
    error: str = ""                 # why the last configure failed ("" = it did not)
    queue_depth: int = 0
    max_queue: int = 0
    busy: bool = False
    accepted: int = 0
    rejected: int = 0
    succeeded: int = 0
    cancelled: int = 0
    failed: int = 0
    last_ttft_ms: float = 0.0
    tokens_per_second: float = 0.0
    rss_bytes: int = 0
    gpu_used_bytes: Optional[int] = None
    extra: KeyValues = ()           # node-specific values (e.g. camera frames)


#: Longest text a status carries in its message or a value: statuses repeat every second, and a
#: parameter value of a megabyte (a pasted prompt as `model`) would otherwise go out each time.
MAX_TEXT = 512


def shorten(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.0f}"


def model_node_health(now: ModelNodeSample, before: Optional[ModelNodeSample] = None) -> Health:
    """The status of a model node; ``before`` is the previous sample (for per-period failures)."""
    failed = now.failed - (before.failed if before else 0)
    refused = now.rejected - (before.rejected if before else 0)
    if now.state == "active":
        if failed > 0:
            level, message = ERROR, f"{failed} request(s) failed in the last period"
        elif now.max_queue and now.queue_depth >= OVERLOAD_FRACTION * now.max_queue:
            level, message = WARN, f"overloaded: queue {now.queue_depth}/{now.max_queue}"
        elif refused > 0:
            level, message = WARN, f"{refused} request(s) refused in the last period (queue full " \
                                   f"or invalid)"
        else:
            level, message = OK, "generating" if now.busy else "idle"
    elif now.error and now.state in ("unconfigured", "errorprocessing", "finalized"):
        level, message = ERROR, f"not serving: configure failed: {now.error}"
    elif now.state == "configuring":
        level, message = OK, f"configuring: loading {now.model or 'the model'}"
    else:
        level, message = WARN, f"{now.state}: not serving"
    values = [
        ("lifecycle_state", now.state), ("backend", now.backend), ("model", now.model),
        ("device", now.device), ("queue_depth", str(now.queue_depth)),
        ("max_queue", str(now.max_queue)), ("busy", str(now.busy).lower()),
        ("requests_accepted", str(now.accepted)), ("requests_served", str(now.succeeded)),
        ("requests_cancelled", str(now.cancelled)), ("requests_failed", str(now.failed)),
        ("requests_refused", str(now.rejected)),
        ("last_ttft_ms", f"{now.last_ttft_ms:.1f}"),
        ("tokens_per_second", f"{now.tokens_per_second:.1f}"),
        ("process_rss_mb", _mb(now.rss_bytes)),
    ]
    if now.gpu_used_bytes is not None:
        values.append(("gpu_memory_used_mb", _mb(now.gpu_used_bytes)))
    if now.error:
        values.append(("last_error", now.error))
    return Health(level, message, tuple(values) + tuple(now.extra))


def builder_health(state: str, *, phase: str = "", progress: float = 0.0, model: str = "",
                   backend: str = "", quantization: str = "", artifact: str = "",
                   cache_hit: bool = False, error: str = "", rss_bytes: int = 0) -> Health:
    """The status of the engine builder from its last EngineStatus fields."""
    if state == "FAILED":
        level, message = ERROR, f"build failed: {error}"
    elif state == "BUILDING":
        level, message = OK, f"building: {phase} {progress:.0%}"
    elif state == "READY":
        level, message = OK, f"ready{' (cache hit)' if cache_hit else ''}: {artifact}"
    else:
        level, message = OK, state.lower() or "starting"
    values = (("state", state), ("phase", phase), ("progress", f"{progress:.2f}"),
              ("model", model), ("backend", backend), ("quantization", quantization),
              ("artifact", artifact), ("cache_hit", str(cache_hit).lower()),
              ("process_rss_mb", _mb(rss_bytes))) + ((("error", error),) if error else ())
    return Health(level, message, values)


def process_rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def gpu_used_bytes(device: str) -> Optional[int]:
    """Device memory in use on the GPU this node runs on (all processes: on Jetson that is the
    shared memory), or None off-GPU. Never imports torch or initialises CUDA for it: only when the
    backend already did."""
    if not device.startswith("cuda"):
        return None
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_initialized():
            return None
        index = int(device.split(":", 1)[1]) if ":" in device else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        return int(total - free)
    except (RuntimeError, ValueError, AttributeError):
        return None


class DiagnosticsPublisher:
    """Publishes ``collect()`` as one status named ``name`` on /diagnostics every ``period_s``.

    Runs on its own daemon thread (see the module docstring); :meth:`publish_now` sends at once (on
    lifecycle changes). :meth:`stop` must be called before the node is destroyed.
    """

    def __init__(self, node, name: str, collect: Callable[[], Health],
                 period_s: float = 1.0) -> None:
        self._node = node
        self._name = name
        self._collect = collect
        self._period = period_s
        self._hardware_id = socket.gethostname()
        self._pub = node.create_publisher(DiagnosticArray, "/diagnostics", qos.DIAGNOSTICS)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "DiagnosticsPublisher":
        self._thread = threading.Thread(target=self._loop, name="slm-diagnostics", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self._period):
            self.publish_now()

    def publish_now(self) -> None:
        with self._lock:
            if self._stop.is_set() or not self._node.context.ok():  # shutting down (Ctrl-C)
                return
            try:
                health = self._collect()
                msg = DiagnosticArray(status=[to_status(health, self._name, self._hardware_id)])
                msg.header.stamp = self._node.get_clock().now().to_msg()
                self._pub.publish(msg)
            except Exception as exc:  # noqa: BLE001 - diagnostics must never take the node down
                self._node.get_logger().warning(
                    f"diagnostics: {type(exc).__name__}: {exc}", throttle_duration_sec=30.0)

    def stop(self) -> None:
        """Stop publishing (waits for a publish in progress); idempotent."""
        with self._lock:
            self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        self._thread = None


def to_status(health: Health, name: str, hardware_id: str = "") -> DiagnosticStatus:
    """A :class:`Health` as a DiagnosticStatus message."""
    return DiagnosticStatus(level=bytes([health.level]), name=shorten(name),
                            message=shorten(health.message), hardware_id=shorten(hardware_id),
                            values=[KeyValue(key=k, value=shorten(v)) for k, v in health.values])


def values_of(status: DiagnosticStatus) -> dict:
    """A received status's key/values as a dict."""
    return {kv.key: kv.value for kv in status.values}


def level_of(status: DiagnosticStatus) -> int:
    """A received status's level as an int (the field is a byte)."""
    level = status.level
    return level[0] if isinstance(level, (bytes, bytearray)) else int(level)


__all__: Sequence[str] = ("OK", "WARN", "ERROR", "Health", "ModelNodeSample", "model_node_health",
                          "builder_health", "DiagnosticsPublisher", "to_status", "values_of",
                          "level_of", "process_rss_bytes", "gpu_used_bytes", "shorten")
