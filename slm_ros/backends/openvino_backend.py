"""OpenVINO GenAI backend: an OpenVINO IR (built by the engine builder's ``openvino`` step) run by
``openvino_genai.LLMPipeline`` on an Intel CPU, GPU or NPU.

The model path is an artifact directory holding ``openvino_model.xml`` and the OpenVINO tokenizer
(``openvino_tokenizer.xml`` / ``openvino_detokenizer.xml``); the Hugging Face tokenizer files beside
them render the chat template, count and decode tokens (the same code as the transformers backend,
so control-token strings typed in messages stay literal). ``device`` ``auto``/``cpu`` runs on the
CPU; ``gpu``, ``gpu.N`` and ``npu`` pick an Intel GPU or NPU (OpenVINO compiles the IR for it at
load); ``cuda`` is refused. ``dtype`` ``auto`` keeps the device's own precision choices (the CPU
plugin computes in bf16 on CPUs that have it and stores the KV cache as u8); ``float32`` computes
and caches in float32 (what the tests compare with transformers).

Generation: the pipeline's ``generate`` blocks until it is done, so it runs on a helper thread and
hands each new token id through a queue to the iterator :meth:`OpenVinoBackend.generate`
returns. The pipeline calls the streamer after every token; once ``cancel`` is set (or the consumer
stops iterating) the streamer answers ``CANCEL`` and the pipeline stops after that token, and the
iterator itself stops yielding at once. The end-of-sequence token is streamed and yielded last.

Sampling maps onto ``GenerationConfig``: greedy (``do_sample`` off) or temperature, top-p, top-k
(0 = off) and a seeded draw (``seed == 0``: a random seed), and the repetition penalty in both
cases.

Constrained output (``response_format``) is not supported: LLMPipeline has no per-step logits hook
for the engine's token constraint (its own structured output compiles a grammar inside the
pipeline), so requests with one get a clear "not supported" error.
"""

from __future__ import annotations

import queue
import random
import threading
from pathlib import Path
from typing import FrozenSet, Iterator, List, Optional, Sequence, Tuple

try:
    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai
except (ImportError, OSError, RuntimeError) as _exc:  # missing package or its shared libraries
    raise ImportError(f"openvino_genai is not usable: {_exc}; install it with `pip install "
                      f"openvino-genai==2026.4.1.0 openvino-tokenizers==2026.4.1.0`") from _exc

from slm_ros.backends.base import Backend, BackendConfig
from slm_ros.backends.hf_tokenizer import HfTokenizerMixin
from slm_ros.core.errors import BackendError, ConfigError, ModelLoadError, RequestError
from slm_ros.core.types import SamplingParams

DEVICES = ("CPU", "GPU", "NPU")
#: Context used when the model's config names none.
DEFAULT_MAX_CONTEXT = 2048
_REQUIRED = ("openvino_model.xml", "openvino_tokenizer.xml", "openvino_detokenizer.xml",
             "tokenizer.json")
# For checkpoints without a chat template (base models): the plain format the other backends use.
_FALLBACK_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")
#: Seconds the iterator waits for the generation thread to finish after it stopped early.
_JOIN_TIMEOUT_S = 30.0
_END = object()


def resolve_device(device: str) -> str:
    """OpenVINO device name for the ``device`` parameter; ConfigError lists the valid ones."""
    name = (device or "auto").strip().upper()
    if name in ("AUTO", "CPU"):
        return "CPU"
    if name.split(".", 1)[0] in ("GPU", "NPU"):
        return name
    raise ConfigError(f"the openvino backend runs on OpenVINO devices: device must be auto, cpu, "
                      f"gpu, gpu.N or npu, got {device!r}")


class _TokenStreamer(ov_genai.StreamerBase):
    """Receives token ids from the pipeline and puts them on a queue; says CANCEL once asked to."""

    def __init__(self, out: "queue.Queue", cancel: threading.Event, stop: threading.Event):
        super().__init__()
        self._out, self._cancel, self._stop = out, cancel, stop

    def write(self, token):
        for t in (token if isinstance(token, (list, tuple)) else (token,)):
            self._out.put(int(t))
        if self._cancel.is_set() or self._stop.is_set():
            return ov_genai.StreamingStatus.CANCEL
        return ov_genai.StreamingStatus.RUNNING

    def end(self) -> None:
        """Nothing is held back: every token was handed over in :meth:`write`."""


class OpenVinoBackend(HfTokenizerMixin, Backend):
    """Language models as OpenVINO IR through OpenVINO GenAI; see the module docstring."""

    name = "openvino"

    def __init__(self) -> None:
        self._pipe: Optional["ov_genai.LLMPipeline"] = None
        self._tokenizer = None
        self._context = 0
        self._eos: FrozenSet[int] = frozenset()
        self._info: dict = {}

    def load(self, config: BackendConfig) -> None:
        self.close()
        device = resolve_device(config.device)
        precision = _precision(config.dtype)
        path = Path(config.model).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"openvino: model {config.model!r} is not a directory; pass an "
                                 f"OpenVINO IR built by `slm-ros build --backend openvino`")
        missing = [name for name in _REQUIRED if not (path / name).is_file()]
        if missing:
            hint = (" (a Hugging Face checkpoint: build it with the engine builder's openvino step)"
                    if (path / "config.json").is_file() else "")
            raise ModelLoadError(f"openvino: {path} lacks {', '.join(missing)}{hint}")
        if device != "CPU" and device.split(".", 1)[0] not in _available_devices():
            raise ModelLoadError(f"openvino: device {device} is not available here; OpenVINO sees "
                                 f"{', '.join(_available_devices()) or 'no device'}")
        properties = {"ATTENTION_BACKEND": "SDPA", **precision}
        if config.threads > 0 and device == "CPU":
            properties["INFERENCE_NUM_THREADS"] = int(config.threads)
        try:
            # The generic fast tokenizer over tokenizer.json: AutoTokenizer would import torch too.
            from transformers import PreTrainedTokenizerFast
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
            pipe = ov_genai.LLMPipeline(str(path), device, **properties)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelLoadError(f"openvino_genai {ov_genai.__version__} could not load {path} on "
                                 f"{device}: {type(exc).__name__}: {exc}") from exc
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if not has_template:
            tokenizer.chat_template = _FALLBACK_TEMPLATE
        eos = set()
        generation = pipe.get_generation_config()
        for source in (generation.eos_token_id, tokenizer.eos_token_id):
            if isinstance(source, int) and source >= 0:
                eos.add(source)
        eos.update(int(t) for t in generation.stop_token_ids)
        if not eos:
            raise ModelLoadError(f"{path} defines no end-of-sequence token")
        trained, parameters = _model_facts(path)
        limit = trained or DEFAULT_MAX_CONTEXT
        if config.max_context_tokens > 0:
            limit = min(limit, config.max_context_tokens)
        self._pipe, self._tokenizer = pipe, tokenizer
        self._context, self._eos = limit, frozenset(eos)
        self._info = {
            "backend": self.name, "model": str(path), "device": device,
            "context_length": limit, "trained_context_length": trained, "parameters": parameters,
            "weights": _weight_format(path), "dtype": (config.dtype or "auto").strip().lower(),
            "chat_template": has_template,
            "openvino": ov.get_version(), "openvino_genai": ov_genai.__version__,
        }

    def _require(self) -> "ov_genai.LLMPipeline":
        if self._pipe is None:
            raise ModelLoadError("openvino backend used before load() or after close()")
        return self._pipe

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                 cancel: threading.Event) -> Iterator[int]:
        pipe = self._require()
        ids = [int(t) for t in prompt_ids]
        room = self._generation_room(len(ids))
        if params.constraint is not None:
            self.grammar_tokenizer()  # raises: see the module docstring
        return self._stream(pipe, ids, self._config(params, min(params.max_new_tokens, room)),
                            cancel)

    def _config(self, params: SamplingParams, limit: int) -> "ov_genai.GenerationConfig":
        config = ov_genai.GenerationConfig()
        config.max_new_tokens = int(limit)
        config.eos_token_id = min(self._eos)
        config.stop_token_ids = set(self._eos)
        config.repetition_penalty = float(params.repetition_penalty)
        if params.greedy:
            config.do_sample = False
        else:
            config.do_sample = True
            config.temperature = float(params.temperature)
            config.top_p = float(params.top_p)
            config.top_k = int(params.top_k) if params.top_k > 0 else 0
            config.rng_seed = int(params.seed) % (2 ** 32) if params.seed else \
                random.SystemRandom().randrange(1, 2 ** 32)
        return config

    def _stream(self, pipe, ids: List[int], config, cancel: threading.Event) -> Iterator[int]:
        tokens: "queue.Queue" = queue.Queue()
        stop = threading.Event()
        failure: List[BaseException] = []
        streamer = _TokenStreamer(tokens, cancel, stop)
        input_ids = ov.Tensor(np.array([ids], dtype=np.int64))

        def run() -> None:
            try:
                pipe.generate(input_ids, config, streamer)
            except (RuntimeError, ValueError, TypeError) as exc:
                failure.append(exc)
            finally:
                tokens.put(_END)

        worker = threading.Thread(target=run, name="slm-openvino-generate", daemon=True)
        n = 0
        if cancel.is_set():
            return
        worker.start()
        try:
            while True:
                token = tokens.get()
                if token is _END:
                    break
                n += 1
                yield token
                if token in self._eos or n >= config.max_new_tokens or cancel.is_set():
                    break
        finally:
            stop.set()  # the streamer answers CANCEL at the pipeline's next token
            worker.join(_JOIN_TIMEOUT_S)
        if failure and not cancel.is_set():
            raise BackendError(f"openvino_genai failed while generating with "
                               f"{self._info.get('model', '?')}: {type(failure[0]).__name__}: "
                               f"{failure[0]}")

    def grammar_tokenizer(self):
        raise RequestError("backend openvino does not support response_format (constrained "
                           "output): OpenVINO GenAI's LLMPipeline has no per-token logits hook "
                           "for the engine's grammar; use llama_cpp or transformers")

    def describe(self) -> dict:
        return dict(self._info)

    def close(self) -> None:
        self._pipe = None
        self._tokenizer = None
        self._literal_controls = None


def _precision(dtype: str) -> dict:
    """Plugin properties for the ``dtype`` parameter: ``auto`` leaves the device's choice (the CPU
    plugin computes in bf16 where the CPU has it and keeps the KV cache as u8); ``float32`` computes
    and caches in float32 (exact, slower); ``bfloat16`` / ``float16`` ask for that precision."""
    name = (dtype or "auto").strip().lower()
    if name == "auto":
        return {}
    hints = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
    if name not in hints:
        raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    properties = {"INFERENCE_PRECISION_HINT": hints[name]}
    if name == "float32":
        properties["KV_CACHE_PRECISION"] = "f32"
    return properties


def _available_devices() -> List[str]:
    try:
        return [d.split(".", 1)[0] for d in ov.Core().available_devices]
    except RuntimeError:
        return []


def _model_facts(path: Path) -> Tuple[int, int]:
    """(trained context length, parameter count) from the config.json beside the IR; 0 where it
    does not say (the count is the memory planner's, from the architecture)."""
    import json
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        trained = int(config.get("max_position_embeddings") or 0)
    except (OSError, ValueError, TypeError, AttributeError):
        return 0, 0
    try:
        from slm_ros.build.planner import ModelArch
        return trained, ModelArch.from_config(config).parameters
    except Exception:  # noqa: BLE001 - a config the planner cannot read: the count is unknown
        return trained, 0


def _weight_format(path: Path) -> str:
    """The artifact's weight format from its build manifest's spec, when it has one."""
    import json
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        return str(manifest["step"]["quantization"])
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"
