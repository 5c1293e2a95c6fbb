"""TensorRT-LLM backend: runs an engine built by the engine builder (or by hand), on NVIDIA GPUs and
Jetson Orin.

The model path is an engine directory (``config.json`` + ``rank0.engine``) with the tokenizer files
beside it, which is what :mod:`slm_ros.build.trtllm_step` publishes. Tokenization and the chat template
come from that directory through ``transformers.AutoTokenizer``; generation goes through
:mod:`slm_ros.backends.trtllm_adapter`, the only module that touches TensorRT-LLM, on a worker thread
that hands token ids to the caller through a bounded queue
(:func:`slm_ros.core.streaming.iterate_in_thread`).

Constrained output (response formats, tools): on 1.x TensorRT-LLM's own guided decoding (xgrammar)
enforces it; on 0.12, which has none, a logits post-processor applies slm_ros's grammar mask
(llguidance) every step. Either way every token is also fed to the request's
:class:`~slm_ros.core.constraints.TokenConstraint`, which the engine validates the result with.

Cancelling: on TensorRT-LLM 1.x the request is aborted, so the GPU stops generating. On 0.12 (the
Jetson line) requests cannot be cancelled: the backend stops reading, returns within one token, and the
request runs on in the background until its ``max_new_tokens``, which is why that is always bounded by
the request's budget.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import FrozenSet, Iterator, Optional, Sequence, Tuple

from transformers import AutoTokenizer

from slm_ros.backends import trtllm_adapter as adapter
from slm_ros.backends.base import Backend, BackendConfig
from slm_ros.backends.hf_tokenizer import HfTokenizerMixin
from slm_ros.core.constraints import GRAMMAR, JSON_OBJECT, JSON_SCHEMA, REGEX
from slm_ros.core.errors import ConfigError, ModelLoadError, RequestError
from slm_ros.core.streaming import iterate_in_thread
from slm_ros.core.types import FinishReason, SamplingParams


def finish_reason_of(end: adapter.StreamEnd, budget: int, cancelled: bool) -> FinishReason:
    """Map how a TensorRT-LLM stream ended to slm_ros's finish reason (the one place this is done).

    1.x reports ``stop``, ``length``, ``timeout`` or ``cancelled``; 0.12 reports nothing, so the
    reason is inferred: stopped by us = cancelled, ``budget`` tokens produced = length, else stop
    (end-of-sequence or a stop token).
    """
    if end.finish_reason == "stop":
        return FinishReason.STOP
    if end.finish_reason == "length":
        return FinishReason.LENGTH
    if end.finish_reason == "cancelled" or end.stopped_early or cancelled:
        return FinishReason.CANCELLED
    if end.finish_reason is not None:  # timeout, or a reason newer than this code
        return FinishReason.ERROR
    return FinishReason.LENGTH if end.produced >= budget else FinishReason.STOP


def _eos_ids(engine_dir: Path, tokenizer) -> FrozenSet[int]:
    """End-of-sequence ids from generation_config.json (int or list) and the tokenizer."""
    eos = set()
    try:
        gen = json.loads((engine_dir / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        gen = {}
    for source in (gen.get("eos_token_id"), tokenizer.eos_token_id):
        if isinstance(source, int):
            eos.add(source)
        elif isinstance(source, list):
            eos.update(int(t) for t in source)
    return frozenset(eos)


class TensorRtLlmBackend(HfTokenizerMixin, Backend):
    """A TensorRT-LLM engine directory, streamed token by token (see the module docstring)."""

    name = "tensorrt_llm"

    def __init__(self) -> None:
        self._runtime: Optional[adapter.TrtLlmRuntime] = None
        self._tokenizer = None
        self._context = 0
        self._max_input = 0
        self._eos: FrozenSet[int] = frozenset()
        self._end_id = 0
        self._pad_id = 0
        self._info: dict = {}
        self._last_finish: Optional[FinishReason] = None
        self._vocab = 0
        self._grammar_tokenizer = None

    def load(self, config: BackendConfig) -> None:
        """Load the engine at ``config.model``. Raises BackendUnavailable when TensorRT-LLM cannot run
        here, ConfigError for settings the engine cannot honour, ModelLoadError for a bad engine."""
        adapter.cuda_index(config.device)  # cpu is refused with the reason
        fraction = config.kv_cache_fraction
        if not 0.0 < fraction < 1.0:
            raise ConfigError(f"kv_cache_fraction must be in (0, 1), got {fraction!r}")
        engine_dir = Path(adapter.find_engine_dir(config.model))
        info = adapter.read_engine_config(str(engine_dir))
        dtype = (config.dtype or "auto").strip().lower()
        if dtype not in ("auto", info.dtype):
            raise ConfigError(f"dtype is fixed when a TensorRT-LLM engine is built (this one: "
                              f"{info.dtype}); set dtype to auto or rebuild, got {config.dtype!r}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(engine_dir))
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(
                f"no usable tokenizer beside the engine in {engine_dir} ({exc}); the engine builder "
                f"copies tokenizer files there, copy them from the checkpoint when building by hand"
            ) from exc
        if not getattr(tokenizer, "chat_template", None):
            from slm_ros.backends.transformers_backend import _FALLBACK_TEMPLATE
            tokenizer.chat_template = _FALLBACK_TEMPLATE
        eos = _eos_ids(engine_dir, tokenizer)
        if not eos:
            raise ModelLoadError(f"{engine_dir} defines no end-of-sequence token "
                                 f"(generation_config.json / tokenizer)")
        end_id = tokenizer.eos_token_id if tokenizer.eos_token_id in eos else min(eos)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id
        runtime = adapter.TrtLlmRuntime(str(engine_dir), fraction)
        limit = info.max_seq_len
        if config.max_context_tokens > 0:
            limit = min(limit, config.max_context_tokens)
        self._runtime, self._tokenizer = runtime, tokenizer
        self._context, self._max_input = limit, info.max_input_len or limit
        self._eos, self._end_id, self._pad_id = eos, int(end_id), int(pad_id)
        self._vocab = info.vocab_size or len(tokenizer)
        self._info = {
            "backend": self.name, "model": str(engine_dir), "device": "cuda", "dtype": info.dtype,
            "context_length": limit, "max_input_len": self._max_input,
            "max_batch_size": info.max_batch_size, "quant_algo": info.quant_algo,
            "architecture": info.architecture, "tensorrt_llm": runtime.version,
            "tensorrt_llm_api": runtime.api_line, "kv_cache_fraction": fraction,
            "constrained_output": ("guided decoding (xgrammar)" if runtime.constraint_route == "guide"
                                   else "logits post-processor (llguidance mask)"),
        }

    @property
    def last_finish_reason(self) -> Optional[FinishReason]:
        """Why the last :meth:`generate` ended, as TensorRT-LLM reported it (mapped by
        :func:`finish_reason_of`); None before the first one ends."""
        return self._last_finish

    def _text_model_name(self) -> str:
        return f"the TensorRT-LLM engine {self._info.get('model', '?')}"

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                 cancel: threading.Event) -> Iterator[int]:
        runtime = self._runtime
        if runtime is None:
            raise ModelLoadError("the TensorRT-LLM backend is not loaded")
        prompt = tuple(int(t) for t in prompt_ids)
        if not prompt:
            raise RequestError("empty prompt")
        if len(prompt) > self._max_input:
            raise RequestError(
                f"prompt has {len(prompt)} tokens but the engine was built for at most "
                f"{self._max_input} input tokens; rebuild with a larger max_input_len or keep less "
                f"history")
        # Always bounded: on 0.12 a request we stop reading runs on to this limit.
        budget = min(params.max_new_tokens, self._context - len(prompt))
        if budget < 1:
            raise RequestError(f"prompt has {len(prompt)} tokens, which leaves no room to generate "
                               f"in the engine's {self._context}-token context")
        greedy = params.greedy
        halt = threading.Event()  # set when the consumer stops reading (stop string, error)
        self._last_finish = None
        feed = _ConstraintFeed(params.constraint, prompt, self._eos) \
            if params.constraint is not None else None
        guide = allowed_tokens = None
        if feed is not None:
            if runtime.constraint_route == "guide":
                guide = _guide_of(params.constraint.constraint)
            else:
                allowed_tokens = feed.allowed_after
        job = adapter.StreamJob(
            prompt_ids=prompt, max_new_tokens=budget, end_id=self._end_id, pad_id=self._pad_id,
            emit=_drop, should_stop=lambda: cancel.is_set() or halt.is_set(),
            stop_token_ids=sorted(self._eos - {self._end_id}) or None,
            # TensorRT-LLM decodes greedily with top_k=1; None leaves a field at its default.
            temperature=None if greedy else params.temperature,
            top_k=1 if greedy else (params.top_k or None),
            top_p=None if greedy or params.top_p >= 1.0 else params.top_p,
            repetition_penalty=None if params.repetition_penalty == 1.0 else params.repetition_penalty,
            seed=params.seed or None, guide=guide, allowed_tokens=allowed_tokens)

        def produce(emit) -> None:
            end = runtime.stream(dataclasses.replace(job, emit=emit))
            self._last_finish = finish_reason_of(end, budget, cancel.is_set())

        stream = iterate_in_thread(produce, halt, name="slm-trtllm-generate")
        try:
            emitted = []
            for token in stream:
                if feed is not None:
                    emitted.append(token)
                    if not feed.sync(emitted):
                        return   # refused by the grammar (constraint.rejected says why)
                yield token
                if cancel.is_set():  # tokens already queued behind a cancel are not handed out
                    break
        finally:
            stream.close()  # stops and joins the producer, which records the finish reason
        if self._last_finish is FinishReason.ERROR:
            raise RequestError("TensorRT-LLM ended the request with an error (timeout)")

    def describe(self) -> dict:
        return dict(self._info)

    def close(self) -> None:
        runtime, self._runtime = self._runtime, None
        if runtime is not None:
            runtime.close()
        self._tokenizer = None
        self._grammar_tokenizer = None


def _drop(token: int) -> None:
    """Placeholder ``emit`` until the worker thread supplies the real one."""


def _guide_of(constraint) -> Tuple[str, str]:
    """TensorRT-LLM 1.x's guide for a compiled response format (see adapter.GUIDE_KINDS);
    RequestError for what xgrammar cannot be given on the engine path."""
    if constraint.kind in (JSON_SCHEMA, JSON_OBJECT):
        return "json", json.dumps(constraint.schema if constraint.schema is not None
                                  else {"type": "object"})
    if constraint.kind == REGEX:
        return "regex", constraint.pattern
    if constraint.kind == GRAMMAR and constraint.gbnf:
        return "grammar", constraint.gbnf
    raise RequestError("the tensorrt_llm backend on TensorRT-LLM 1.x cannot enforce this format: its "
                       "guided decoding takes one JSON Schema, regex or GBNF grammar, and tool_choice "
                       "auto needs a grammar around a JSON Schema; use tool_choice required (or a "
                       "tool's name)")


class _ConstraintFeed:
    """Keeps a request's TokenConstraint in step with the tokens TensorRT-LLM generated, fed by
    whichever thread sees them first: 0.12's logits post-processor (TensorRT-LLM's thread, before
    each step: :meth:`allowed_after`) or the reader (after each token: :meth:`sync`)."""

    def __init__(self, constraint, prompt: Tuple[int, ...], eos: FrozenSet[int]) -> None:
        self._constraint, self._prompt, self._eos = constraint, prompt, eos
        self._fed = 0
        self._lock = threading.Lock()
        self._offset: Optional[int] = None   # where the generated tokens start in ``ids``

    def sync(self, generated: Sequence[int]) -> bool:
        """Feed the tokens of ``generated`` not fed yet; False once the grammar refused one."""
        with self._lock:
            while self._fed < len(generated) and not self._constraint.rejected:
                token = int(generated[self._fed])
                self._fed += 1
                if token not in self._eos:
                    self._constraint.accept(token)
            return not self._constraint.rejected

    def allowed_after(self, ids: Sequence[int]):
        """The allowed-token mask after ``ids`` (the request's tokens, with or without its prompt:
        the 0.12 binding's ``ids`` is not documented either way)."""
        if self._offset is None:   # decided at the first step (ids = the prompt, or nothing)
            n = len(self._prompt)
            self._offset = n if len(ids) >= n and tuple(ids[:n]) == self._prompt else 0
        self.sync(ids[self._offset:])
        with self._lock:
            return self._constraint.allowed()
