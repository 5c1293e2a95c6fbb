"""llama.cpp backend (llama-cpp-python): GGUF models on the CPU, quantized weights run natively.

The model path is a ``.gguf`` file (or an engine-builder artifact directory holding one, resolved by
:func:`slm_ros.models.resolve_model` with ``prefer_gguf``). Everything the backend needs comes from
the file: weights, tokenizer, chat template (``tokenizer.chat_template``, rendered with Jinja2 like
transformers does), end-of-generation tokens and the trained context length.

Generation iterates llama-cpp-python's token generator on the caller's thread (the engine's worker):
every library call releases the GIL, and the cancel flag is checked after every token, so a cancel
stops generation within one token. The prompt is evaluated in library calls of up to 512 tokens that
take seconds each for long prompts (a 4,190-token prompt: 25 s on a 2-core CPU), so while it runs
llama.cpp gets an abort callback that reads the cancel flag: ggml's CPU backend calls it between
the nodes of the compute graph (a few milliseconds apart), and a cancel stops the prefill within one
node: cancels at random points of a 3,000-token prefill took effect after a median 6 ms, at most
40 ms (measured on the CPU only). The callback is installed only for the prefill: during decoding, with
hundreds of graph nodes per token, each call taking the GIL would cost more than the per-token
check. An aborted prefill leaves a half-evaluated batch in the KV cache: the next request evaluates
its prompt from the start.

The chat template is rendered to text and tokenized with special tokens recognised (its
``<|im_start|>`` must become the control token), but control-token strings typed in message text
(user, system prompt, history) are tokenized as text: a user cannot close their turn or open a
system turn by typing ``<|im_end|>`` (:class:`~slm_ros.backends.hf_tokenizer.LiteralControlTokens`).

The KV cache of the previous request is reused for the prompt prefix they share: the system prompt,
and in a chat session the whole history up to the new user turn, including the tokens the model
generated for the previous answer (the chat template renders that answer back to the same tokens), so
a turn evaluates only its new message: work proportional to the turn, not to the conversation. At
least two prompt tokens are always evaluated. llama.cpp computes a batch of one token (decoding) along
another numerical path than a larger batch (a prompt), so a turn answered from a warm cache can differ
in its last digits, and rarely in a greedy token, from the same full prompt evaluated cold (after a
restart); a prompt that is not a continuation (another session, the same question asked again) reuses
only positions a prompt evaluation computed, and answers exactly as it would cold (tested).

Measured on the embedded SmolLM2-135M-Instruct (Q4_1) on a 2-core AVX2 CPU: load 0.4 s, 82-98
tokens/s with 2 threads (~62 with 1), about 260 MB peak RSS with a 4096-token context (the KV cache
is allocated up front: ~23 KB per token of context for this model). Threads default to every core
the process may run on (``threads: 0``).

Answers differ from the transformers backend on the same GGUF: llama.cpp multiplies Q4_1 weights with
activations quantized to 8 bits, transformers dequantizes to float32. The first greedy token of
"What is the capital of France?" is a near tie ("The" 25.33 vs "L" 25.24 in float32): transformers
answers "The capital of France is Paris.", llama.cpp "L'Étoile, la Marseillaise. Paris is the capital
of France ..." (with repetition penalty 1.1). Requantized to q5_1, q6_k or f16 by the engine builder,
llama.cpp answers like transformers.

Sampling maps onto llama.cpp's sampler chain: repetition penalty (over the last 64 generated tokens;
transformers also penalizes the prompt's tokens, so sampled and even greedy texts differ between the
two backends), then greedy when ``temperature == 0`` or ``top_k == 1``, else top-k (0 = off), top-p,
temperature and a seeded draw (``seed == 0``: a random seed).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from pathlib import Path
from typing import FrozenSet, Iterator, List, Optional, Sequence

try:
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
except (ImportError, OSError, RuntimeError) as _exc:  # missing package or its shared library
    raise ImportError(f"llama_cpp is not usable: {_exc}; install it with `pip install "
                      f"llama-cpp-python==0.3.36` (compiles llama.cpp, about 12 minutes)") from _exc

from slm_ros.backends.base import Backend, BackendConfig
from slm_ros.backends.hf_tokenizer import LiteralControlTokens
from slm_ros.core.errors import ConfigError, ModelLoadError, RequestError, SlmError
from slm_ros.core.session import Message
from slm_ros.core.types import SamplingParams

#: Context used when neither ``max_context_tokens`` nor a smaller trained context says otherwise.
#: llama.cpp allocates the whole KV cache at load; models trained for 32k-128k tokens would take
#: gigabytes for a context that a robot's short prompts never use.
DEFAULT_MAX_CONTEXT = 4096

# For GGUF files that carry no chat template (base models); the same plain format the transformers
# backend falls back to.
_FALLBACK_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")

_GGUF_MAGIC = b"GGUF"
#: A NULL abort callback: llama.cpp never aborts.
_NO_ABORT = llama_cpp.ggml_abort_callback(0)
#: Prompt tokens always evaluated, never taken from the KV cache: the last logits must come from
#: this request's own evaluation.
_MIN_EVALUATED = 2


def gguf_file(model: str) -> Path:
    """The GGUF file ``model`` names; :class:`ModelLoadError` says what is wrong otherwise."""
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"llama_cpp: model file {model!r} does not exist")
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) != 1:
            what = "a Hugging Face checkpoint directory" if (path / "config.json").is_file() \
                else f"a directory with {len(found)} .gguf files"
            raise ModelLoadError(
                f"llama_cpp loads GGUF files; {model!r} is {what}: pass a .gguf file, convert the "
                f"checkpoint with llama.cpp's convert_hf_to_gguf.py, or use backend transformers")
        path = found[0]
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelLoadError(f"llama_cpp: cannot read {path}: {exc}") from exc
    if magic != _GGUF_MAGIC:
        raise ModelLoadError(f"llama_cpp: {path} is not a GGUF file (its first bytes are "
                             f"{magic!r}, not {_GGUF_MAGIC!r}); the llama_cpp backend loads .gguf "
                             f"files")
    return path.absolute()


def file_type_name(file_type: int) -> str:
    """``general.file_type`` of a GGUF as a name (``Q4_1``, ``F16``, ...)."""
    for name in dir(llama_cpp):
        if name.startswith("LLAMA_FTYPE_") and getattr(llama_cpp, name) == file_type:
            return name.replace("LLAMA_FTYPE_MOSTLY_", "").replace("LLAMA_FTYPE_ALL_", "")
    return str(file_type)


def _device_layers(device: str) -> tuple:
    """(n_gpu_layers, main_gpu, device name) for the ``device`` parameter."""
    device = (device or "auto").strip().lower()
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    if device == "cpu" or (device == "auto" and not gpu):
        return 0, 0, "cpu"
    if device == "auto":
        return -1, 0, "gpu"
    if device.startswith("cuda"):
        if not gpu:
            raise ConfigError(f"device {device!r} requested but this llama-cpp-python build has no "
                              f"GPU support (built for the CPU); use device cpu or auto, or rebuild "
                              f"it with CMAKE_ARGS=-DGGML_CUDA=on")
        index = device.split(":", 1)[1] if ":" in device else "0"
        if not index.isdigit():
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
        return -1, int(index), device
    raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")


def _cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class LlamaCppBackend(Backend):
    """GGUF language models through llama.cpp; see the module docstring."""

    name = "llama_cpp"

    def __init__(self) -> None:
        self._llama: Optional["llama_cpp.Llama"] = None
        self._template: Optional[Jinja2ChatFormatter] = None
        self._syntax: Optional[str] = None
        self._context = 0
        self._eos: FrozenSet[int] = frozenset()
        self._literal = LiteralControlTokens({})
        self._info: dict = {}
        #: Leading positions of the KV cache that hold valid evaluations (reusable).
        self._prefilled = 0
        #: (llguidance tokenizer, vocabulary size) for constrained output, built when first needed.
        self._grammar_tokenizer = None
        #: Cancel flag the abort callback reads while a prompt is evaluated (None: never abort).
        self._abort_flag: Optional[threading.Event] = None
        # The ctypes callback must outlive every call llama.cpp makes to it: held as long as self.
        self._abort_callback = llama_cpp.ggml_abort_callback(self._should_abort)

    def load(self, config: BackendConfig) -> None:
        self.close()
        path = gguf_file(config.model)
        n_gpu_layers, main_gpu, device = _device_layers(config.device)
        trained = self._trained_context(path)
        if config.max_context_tokens > 0:
            n_ctx = min(config.max_context_tokens, trained) if trained else config.max_context_tokens
        else:
            n_ctx = min(trained, DEFAULT_MAX_CONTEXT) if trained else DEFAULT_MAX_CONTEXT
        threads = config.threads if config.threads > 0 else _cpu_threads()
        try:
            llama = llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                n_gpu_layers=n_gpu_layers, main_gpu=main_gpu, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"llama.cpp {llama_cpp.__version__} could not load {path}: {exc} "
                                 f"(an architecture this llama.cpp does not know, or a damaged "
                                 f"file)") from exc
        try:
            meta = llama.metadata
            vocab = llama_cpp.llama_model_get_vocab(llama.model)
            # End of generation: EOS, end of turn, and whatever else llama.cpp's vocabulary counts
            # as such (SmolLM2: <|endoftext|>, <|im_end|>).
            eos = {llama.token_eos(), llama_cpp.llama_vocab_eot(vocab)}
            eos.update(t for t in range(llama.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t))
            eos.discard(-1)
            if not eos:
                raise ModelLoadError(f"{path} defines no end-of-generation token")
            # Tokens that tokenize(special=True) recognises in text and special=False does not.
            control = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
            controls = {}
            for t in range(llama.n_vocab()):
                if llama_cpp.llama_vocab_get_attr(vocab, t) & control:
                    controls.setdefault(llama_cpp.llama_vocab_get_text(vocab, t).decode(
                        "utf-8", errors="replace"), t)
            literal = LiteralControlTokens(controls)
            special = {"eos_token": llama.token_eos(), "bos_token": llama.token_bos()}
            names = {k: llama_cpp.llama_vocab_get_text(vocab, v).decode("utf-8") if v >= 0 else ""
                     for k, v in special.items()}
            template = meta.get("tokenizer.chat_template") or _FALLBACK_TEMPLATE
            self._template = Jinja2ChatFormatter(template=template, **names)
            self._syntax = None
            file_type = int(meta.get("general.file_type", -1))
            self._info = {
                "backend": self.name, "model": str(path), "device": device,
                "dtype": file_type_name(file_type) if file_type >= 0 else "unknown",
                "context_length": llama.n_ctx(), "trained_context_length": trained,
                "parameters": int(llama_cpp.llama_model_n_params(llama.model)),
                "size_bytes": int(llama_cpp.llama_model_size(llama.model)),
                "threads": threads, "chat_template": "tokenizer.chat_template" in meta,
                "llama_cpp": llama_cpp.__version__,
            }
        except (SlmError, ValueError, UnicodeDecodeError) as exc:
            llama.close()
            if isinstance(exc, SlmError):
                raise
            raise ModelLoadError(f"llama_cpp: cannot read the metadata of {path}: {exc}") from exc
        self._llama, self._context, self._eos = llama, llama.n_ctx(), frozenset(eos)
        self._literal = literal

    @staticmethod
    def _trained_context(path: Path) -> int:
        """``<arch>.context_length`` from the GGUF header (0 when absent), read before loading."""
        from slm_ros.build.builder import gguf_config
        from slm_ros.build.spec import BuildError
        try:
            return int(gguf_config(path).get("max_position_embeddings") or 0)
        except BuildError as exc:
            raise ModelLoadError(f"llama_cpp: {exc}") from exc

    def _require(self) -> "llama_cpp.Llama":
        if self._llama is None:
            raise ModelLoadError("llama_cpp backend used before load() or after close()")
        return self._llama

    def apply_chat_template(self, messages: List[Message], images: Sequence = (),
                            tools: Sequence[dict] = ()) -> List[int]:
        if images:
            raise RequestError(f"model {self._info.get('model', '?')} is a text model and cannot "
                               f"take images (use the vision node with a vision-language model)")
        llama = self._require()
        # Control-token strings typed in the messages stay text (see LiteralControlTokens).
        marked, brackets = self._literal.mark(messages)
        try:
            text = self._template(messages=marked, tools=list(tools) or None).prompt
        except Exception as exc:  # noqa: BLE001 - jinja2 raises many types; the template is data
            raise RequestError(f"the chat template of {self._info.get('model', '?')} failed on "
                               f"this conversation: {type(exc).__name__}: {exc}") from exc
        # The template writes the special tokens itself (as transformers tokenizes it: no BOS added).
        ids = self._literal.encode(
            text, brackets,
            encode=lambda t: llama.tokenize(t.encode("utf-8"), add_bos=False, special=True),
            encode_literal=lambda t: llama.tokenize(t.encode("utf-8"), add_bos=False,
                                                    special=False))
        return [int(t) for t in ids]

    def tool_syntax(self) -> str:
        if self._syntax is None:
            from slm_ros.core.constraints import detect_tool_syntax, probe_tools
            try:
                text = self._template(messages=[{"role": "user", "content": "Hi"}],
                                      tools=probe_tools()).prompt
            except Exception:  # noqa: BLE001 - a template that cannot take tools: generic form
                text = ""
            self._syntax = detect_tool_syntax(text)
        return self._syntax

    def count_tokens(self, text: str) -> int:
        return len(self._require().tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        # Bytes of a character split across tokens decode to U+FFFD at the end of the text, which
        # the incremental detokenizer holds back until the character is complete.
        data = self._require().detokenize([int(t) for t in token_ids], special=False)
        return data.decode("utf-8", errors="replace")

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                 cancel: threading.Event) -> Iterator[int]:
        llama = self._require()
        ids = [int(t) for t in prompt_ids]
        limit = min(params.max_new_tokens, self._generation_room(len(ids)))
        # llama.cpp seeds are 32-bit; LLAMA_DEFAULT_SEED (0xFFFFFFFF) asks for a random one.
        llama.set_seed(params.seed % 0xFFFFFFFF if params.seed else llama_cpp.LLAMA_DEFAULT_SEED)
        if params.greedy:
            sampling = {"temp": 0.0, "top_k": 0, "top_p": 1.0}
        else:
            sampling = {"temp": params.temperature, "top_k": params.top_k, "top_p": params.top_p}
        if cancel.is_set():
            return
        # Reuse of the KV cache (see the module docstring): the library reuses what matches of
        # llama.n_tokens cached positions; offer it only valid positions, and leave at least
        # _MIN_EVALUATED prompt tokens to evaluate.
        llama.n_tokens = max(0, min(llama.n_tokens, self._prefilled, len(ids) - _MIN_EVALUATED))
        self._prefilled = 0
        constraint = params.constraint
        processors = None
        if constraint is not None:   # constrained output: only tokens that keep it valid
            def constrain(_input_ids, scores):
                constraint.mask(scores)
                return scores
            processors = llama_cpp.LogitsProcessorList([constrain])
        tokens = llama.generate(ids, min_p=0.0, typical_p=1.0, logits_processor=processors,
                                repeat_penalty=params.repetition_penalty, reset=True, **sampling)
        n = 0
        try:
            # The first step evaluates the prompt and samples the first token: abortable.
            with self._abortable(llama, cancel):
                token = next(tokens, None)
            self._prefilled = len(ids)  # the whole prompt is in the KV cache now
            while token is not None:
                n += 1
                token = int(token)
                if constraint is not None and token not in self._eos:
                    if not constraint.accept(token):
                        return   # refused by the grammar (constraint.rejected says why)
                    if constraint.done:
                        yield token
                        return
                yield token
                if n >= limit or token in self._eos or cancel.is_set():
                    return
                token = next(tokens, None)
                # The previous token was evaluated: the next turn of a chat reuses it.
                self._prefilled = llama.n_tokens
        except (RuntimeError, ValueError):
            llama.reset()  # the KV cache may hold a half-evaluated batch: start clean next time
            if cancel.is_set():
                return     # llama_decode aborted by the cancel: the request ends as cancelled
            raise
        finally:
            tokens.close()

    def grammar_tokenizer(self):
        if self._grammar_tokenizer is None:
            from llguidance.llamacpp import lltokenizer_from_vocab
            vocab = llama_cpp.llama_model_get_vocab(self._require().model)
            # ~0.4 s for a 49k vocabulary: built on the first constrained request, then kept.
            with warnings.catch_warnings():   # it calls a llama_cpp alias deprecated per token
                warnings.simplefilter("ignore", DeprecationWarning)
                tokenizer = lltokenizer_from_vocab(vocab, eos_token=sorted(self._eos))
            self._grammar_tokenizer = (tokenizer, int(llama_cpp.llama_vocab_n_tokens(vocab)))
        return self._grammar_tokenizer

    def _should_abort(self, _data) -> bool:
        """ggml's abort callback (compute thread, between graph nodes): True stops llama_decode."""
        flag = self._abort_flag
        return flag is not None and flag.is_set()

    @contextlib.contextmanager
    def _abortable(self, llama: "llama_cpp.Llama", cancel: threading.Event) -> Iterator[None]:
        """llama.cpp calls that ``cancel`` aborts (llama_decode then fails: RuntimeError)."""
        self._abort_flag = cancel
        llama_cpp.llama_set_abort_callback(llama.ctx, self._abort_callback, None)
        try:
            yield
        finally:
            llama_cpp.llama_set_abort_callback(llama.ctx, _NO_ABORT, None)
            self._abort_flag = None

    def describe(self) -> dict:
        return dict(self._info)

    def close(self) -> None:
        if self._llama is not None:
            self._llama.close()
            self._llama = None
        self._template = None
        self._prefilled = 0
        self._grammar_tokenizer = None
