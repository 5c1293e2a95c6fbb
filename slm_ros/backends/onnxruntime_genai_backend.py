"""ONNX Runtime GenAI backend (PyPI ``onnxruntime-genai``): ONNX models with int4/int8 weights on
the CPU, or on CUDA with the ``onnxruntime-genai-cuda`` build.

The model is an ONNX Runtime GenAI model folder: ``genai_config.json``, ``model.onnx`` (+ external
data) and the tokenizer files, as the library's model builder writes it -- the engine builder's
``onnxruntime_genai`` step (:mod:`slm_ros.build.onnxruntime_genai_step`) makes one from a Hugging
Face checkpoint, and the folders Microsoft publishes (e.g. Phi-3.5-mini-instruct-onnx's
``cpu-int4-rtn-block-32``) load the same way.

Prompts are templated, counted and decoded with the folder's ``tokenizer.json`` through a
transformers fast tokenizer (:class:`~slm_ros.backends.hf_tokenizer.HfTokenizerMixin`): the same
token ids as the transformers backend, control-token strings typed in messages kept literal, and
the llguidance tokenizer for constrained output. The library's own tokenizer is not used.

Generation runs the library's Generator loop on the caller's thread (the engine's worker), one
``generate_next_token`` per token; the cancel flag is checked after every token, so a cancel stops
generation within one token. The prompt is appended in chunks of :data:`PREFILL_CHUNK` tokens with
the flag checked between them, so a cancel during a long prompt waits for one chunk at most (the
greedy tokens are the same as with the prompt appended at once). Each request gets a new Generator
whose KV cache holds exactly prompt + ``max_new_tokens`` (the library allocates it up front); the
cache of the previous request is not reused.

Sampling maps onto the library's search options: ``do_sample`` off when greedy, else temperature,
top_k (0 = off, as in the library) and top_p; the repetition penalty, which the library applies over
the whole sequence, prompt included (like transformers, unlike llama.cpp); ``seed`` is the
library's ``random_seed`` (0: a random one). Constrained output masks the logits of each step
between ``get_logits`` and ``set_logits``.

``device``: ``cpu`` runs on ONNX Runtime's CPU provider whatever the folder was built for; ``cuda``
/ ``cuda:N`` asks for the CUDA provider (the CUDA build of onnxruntime-genai is needed); ``auto``
keeps the providers the folder's ``genai_config.json`` names (the builder writes the one it built
for). ``dtype`` is not used: the precision was fixed when the folder was built.

The tokenizer is transformers' generic ``PreTrainedTokenizerFast`` over ``tokenizer.json``:
``AutoTokenizer`` would import torch (3.5 s and 360 MB more on a 2-core CPU) for nothing used here.

Measured on the embedded SmolLM2-135M-Instruct built at int4 (block 32, 86 MB) on a 2-core x86
CPU shared with other work (load average 3-4): load 0.5 s (1.4-2.7 s with the imports), time to
first token 160-210 ms for a 37-token prompt, 60-117 tokens/s greedy (64 new tokens), 290 MB peak
RSS with a 2,048-token context; llama_cpp on the same machine at the same time: 66-550 ms, 2.5-9
tokens/s (its spinning threads suffer most from a busy CPU), 208 MB. See the engine builder step's
docstring for build times.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Dict, FrozenSet, Iterator, Optional, Sequence

try:
    import numpy as np
    import onnxruntime_genai as og
except (ImportError, OSError) as _exc:  # missing package or its shared library
    raise ImportError(f"onnxruntime_genai is not usable: {_exc}; install it with `pip install "
                      f"onnxruntime-genai==0.18.0` (CPU) or onnxruntime-genai-cuda") from _exc

from slm_ros.backends.base import Backend, BackendConfig
from slm_ros.backends.hf_tokenizer import HfTokenizerMixin
from slm_ros.core.errors import ConfigError, ModelLoadError, RequestError
from slm_ros.core.types import SamplingParams

GENAI_CONFIG = "genai_config.json"
#: Prompt tokens appended per library call; the cancel flag is checked between calls.
PREFILL_CHUNK = 64

# Used only for folders whose tokenizer carries no chat template (base models); the same plain
# format the transformers backend falls back to.
_FALLBACK_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")


def model_folder(model: str) -> Path:
    """The ONNX Runtime GenAI model folder ``model`` names, with its parsed ``genai_config.json``
    checked; :class:`ModelLoadError` says what is wrong otherwise."""
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"onnxruntime_genai: model folder {model!r} does not exist")
    if path.is_file():
        path = path.parent
    if not (path / GENAI_CONFIG).is_file():
        what = "a Hugging Face checkpoint" if (path / "config.json").is_file() else "a directory"
        raise ModelLoadError(
            f"onnxruntime_genai loads ONNX Runtime GenAI model folders (with {GENAI_CONFIG}); "
            f"{str(path)!r} is {what} without one: build one with `slm-ros build --model "
            f"CHECKPOINT --backend onnxruntime_genai --quantization int4` or use backend "
            f"transformers")
    return path.absolute()


def read_genai_config(folder: Path) -> Dict[str, Any]:
    """``genai_config.json`` of a model folder as a dict (ModelLoadError naming the file)."""
    path = folder / GENAI_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"onnxruntime_genai: cannot read {path}: {exc}") from exc
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ModelLoadError(f"onnxruntime_genai: {path} has no \"model\" section")
    return config


def _providers(genai: Dict[str, Any]) -> list:
    """Execution providers a folder's config names for its decoder (empty: CPU)."""
    options = genai["model"].get("decoder", {}).get("session_options", {})
    names = []
    for entry in options.get("provider_options", []) or []:
        if isinstance(entry, dict):
            names.extend(str(k).lower() for k in entry)
    return names


def apply_device(config: "og.Config", device: str, genai: Dict[str, Any]) -> str:
    """Choose the execution provider for ``device`` on ``config``; returns the device's name."""
    device = (device or "auto").strip().lower()
    if device == "auto":
        names = _providers(genai)
        return names[0] if names else "cpu"
    if device == "cpu":
        config.clear_providers()
        return "cpu"
    if device.startswith("cuda"):
        index = device.split(":", 1)[1] if ":" in device else "0"
        if not index.isdigit():
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
        if not og.is_cuda_available():
            raise ConfigError(f"device {device!r} requested but this onnxruntime-genai "
                              f"({og.__version__}) has no CUDA support: install "
                              f"onnxruntime-genai-cuda, or use device cpu or auto")
        config.clear_providers()
        config.append_provider("cuda")
        config.set_provider_option("cuda", "device_id", index)
        return f"cuda:{index}"
    raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")


def _eos_ids(genai: Dict[str, Any], tokenizer, folder: Path) -> FrozenSet[int]:
    """End-of-generation ids: genai_config's, the tokenizer's and generation_config.json's."""
    eos = set()
    sources = [genai["model"].get("eos_token_id"), getattr(tokenizer, "eos_token_id", None)]
    generation = folder / "generation_config.json"
    if generation.is_file():
        try:
            sources.append(json.loads(generation.read_text(encoding="utf-8")).get("eos_token_id"))
        except (OSError, ValueError, AttributeError):
            pass   # optional file: the other sources still name the EOS token
    for source in sources:
        if isinstance(source, int):
            eos.add(source)
        elif isinstance(source, list):
            eos.update(int(t) for t in source if isinstance(t, int))
    return frozenset(eos)


def _build_facts(folder: Path) -> Dict[str, Any]:
    """What the engine builder recorded about the folder (its manifest's step facts), if any."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        facts = manifest.get("step", {})
        return facts if isinstance(facts, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}


class OnnxRuntimeGenAiBackend(HfTokenizerMixin, Backend):
    """Language models through ONNX Runtime GenAI; see the module docstring."""

    name = "onnxruntime_genai"

    def __init__(self) -> None:
        self._model: Optional["og.Model"] = None
        self._tokenizer = None
        self._context = 0
        self._vocab = 0
        self._eos: FrozenSet[int] = frozenset()
        self._info: dict = {}
        #: (llguidance tokenizer, logits size) for constrained output, built when first needed.
        self._grammar_tokenizer = None

    def load(self, config: BackendConfig) -> None:
        self.close()
        folder = model_folder(config.model)
        genai = read_genai_config(folder)
        try:
            og_config = og.Config(str(folder))
            device = apply_device(og_config, config.device, genai)
            if config.threads > 0:
                og_config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                    "intra_op_num_threads": int(config.threads)}}}}))
            model = og.Model(og_config)
        except RuntimeError as exc:
            raise ModelLoadError(f"onnxruntime-genai {og.__version__} could not load {folder}: "
                                 f"{exc}") from exc
        try:
            # The generic fast tokenizer over tokenizer.json: AutoTokenizer would import torch
            # (+3.5 s and +360 MB on a 2-core CPU) for nothing this backend uses.
            from transformers import PreTrainedTokenizerFast
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
        except (OSError, ValueError, KeyError, ImportError) as exc:
            raise ModelLoadError(f"onnxruntime_genai: cannot load the tokenizer of {folder} "
                                 f"(tokenizer.json, tokenizer_config.json): {exc}") from exc
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = _FALLBACK_TEMPLATE
        eos = _eos_ids(genai, tokenizer, folder)
        if not eos:
            raise ModelLoadError(f"{folder / GENAI_CONFIG} defines no end-of-sequence token")
        trained = int(genai["model"].get("context_length") or 0)
        limit = trained or 2048
        if config.max_context_tokens > 0:
            limit = min(limit, config.max_context_tokens)
        facts = _build_facts(folder)
        self._model, self._tokenizer = model, tokenizer
        self._context, self._eos = limit, eos
        self._vocab = int(genai["model"].get("vocab_size") or len(tokenizer))
        self._info = {
            "backend": self.name, "model": str(folder), "device": device,
            "dtype": facts.get("precision", "unknown"), "model_type": model.type,
            "context_length": limit, "trained_context_length": trained,
            "parameters": int(facts.get("parameters", 0) or 0),
            "threads": config.threads, "onnxruntime_genai": og.__version__,
        }

    def _require(self) -> "og.Model":
        if self._model is None:
            raise ModelLoadError("onnxruntime_genai backend used before load() or after close()")
        return self._model

    def _search_options(self, params: SamplingParams, max_length: int) -> Dict[str, Any]:
        options: Dict[str, Any] = {"max_length": max_length, "min_length": 0, "num_beams": 1,
                                   "repetition_penalty": float(params.repetition_penalty)}
        if params.greedy:
            options["do_sample"] = False
        else:
            options.update(do_sample=True, temperature=float(params.temperature),
                           top_k=int(params.top_k), top_p=float(params.top_p))
        # The library's seed is a 32-bit integer; -1 asks it for a random one.
        options["random_seed"] = int(params.seed % 0x7FFFFFFF) if params.seed else -1
        return options

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                 cancel: threading.Event) -> Iterator[int]:
        model = self._require()
        ids = np.asarray([int(t) for t in prompt_ids], dtype=np.int32)
        limit = min(params.max_new_tokens, self._generation_room(int(ids.size)))
        try:
            search = og.GeneratorParams(model)
            search.set_search_options(**self._search_options(params, int(ids.size) + limit))
            generator = og.Generator(model, search)
        except RuntimeError as exc:
            raise RequestError(f"onnxruntime_genai refused the sampling settings: {exc}") from exc
        constraint = params.constraint
        try:
            for start in range(0, int(ids.size), PREFILL_CHUNK):
                if cancel.is_set():
                    return
                generator.append_tokens(ids[start:start + PREFILL_CHUNK])
            n = 0
            while not cancel.is_set():
                if constraint is not None:   # constrained output: only tokens that keep it valid
                    logits = generator.get_logits()
                    constraint.mask(logits.reshape(-1))
                    generator.set_logits(logits)
                generator.generate_next_token()
                token = int(generator.get_next_tokens()[0])
                n += 1
                if constraint is not None and token not in self._eos:
                    if not constraint.accept(token):
                        return   # refused by the grammar (constraint.rejected says why)
                    if constraint.done:
                        yield token
                        return
                yield token
                if n >= limit or token in self._eos or generator.is_done():
                    return
        finally:
            del generator   # frees its KV cache now, not when the caller drops the iterator

    def describe(self) -> dict:
        return dict(self._info)

    def close(self) -> None:
        self._model = None
        self._tokenizer = None
        self._grammar_tokenizer = None
