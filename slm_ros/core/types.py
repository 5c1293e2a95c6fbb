"""Typed request, sampling and result objects, validated at construction."""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, Optional, Sequence, Tuple

from slm_ros.core.errors import ConfigError, RequestError

DEFAULT_SESSION = "default"


class FinishReason(str, enum.Enum):
    """Why a request ended; the value is what goes on the wire."""

    STOP = "stop"          # end-of-sequence token or a stop string
    LENGTH = "length"      # max_new_tokens or the context window reached
    CANCELLED = "cancelled"
    ERROR = "error"


#: Temperatures below this decode greedily (see :attr:`SamplingParams.greedy`).
GREEDY_TEMPERATURE = 1e-3


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Fully resolved sampling settings for one generation.

    ``temperature == 0`` or ``top_k == 1`` means greedy decoding. ``top_p == 1`` and ``top_k == 0``
    disable those filters; ``seed == 0`` leaves the random generator unseeded.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.1
    seed: int = 0
    stop: Tuple[str, ...] = ()
    #: The request's :class:`~slm_ros.core.constraints.TokenConstraint` (constrained output), set
    #: by the engine per request; backends mask logits with it and feed it each sampled token.
    constraint: Optional[Any] = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        _check_sampling(self, ConfigError, "default_")
        if self.top_p == 0.0:
            raise ConfigError("default_top_p must be in (0, 1], got 0")
        if self.repetition_penalty == 0.0:
            raise ConfigError("default_repetition_penalty must be > 0, got 0")
        if self.max_new_tokens == 0:
            raise ConfigError("default_max_new_tokens must be >= 1, got 0")

    @property
    def greedy(self) -> bool:
        """True when decoding picks the most likely token every step: ``top_k == 1`` or a
        temperature below :data:`GREEDY_TEMPERATURE` (0 included). Dividing logits by a temperature
        that small overflows them (1e-38 gave "ectableectable..."), and the most likely token gets
        all the probability anyway."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1


@dataclasses.dataclass(frozen=True)
class SamplingOverrides:
    """Per-request sampling fields as they arrive on the wire: zero / empty means "node default"."""

    max_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    repetition_penalty: float = 0.0
    seed: int = 0
    stop: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_sampling(self, RequestError, "sampling.")

    def resolve(self, defaults: SamplingParams) -> SamplingParams:
        """Fill every zero / empty field from ``defaults``."""
        return SamplingParams(
            max_new_tokens=self.max_new_tokens or defaults.max_new_tokens,
            temperature=self.temperature or defaults.temperature,
            top_p=self.top_p or defaults.top_p,
            top_k=self.top_k or defaults.top_k,
            repetition_penalty=self.repetition_penalty or defaults.repetition_penalty,
            seed=self.seed or defaults.seed,
            stop=tuple(self.stop) or defaults.stop,
        )


def _check_sampling(s, error, prefix: str) -> None:
    """Range checks shared by defaults and overrides (zero is allowed in both)."""
    def bad(field: str, rule: str, value) -> None:
        raise error(f"{prefix}{field} {rule}, got {value!r}")

    for field in ("temperature", "top_p", "repetition_penalty"):
        value = getattr(s, field)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            bad(field, "must be a finite number", value)
    if s.max_new_tokens < 0:
        bad("max_new_tokens", "must be >= 0", s.max_new_tokens)
    if s.temperature < 0:
        bad("temperature", "must be >= 0", s.temperature)
    if not 0.0 <= s.top_p <= 1.0:
        bad("top_p", "must be in (0, 1]", s.top_p)
    if s.top_k < 0:
        bad("top_k", "must be >= 0", s.top_k)
    if s.repetition_penalty < 0:
        bad("repetition_penalty", "must be > 0", s.repetition_penalty)
    for stop in s.stop:
        if not isinstance(stop, str) or stop == "":
            bad("stop", "entries must be non-empty strings", list(s.stop))


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request, independent of where it came from (topic, action, CLI, test)."""

    prompt: str
    request_id: str = ""
    session_id: str = ""
    system_prompt: str = ""
    reset_session: bool = False
    sampling: SamplingOverrides = dataclasses.field(default_factory=SamplingOverrides)
    #: For vision-language backends: an image (RGB uint8 array, H x W x 3) or a callable returning
    #: one, called when inference starts (so the newest camera frame at that moment is used). The
    #: callable may raise :class:`~slm_ros.core.errors.RequestError` (no frame, frame too old, bad
    #: image): the request then ends with that error.
    image: Optional[Any] = dataclasses.field(default=None, compare=False, repr=False)
    #: What the output must be (:class:`~slm_ros.core.constraints.ResponseFormat`); None = text.
    response_format: Optional[Any] = None
    #: Tools the model may call (:class:`~slm_ros.core.constraints.Tool`) and ``tool_choice``:
    #: "" / "auto", "none", "required" or one tool's name.
    tools: Tuple[Any, ...] = ()
    tool_choice: str = ""

    @property
    def session(self) -> str:
        """The session this request reads and extends."""
        return self.session_id or DEFAULT_SESSION


@dataclasses.dataclass(frozen=True)
class Stats:
    """Token counts and timings of a finished request (milliseconds, tokens/s)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token_ms: float = 0.0
    tokens_per_second: float = 0.0
    total_ms: float = 0.0
    queue_ms: float = 0.0


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One streamed piece of an answer: a text delta, or the final chunk of a request."""

    request_id: str
    session_id: str
    seq: int
    text: str = ""
    token_ids: Sequence[int] = ()
    is_final: bool = False
    finish_reason: Optional[FinishReason] = None
    error: str = ""
    stats: Optional[Stats] = None
    #: Final chunk only: the tool calls the model made (:class:`~slm_ros.core.constraints.ToolCall`).
    tool_calls: Tuple[Any, ...] = ()
