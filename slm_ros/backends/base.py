"""The interfaces model backends implement.

Two kinds, one lifecycle (:class:`BackendBase`): a :class:`Backend` runs the model in this process
and streams token ids (the engine detokenizes, applies stop strings and budgets the context); a
:class:`TextStreamBackend` hands the whole conversation to something that streams text back (a
remote OpenAI-compatible server) and may run several requests at once.
"""

from __future__ import annotations

import abc
import dataclasses
import threading
from typing import Any, ClassVar, Dict, FrozenSet, Iterator, List, Optional, Sequence

from slm_ros.core.errors import ConfigError, RequestError
from slm_ros.core.session import Message
from slm_ros.core.types import SamplingParams


@dataclasses.dataclass(frozen=True)
class RemoteConfig:
    """Where and how a :class:`TextStreamBackend` reaches its server (the ``remote.*`` parameters).

    The API key is never a value here: ``api_key_env`` names the environment variable holding it.
    """

    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str = "SLM_ROS_API_KEY"
    connect_timeout_s: float = 5.0
    first_token_timeout_s: float = 60.0
    token_timeout_s: float = 30.0
    max_in_flight: int = 4
    max_retries: int = 2
    max_retry_wait_s: float = 30.0
    extra_sampling: bool = True
    #: How a JSON Schema response format is sent: "openai" (``{"type": "json_schema", ...}``:
    #: vLLM, trtllm-serve, Ollama, OpenAI) or "json_object" (``{"type": "json_object", "schema":
    #: ...}``: llama-cpp-python's server).
    json_schema_style: str = "openai"

    def __post_init__(self) -> None:
        url = self.base_url.strip()
        if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1]) < 1:
            raise ConfigError(f"remote.base_url must be an http:// or https:// URL such as "
                              f"http://gpu-server:8000/v1, got {self.base_url!r}")
        for name in ("connect_timeout_s", "first_token_timeout_s", "token_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"remote.{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.max_in_flight < 1:
            raise ConfigError(f"remote.max_in_flight must be >= 1, got {self.max_in_flight}")
        if self.max_retries < 0:
            raise ConfigError(f"remote.max_retries must be >= 0, got {self.max_retries}")
        if self.max_retry_wait_s < 0:
            raise ConfigError(f"remote.max_retry_wait_s must be >= 0, got {self.max_retry_wait_s}")
        if self.json_schema_style not in ("openai", "json_object"):
            raise ConfigError(f"remote.json_schema_style must be openai or json_object, got "
                              f"{self.json_schema_style!r}")


@dataclasses.dataclass(frozen=True)
class BackendConfig:
    """What a backend needs to load a model.

    ``model`` is a resolved local path (checkpoint directory or GGUF file), or for a remote backend
    the served model's name; ``device`` is ``auto``/``cpu``/``cuda``/``cuda:N``; ``dtype`` is
    ``auto``/``float32``/``bfloat16``/``float16``.
    """

    model: str
    device: str = "auto"
    dtype: str = "auto"
    max_context_tokens: int = 0   # 0 = the model's own limit
    threads: int = 0              # CPU threads, 0 = library default
    #: tensorrt_llm only: fraction of free GPU memory the KV cache may take. TensorRT-LLM's own default
    #: (0.9) would take nearly all of a Jetson's memory, which the GPU shares with the CPU and ROS.
    kv_cache_fraction: float = 0.5
    #: Remote backends (``openai``) only: the server and how to talk to it.
    remote: RemoteConfig = dataclasses.field(default_factory=RemoteConfig)


class Prompt(list):
    """Token ids of a templated prompt, plus model inputs that are not token ids.

    Text backends return plain lists from :meth:`Backend.apply_chat_template`; vision-language
    backends return a ``Prompt`` whose ``inputs`` carry what their processor made of the images
    (e.g. ``pixel_values``), which :meth:`Backend.generate` then passes to the model. ``len()`` is
    the prompt length in tokens, image tokens included, so context budgeting stays the same.
    """

    def __init__(self, ids: Sequence[int] = (), inputs: Dict[str, Any] = None) -> None:
        super().__init__(ids)
        self.inputs: Dict[str, Any] = dict(inputs or {})


class BackendBase(abc.ABC):
    """What every backend has: a name, a load/close lifecycle and facts for diagnostics.

    Lifecycle: construct, :meth:`load`, :meth:`warmup`, any number of generations, :meth:`close`.
    Implementations must not import rclpy.
    """

    name: ClassVar[str] = ""
    #: True for backends that accept images with the last user message.
    supports_images: ClassVar[bool] = False
    #: True when the model runs elsewhere: ``model`` is a served model's name, not a local path.
    remote: ClassVar[bool] = False

    @abc.abstractmethod
    def load(self, config: BackendConfig) -> None:
        """Load the model; raise :class:`~slm_ros.core.errors.ModelLoadError` naming what failed."""

    #: What :attr:`context_length` reports; set by :meth:`load`.
    _context: int = 0

    @property
    def context_length(self) -> int:
        """Maximum tokens (prompt + generated) the loaded model accepts; 0 = not known here."""
        return self._context

    @property
    def max_concurrency(self) -> int:
        """Requests the backend runs at once (the engine starts this many workers)."""
        return 1

    def warmup(self) -> None:
        """Pay one-time setup costs before the first real request."""

    def describe(self) -> dict:
        """Facts about the loaded model for logs and diagnostics."""
        return {"backend": self.name}

    def close(self) -> None:
        """Free the model's memory. The backend may not be used afterwards."""


class Backend(BackendBase):
    """A model in this process that turns prompt token ids into a stream of new token ids, one
    request at a time."""

    #: What :attr:`eos_token_ids` reports; set by :meth:`load`.
    _eos: FrozenSet[int] = frozenset()

    @property
    def eos_token_ids(self) -> FrozenSet[int]:
        """Token ids that end a generation."""
        return self._eos

    @abc.abstractmethod
    def apply_chat_template(self, messages: List[Message], images: Sequence[Any] = (),
                            tools: Sequence[dict] = ()) -> List[int]:
        """Token ids of the conversation, ending with the assistant's turn start.

        ``images`` (RGB uint8 arrays, H x W x 3) belong to the last user message; only backends with
        ``supports_images`` accept them (others raise :class:`~slm_ros.core.errors.RequestError`).
        ``tools`` (OpenAI-style function tools) are rendered by the chat template; the engine
        passes them only when :meth:`tool_syntax` is not ``generic``.
        May return a :class:`Prompt` carrying extra model inputs for :meth:`generate`.
        """

    def tool_syntax(self) -> str:
        """How the loaded model's chat template renders tools and asks for calls
        (:func:`slm_ros.core.constraints.detect_tool_syntax`); ``generic`` (the default): it does
        not, and the tools are described in the system prompt."""
        return "generic"

    @abc.abstractmethod
    def count_tokens(self, text: str) -> int:
        """Number of tokens of plain text (no template, no special tokens)."""

    @abc.abstractmethod
    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of token ids, special tokens skipped."""

    @abc.abstractmethod
    def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                 cancel: threading.Event) -> Iterator[int]:
        """Yield new token ids one by one, at most ``params.max_new_tokens``.

        Stops after at most one more token once ``cancel`` is set. The end-of-sequence token, when
        produced, is yielded last.
        """

    def _generation_room(self, prompt_len: int) -> int:
        """Tokens the context leaves to generate after a prompt of ``prompt_len`` tokens;
        RequestError for an empty prompt or one that leaves no room."""
        if prompt_len < 1:
            raise RequestError("empty prompt: no token ids to generate from")
        room = self._context - prompt_len
        if room < 1:
            raise RequestError(f"prompt of {prompt_len} tokens does not fit the context of "
                               f"{self._context} tokens")
        return room

    def grammar_tokenizer(self):
        """The llguidance tokenizer over this model's vocabulary, and the size of the logits
        vector, for constrained output; backends that cannot constrain decoding raise
        :class:`~slm_ros.core.errors.RequestError` saying so (the default)."""
        raise RequestError(f"backend {self.name} does not support response_format (constrained "
                           f"output); use llama_cpp or transformers")

    def token_constraint(self, constraint):
        """A fresh per-request :class:`~slm_ros.core.constraints.TokenConstraint` for
        ``constraint`` (a compiled response format)."""
        from slm_ros.core.constraints import TokenConstraint
        tokenizer, vocab_size = self.grammar_tokenizer()
        return TokenConstraint(constraint, tokenizer, vocab_size)

    def warmup(self) -> None:
        """Run one tiny generation so the first real request does not pay one-time setup costs."""
        ids = self.apply_chat_template([{"role": "user", "content": "Hi"}])
        for _ in self.generate(ids, SamplingParams(max_new_tokens=2), threading.Event()):
            pass


class TextStream(abc.ABC):
    """One streaming generation of a :class:`TextStreamBackend`: iterate for text deltas.

    Iteration raises :class:`~slm_ros.core.errors.BackendError` (its message names the server and
    what happened) when the generation fails; text already yielded stays valid. After iteration
    ends normally ``finish_reason`` is ``"stop"``, ``"length"`` or ``"cancelled"``, and the token
    counts are the server's when it reported usage (None otherwise).
    """

    finish_reason: str = "stop"
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    #: Tool calls the server returned, as (id, name, arguments JSON text), once iteration ended
    #: (requests with tools only; the engine validates them).
    tool_calls: tuple = ()

    @abc.abstractmethod
    def __iter__(self) -> Iterator[str]:
        """The text deltas, in order."""

    def close(self) -> None:
        """End early (e.g. a stop string was found): the server sees the request end."""


class TextStreamBackend(BackendBase):
    """A backend that takes chat messages and streams text back (no token ids, no local
    tokenizer): a client of a model served elsewhere."""

    @abc.abstractmethod
    def stream_chat(self, messages: List[Message], images: Sequence[Any], params: SamplingParams,
                    cancel: threading.Event, tools: Sequence[Any] = (),
                    tool_choice: str = "") -> TextStream:
        """Start one generation. ``images`` (RGB uint8 arrays) belong to the last user message.
        ``tools`` (:class:`~slm_ros.core.constraints.Tool`, validated) and ``tool_choice`` (auto,
        required or a tool's name) go to the server, which returns calls in ``tool_calls``.

        Once ``cancel`` is set the stream ends within a moment with ``finish_reason``
        ``"cancelled"`` and the server sees the request end.
        """
