"""PyTorch / transformers backend: any causal LM checkpoint, on CPU or CUDA.

Generation runs ``model.generate`` on a worker thread with a streamer that hands each new token to
the caller through a bounded queue (:func:`slm_ros.core.streaming.iterate_in_thread`). A stopping
criterion checks the cancel flag after every token, so during decoding a cancel stops generation
within one token. The prompt is evaluated (prefilled) in one forward pass that takes seconds for
long prompts (a 3,000-token prompt: 9-20 s for SmolLM2-135M on a 2-core CPU), so for that pass every
submodule of the model gets a forward pre-hook that abandons it once the cancel flag is set: a
cancel then waits at most for the module call under way, the longest being one layer's attention
(0.2-0.4 s at 3,500 tokens on that CPU; cancels at random points of a 3,000-token prefill took
effect after a median 13 ms). The hooks remove themselves when the prompt pass returns, so decoding
runs without them.

The KV cache of the last request is kept for a prompt that continues it, the next turn of a chat,
which then evaluates only its new message (:class:`ConversationCache`).

Control-token strings typed in message text stay text (see
:class:`~slm_ros.backends.hf_tokenizer.LiteralControlTokens`).
"""

from __future__ import annotations

import threading
from typing import FrozenSet, Iterator, Sequence

import torch
import transformers
from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor,
                          StoppingCriteria)
from transformers.generation.streamers import BaseStreamer

from slm_ros.backends.base import Backend, BackendConfig
from slm_ros.backends.hf_tokenizer import HfTokenizerMixin
from slm_ros.core.errors import ConfigError, ModelLoadError
from slm_ros.core.streaming import iterate_in_thread
from slm_ros.core.types import SamplingParams

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Used only for checkpoints that ship no chat template (base models).
_FALLBACK_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a GPU is usable, else ``cpu``; an unusable explicit choice is an error."""
    device = (device or "auto").strip().lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but PyTorch sees no CUDA GPU "
                              f"(torch {torch.__version__}); use device: cpu or auto")
        return device
    raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (x86 AVX512-BF16 / AMX, Arm BF16)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` → on GPUs bfloat16 where supported, else float16; on CPUs bfloat16 only where the CPU
    has native bf16 instructions, else float32.

    Measured on a 2-core AVX2 CPU with SmolLM2-135M (42-token prompt): bfloat16 decodes faster
    (27 vs 16 tokens/s, half the bytes per token) but prefills 3.4x slower (580 vs 170 ms to first
    token, ~14 vs ~4 ms per prompt token), and prompts with chat history are long: float32 wins there.
    """
    dtype = (dtype or "auto").strip().lower()
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ConfigError(f"dtype must be auto, {', '.join(_DTYPES)}; got {dtype!r}") from None


class _CancelCriteria(StoppingCriteria):
    """Stop ``generate`` as soon as any of the flags is set (checked after every token)."""

    def __init__(self, *flags: threading.Event):
        self._flags = flags

    def __call__(self, input_ids, scores, **kwargs):
        stop = any(flag.is_set() for flag in self._flags)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class _ConstraintMask(LogitsProcessor):
    """Constrained output: every token that would break the request's format gets -inf."""

    def __init__(self, constraint) -> None:
        self._constraint = constraint

    def __call__(self, input_ids, scores):
        allowed = torch.from_numpy(self._constraint.allowed())
        n = min(allowed.shape[0], scores.shape[-1])
        scores[:, :n] = scores[:, :n].masked_fill(~allowed[:n].to(scores.device), float("-inf"))
        if scores.shape[-1] > n:   # logits rows past the tokenizer's vocabulary
            scores[:, n:] = float("-inf")
        return scores


class _ConstraintFeed(StoppingCriteria):
    """Feeds each sampled token to the request's constraint (before the next step's mask) and
    stops generation once the output is complete and nothing may follow, or the grammar refused
    a token."""

    def __init__(self, constraint, prompt_len: int, eos: FrozenSet[int]) -> None:
        self._constraint, self._seen, self._eos = constraint, prompt_len, eos

    def __call__(self, input_ids, scores, **kwargs):
        stop = False
        if input_ids.shape[-1] > self._seen:
            self._seen = input_ids.shape[-1]
            token = int(input_ids[0, -1])
            if token not in self._eos:
                stop = not self._constraint.accept(token) or self._constraint.done
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class _Interrupted(Exception):
    """Raised inside the model's forward pass to abandon a generation whose flags are set."""


def _interrupt_prefill(model, *flags: threading.Event) -> list:
    """Make the next forward pass of ``model`` (the prompt's, in ``generate``) stop as soon as any
    of ``flags`` is set: a pre-hook on every submodule raises :class:`_Interrupted`. The hooks
    remove themselves when that pass returns; decoding runs without them. Returns the handles, for
    removing them when the pass raised (removing twice is harmless)."""
    def check(module, args) -> None:
        for flag in flags:
            if flag.is_set():
                raise _Interrupted()

    def prompt_done(module, args, output) -> None:
        for handle in handles:
            handle.remove()

    handles = [module.register_forward_pre_hook(check) for module in model.modules()]
    handles.append(model.register_forward_hook(prompt_done))
    return handles


class _TokenStreamer(BaseStreamer):
    """Forward each new token id to ``emit``; the first ``put`` (the prompt) is skipped."""

    def __init__(self, emit):
        self._emit = emit
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self._emit(int(token))

    def end(self) -> None:
        pass


def generation_config(params: SamplingParams, eos: FrozenSet[int]) -> GenerationConfig:
    """The ``GenerationConfig`` for one request's sampling settings."""
    sample = not params.greedy
    return GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        do_sample=sample,
        temperature=params.temperature if sample else None,
        top_p=params.top_p if sample and params.top_p < 1.0 else None,
        top_k=params.top_k if sample and params.top_k > 0 else None,
        repetition_penalty=params.repetition_penalty,
        eos_token_id=sorted(eos),
        pad_token_id=min(eos),
    )


class ConversationCache:
    """The KV cache of the last request (prompt and answer), kept for the next prompt that
    continues it: the next turn of a chat evaluates only its new message.

    One sequence, bounded by the context length (SmolLM2-135M, float32: ~46 KB a token, 94 MB at
    2,048). It is reused only when the new prompt contains the whole previous prompt (a chat
    continuing); any other prompt (another session, the same question asked again) starts from an
    empty cache, so it answers exactly as it would cold. A request that fails or is abandoned in
    its prompt pass drops the cache. ``lock`` is held for the whole ``generate`` call: a request
    waits for the previous one's worker thread to let go of the cache."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._cache = None
        self._ids: list = []
        self._prompt_len = 0

    def take(self, prompt_ids: Sequence[int]):
        """The cache to pass to ``generate`` for ``prompt_ids`` (caller holds ``lock``)."""
        from transformers import DynamicCache
        shared = 0
        for a, b in zip(self._ids, prompt_ids):
            if a != b:
                break
            shared += 1
        # At least one prompt token is evaluated: the first logits come from this request.
        if self._cache is not None and self._prompt_len <= shared < len(prompt_ids):
            surplus = self._cache.get_seq_length() - shared
            if surplus > 0:
                # A negative count removes that many positions from the end (every transformers
                # version; newer ones refuse a positive length).
                self._cache.crop(-surplus)
            return self._cache
        self._cache, self._ids, self._prompt_len = DynamicCache(), [], 0
        return self._cache

    def keep(self, prompt_ids: Sequence[int], generated: Sequence[int]) -> None:
        """Record what the cache now holds after a completed ``generate``."""
        held = self._cache.get_seq_length() if self._cache is not None else 0
        ids = list(prompt_ids) + list(generated)
        if held > len(ids):   # not what it should be: start clean next time
            self.drop()
            return
        self._ids, self._prompt_len = ids[:held], len(prompt_ids)

    def drop(self) -> None:
        self._cache, self._ids, self._prompt_len = None, [], 0


def logits_size(model, tokenizer) -> int:
    """Rows of a transformers model's output layer (its logits size), else the tokenizer's size."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else len(tokenizer)


def stream_generate(model, input_ids: "torch.Tensor", params: SamplingParams, eos: FrozenSet[int],
                    cancel: threading.Event, name: str, conversation: "ConversationCache" = None,
                    **extra) -> Iterator[int]:
    """Run ``model.generate`` on a worker thread and yield each new token id (shared by the text and
    vision-language backends; ``extra`` are further model inputs such as ``pixel_values``).
    ``conversation`` keeps the KV cache between requests (text only)."""
    config = generation_config(params, eos)
    # Set by the caller (cancel) or when the consumer stops reading (stop string, error).
    halt = threading.Event()

    def run(emit, past) -> None:
        if params.seed:
            torch.manual_seed(params.seed)
        hooks = _interrupt_prefill(model, cancel, halt)
        stopping = [_CancelCriteria(cancel, halt)]
        processors = []
        if params.constraint is not None:
            processors.append(_ConstraintMask(params.constraint))
            stopping.append(_ConstraintFeed(params.constraint, input_ids.shape[-1], eos))
        try:
            with torch.inference_mode():
                model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    generation_config=config,
                    streamer=_TokenStreamer(emit),
                    stopping_criteria=stopping,
                    logits_processor=processors,
                    **({"past_key_values": past} if past is not None else {}),
                    **extra,
                )
        finally:
            for hook in hooks:
                hook.remove()

    def produce(emit) -> None:
        if conversation is None:
            try:
                run(emit, None)
            except _Interrupted:
                pass   # cancelled (or the consumer stopped reading): the stream just ends
            return
        prompt = input_ids[0].tolist()
        generated = []

        def record(token: int) -> None:
            generated.append(token)
            emit(token)

        with conversation.lock:
            try:
                run(record, conversation.take(prompt))
            except _Interrupted:
                conversation.drop()   # abandoned inside a forward pass: the cache is partial
            except BaseException:
                conversation.drop()
                raise
            else:
                conversation.keep(prompt, generated)

    return iterate_in_thread(produce, halt, name=name)


class TransformersBackend(HfTokenizerMixin, Backend):
    """Causal language models through ``transformers`` (PyTorch), CPU or CUDA."""

    name = "transformers"

    def __init__(self) -> None:
        self._model = None
        self._tokenizer = None
        self._device = "cpu"
        self._context = 0
        self._eos: FrozenSet[int] = frozenset()
        self._info: dict = {}
        self._conversation = ConversationCache()
        self._grammar_tokenizer = None

    def load(self, config: BackendConfig) -> None:
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        try:
            tokenizer = AutoTokenizer.from_pretrained(config.model)
            model = AutoModelForCausalLM.from_pretrained(
                config.model, dtype=dtype, trust_remote_code=False)
        except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
            raise ModelLoadError(f"transformers could not load {config.model!r}: {exc}") from exc
        model.to(device).eval()
        if device == "cpu":
            # Artifacts of the engine builder may ask for load-time steps (int8_dynamic).
            from slm_ros.build.transformers_step import apply_load_options
            model = apply_load_options(model, config.model)
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = _FALLBACK_TEMPLATE
        eos = set()
        for source in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
            if isinstance(source, int):
                eos.add(source)
            elif source:
                eos.update(int(t) for t in source)
        if not eos:
            raise ModelLoadError(f"{config.model!r} defines no end-of-sequence token")
        limit = int(getattr(model.config, "max_position_embeddings", 0) or 0) or 2048
        if config.max_context_tokens > 0:
            limit = min(limit, config.max_context_tokens)
        self._model, self._tokenizer, self._device = model, tokenizer, device
        self._context, self._eos = limit, frozenset(eos)
        self._info = {
            "backend": self.name, "model": config.model, "device": device,
            "dtype": str(dtype).replace("torch.", ""), "context_length": limit,
            "parameters": sum(p.numel() for p in model.parameters()),
            "torch": torch.__version__, "transformers": transformers.__version__,
        }

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                 cancel: threading.Event) -> Iterator[int]:
        model = self._model
        input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self._device)
        return stream_generate(model, input_ids, params, self._eos, cancel,
                               name="slm-transformers-generate", conversation=self._conversation)

    def _logits_size(self) -> int:
        return logits_size(self._model, self._tokenizer)

    def describe(self) -> dict:
        return dict(self._info)

    def close(self) -> None:
        self._model = None
        self._tokenizer = None
        self._grammar_tokenizer = None
        self._conversation.drop()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
