"""The interface every model backend implements."""

from __future__ import annotations

import abc
import dataclasses
import threading
from typing import Any, ClassVar, Dict, FrozenSet, Iterator, List, Sequence

from slm_ros.core.session import Message
from slm_ros.core.types import SamplingParams


@dataclasses.dataclass(frozen=True)
class BackendConfig:
    """What a backend needs to load a model.

    ``model`` is a resolved local path (checkpoint directory or GGUF file); ``device`` is
    ``auto``/``cpu``/``cuda``/``cuda:N``; ``dtype`` is ``auto``/``float32``/``bfloat16``/``float16``.
    """

    model: str
    device: str = "auto"
    dtype: str = "auto"
    max_context_tokens: int = 0   # 0 = the model's own limit
    threads: int = 0              # CPU threads, 0 = library default
    #: tensorrt_llm only: fraction of free GPU memory the KV cache may take. TensorRT-LLM's own default
    #: (0.9) would take nearly all of a Jetson's memory, which the GPU shares with the CPU and ROS.
    kv_cache_fraction: float = 0.5


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


class Backend(abc.ABC):
    """A loaded model that turns prompt token ids into a stream of new token ids.

    Lifecycle: construct, :meth:`load`, any number of :meth:`generate` calls (one at a time),
    :meth:`close`. Implementations must not import rclpy.
    """

    name: ClassVar[str] = ""
    #: True for vision-language backends: apply_chat_template accepts images.
    supports_images: ClassVar[bool] = False

    @abc.abstractmethod
    def load(self, config: BackendConfig) -> None:
        """Load the model; raise :class:`~slm_ros.core.errors.ModelLoadError` naming what failed."""

    @property
    @abc.abstractmethod
    def context_length(self) -> int:
        """Maximum tokens (prompt + generated) the loaded model accepts."""

    @property
    @abc.abstractmethod
    def eos_token_ids(self) -> FrozenSet[int]:
        """Token ids that end a generation."""

    @abc.abstractmethod
    def apply_chat_template(self, messages: List[Message], images: Sequence[Any] = ()) -> List[int]:
        """Token ids of the conversation, ending with the assistant's turn start.

        ``images`` (RGB uint8 arrays, H x W x 3) belong to the last user message; only backends with
        ``supports_images`` accept them (others raise :class:`~slm_ros.core.errors.RequestError`).
        May return a :class:`Prompt` carrying extra model inputs for :meth:`generate`.
        """

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

    def warmup(self) -> None:
        """Run one tiny generation so the first real request does not pay one-time setup costs."""
        ids = self.apply_chat_template([{"role": "user", "content": "Hi"}])
        for _ in self.generate(ids, SamplingParams(max_new_tokens=2), threading.Event()):
            pass

    def describe(self) -> dict:
        """Facts about the loaded model for logs and diagnostics."""
        return {"backend": self.name}

    def close(self) -> None:
        """Free the model's memory. The backend may not be used afterwards."""
