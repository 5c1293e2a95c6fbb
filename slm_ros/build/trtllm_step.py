"""Build step for the ``tensorrt_llm`` backend: Hugging Face checkpoint -> TensorRT-LLM engine directory.

:meth:`TensorRtLlmStep.validate` refuses, before any work, what cannot be built here: TensorRT-LLM not
installed, an unknown quantization, fp8/w4a8 on a GPU below SM 8.9 (Orin is 8.7), AWQ/SmoothQuant
without local calibration data (TensorRT-LLM would download cnn_dailymail), vision-language checkpoints
(no vision-encoder build in the adapter yet). Those checks are pure functions (:func:`check_spec`,
:func:`plan_build`) of the spec, the installed API line, the GPU's compute capability and the
checkpoint's ``config.json``, so they are tested without TensorRT-LLM or a GPU.

Artifact layout (``out_dir``, published by the builder as one directory)::

    config.json  rank0.engine             the engine, in TensorRT-LLM's own layout
    tokenizer.json  tokenizer_config.json  special_tokens_map.json  generation_config.json
    chat_template.jinja (when the checkpoint has one)

The artifact directory is the engine directory: :class:`~slm_ros.backends.tensorrt_llm_backend.
TensorRtLlmBackend` loads it as is. Everything that touches TensorRT-LLM goes through
:mod:`slm_ros.backends.trtllm_adapter`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

from slm_ros.backends import trtllm_adapter as adapter
from slm_ros.build.spec import BuildCancelled, BuildError, BuildSpec, ProgressFn
from slm_ros.core.errors import BackendUnavailable, ConfigError, ModelLoadError

#: Activation dtypes an engine is built in (float32 engines would double memory for no gain here).
ENGINE_DTYPES = ("float16", "bfloat16")

#: Upper bound on max_num_tokens for batched engines: it sizes activation buffers, which on an 8 GB
#: Orin compete with the weights and the KV cache. A single request always fits (see max_num_tokens_for).
MAX_NUM_TOKENS_CAP = 8192

#: KV-cache fraction for the runtime the 1.x LLM API starts right after building (never used for
#: generation there, so kept small).
BUILD_KV_CACHE_FRACTION = 0.1

#: model_type values and markers of vision-language checkpoints (their LLM part alone would lose the
#: image input, so they are refused rather than built text-only).
_VLM_MODEL_TYPES = ("llava", "llava_next", "llava_llama", "vila", "phi3_v", "idefics3", "mllama",
                    "qwen2_vl", "paligemma", "blip-2", "internvl_chat", "smolvlm")

#: Dataset names TensorRT-LLM's calibration loader matches by substring and then downloads.
_DOWNLOADING_DATASET_MARKERS = ("cnn_dailymail", "pileval", "scienceqa", "science_qa")


#: What TensorRT-LLM raises when a conversion or compilation fails (it asserts on configs, and an API
#: mismatch surfaces as TypeError/AttributeError); wrapped into BuildError with the model and plan.
_LIBRARY_ERRORS = (RuntimeError, ValueError, KeyError, OSError, AssertionError, TypeError,
                   AttributeError, NotImplementedError)


class TensorRtLlmUnavailable(BuildError, BackendUnavailable):
    """TensorRT-LLM cannot be used on this machine (not installed, unsupported version)."""


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """What :meth:`TensorRtLlmStep.build` will do for a validated spec."""

    quantization: adapter.Quantization
    api_line: str
    dtype: str
    architecture: str
    trt_architecture: str
    max_num_tokens: int


def max_num_tokens_for(spec: BuildSpec) -> int:
    """Tokens one engine step may process: a whole prompt must fit (0.12 runs without chunked
    context), batches up to :data:`MAX_NUM_TOKENS_CAP`."""
    return max(spec.max_input_len, min(spec.max_batch_size * spec.max_input_len, MAX_NUM_TOKENS_CAP))


def check_spec(spec: BuildSpec) -> adapter.Quantization:
    """Checks that need neither TensorRT-LLM nor the device: quantization name, device string, dtype,
    local calibration data. Returns the quantization."""
    quant = adapter.resolve_quantization(spec.quantization)
    if adapter.cuda_index(spec.device) != 0:
        raise ConfigError(f"build: device {spec.device!r}: TensorRT-LLM builds on the first visible "
                          f"GPU; pick another one with CUDA_VISIBLE_DEVICES")
    dtype = (spec.dtype or "auto").strip().lower()
    if dtype not in ("auto",) + ENGINE_DTYPES:
        raise ConfigError(f"build: dtype for tensorrt_llm must be auto, {', '.join(ENGINE_DTYPES)}; "
                          f"got {spec.dtype!r}")
    if quant.dtype and dtype not in ("auto", quant.dtype):
        raise ConfigError(f"build: quantization {quant.name!r} means dtype {quant.dtype}, but dtype is "
                          f"{spec.dtype!r}")
    if quant.needs_calibration:
        if not spec.calib_dataset:
            raise BuildError(
                f"build: quantization {quant.name!r} calibrates on sample text and TensorRT-LLM would "
                f"download cnn_dailymail for it; set calib_dataset to a local directory (a datasets "
                f"'train' split with a 'text' column) or a .txt/.json/.jsonl file of text")
        path = Path(spec.calib_dataset).expanduser()
        if not path.exists():
            raise BuildError(f"build: calib_dataset {spec.calib_dataset!r} does not exist")
        if path.is_dir() and any(m in str(path).lower() for m in _DOWNLOADING_DATASET_MARKERS):
            raise BuildError(
                f"build: calib_dataset directory {str(path)!r} has a name TensorRT-LLM treats as a "
                f"dataset to download ({', '.join(_DOWNLOADING_DATASET_MARKERS)}); rename it")
    return quant


def is_vision_language(hf_config: Dict[str, Any]) -> bool:
    """True for vision-language checkpoints (vision tower in the config)."""
    model_type = str(hf_config.get("model_type", "")).lower()
    archs = [str(a) for a in hf_config.get("architectures") or []]
    return ("vision_config" in hf_config or model_type in _VLM_MODEL_TYPES
            or any(a.endswith("ForConditionalGeneration") or "Llava" in a for a in archs))


def plan_build(spec: BuildSpec, api_line: str, sm: Optional[int],
               hf_config: Dict[str, Any]) -> BuildPlan:
    """All refusals of :meth:`TensorRtLlmStep.validate`, given the installed API line, the GPU's
    compute capability (``sm`` = major*10+minor, None = no GPU) and the checkpoint's config.json."""
    quant = check_spec(spec)
    if sm is None:
        raise BuildError("build: no CUDA GPU is visible; TensorRT-LLM compiles engines on the GPU "
                         "they will run on")
    if sm < quant.min_sm:
        usable = ", ".join(q.name for q in adapter.QUANTIZATIONS.values() if sm >= q.min_sm)
        raise BuildError(
            f"build: quantization {quant.name!r} needs a GPU with compute capability >= "
            f"{quant.min_sm // 10}.{quant.min_sm % 10} (Ada/Hopper); this GPU is SM {sm // 10}.{sm % 10}"
            f"{' (Jetson Orin)' if sm == 87 else ''}. Usable here: {usable}")
    if quant.needs_calibration and api_line == adapter.API_1X:
        raise BuildError(
            f"build: quantization {quant.name!r} is not supported by this adapter yet: on TensorRT-LLM "
            f"1.x local calibration data goes through CalibConfig, whose fields are not in the "
            f"recorded API surface (test/data/tensorrt_llm_api.json)")
    if is_vision_language(hf_config):
        raise BuildError(
            f"build: {hf_config.get('model_type', '?')} is a vision-language model, which is not "
            f"supported by this adapter yet: TensorRT-LLM 0.12 builds the vision encoder only with "
            f"its examples/multimodal/build_visual_engine.py script (not part of the installed "
            f"package) and its LLM API cannot feed image features to a streaming request; the 1.x "
            f"multimodal builder's arguments are not in the recorded API surface")
    archs = [str(a) for a in hf_config.get("architectures") or []]
    architecture = archs[0] if archs else ""
    if architecture not in adapter.TRT_ARCHITECTURES:
        raise BuildError(
            f"build: architecture {architecture or '(none in config.json)'!r} is not one slm_ros "
            f"builds with TensorRT-LLM; supported: {', '.join(adapter.TRT_ARCHITECTURES)}")
    if (api_line == adapter.API_012 and hf_config.get("tie_word_embeddings")
            and architecture in ("LlamaForCausalLM", "Qwen2ForCausalLM")):
        raise BuildError(
            f"build: {architecture} with tie_word_embeddings=true fails checkpoint conversion in "
            f"TensorRT-LLM before 0.15 (reported for Llama-3.2-3B and Qwen2.5-1.5B); save an untied "
            f"copy (tie_word_embeddings=false with lm_head.weight = embed_tokens.weight) and build that")
    dtype = (spec.dtype or "auto").strip().lower()
    if dtype == "auto":
        native = str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "")
        dtype = quant.dtype or ("bfloat16" if native == "bfloat16" and sm >= 80 else "float16")
    if dtype == "bfloat16" and sm < 80:
        raise BuildError(f"build: bfloat16 needs SM >= 8.0; this GPU is SM {sm // 10}.{sm % 10}")
    return BuildPlan(quantization=quant, api_line=api_line, dtype=dtype, architecture=architecture,
                     trt_architecture=adapter.TRT_ARCHITECTURES[architecture],
                     max_num_tokens=max_num_tokens_for(spec))


def read_hf_config(model: str) -> Dict[str, Any]:
    """The checkpoint's config.json; BuildError unless ``model`` is a Hugging Face checkpoint dir."""
    path = Path(model).expanduser()
    if path.is_file():
        raise BuildError(f"build: {model!r} is a file; TensorRT-LLM builds from a Hugging Face "
                         f"checkpoint directory (a .gguf model has to be converted first)")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BuildError(f"build: cannot read {path / 'config.json'}: {exc}") from exc
    if not isinstance(config, dict):
        raise BuildError(f"build: {path / 'config.json'} is not a JSON object")
    return config


def _calibration_texts(path: Path) -> List[str]:
    """Samples of a .txt (blank-line separated paragraphs), .json (list of strings or of objects with
    ``text``, or ``{"text": [...]}``) or .jsonl (strings or objects with ``text``) file."""
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".json", ".jsonl"):
        raise BuildError(f"build: calib_dataset {str(path)!r}: expected a directory or a .txt, .json "
                         f"or .jsonl file")
    raw = path.read_text(encoding="utf-8")
    if suffix == ".txt":
        return [p.strip() for p in raw.split("\n\n") if p.strip()]
    if suffix == ".jsonl":
        items = [json.loads(line) for line in raw.splitlines() if line.strip()]
    else:
        data = json.loads(raw)
        items = data.get("text", []) if isinstance(data, dict) else data
    texts = []
    for item in items if isinstance(items, list) else []:
        text = item.get("text") if isinstance(item, dict) else item
        if isinstance(text, str) and text.strip():
            texts.append(text.strip())
    return texts


def prepare_calibration_data(source: str, scratch: Path) -> str:
    """A local dataset directory TensorRT-LLM's calibration loader reads without downloading.

    A directory is used as is (``datasets.load_dataset(dir, split="train")``, column ``text``). A file is
    converted into ``<scratch>/calibration/train.jsonl`` with one ``{"text": ...}`` per sample.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path.resolve())
    try:
        texts = _calibration_texts(path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise BuildError(f"build: cannot read calib_dataset {source!r}: {exc}") from exc
    if not texts:
        raise BuildError(f"build: calib_dataset {source!r} has no text samples")
    out = scratch / "calibration"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return str(out)


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


class TensorRtLlmStep:
    """:class:`~slm_ros.build.spec.BuildStep` for ``tensorrt_llm`` (see the module docstring)."""

    backend = "tensorrt_llm"

    def _api_line(self) -> str:
        reason = adapter.unavailable_reason()
        if reason:
            raise TensorRtLlmUnavailable(f"build: backend tensorrt_llm cannot build here: {reason}")
        return adapter.installed_api_line()

    def plan(self, spec: BuildSpec) -> BuildPlan:
        """Validate ``spec`` for this machine and return what the build will do."""
        check_spec(spec)  # static mistakes first: they hold whatever is installed
        line = self._api_line()
        facts = adapter.device_facts(spec.device)
        return plan_build(spec, line, facts.sm, read_hf_config(spec.model))

    def validate(self, spec: BuildSpec) -> None:
        """Refuse a spec that cannot be built here (BuildError / ConfigError naming the reason)."""
        self.plan(spec)

    def runtime_versions(self) -> Dict[str, str]:
        """TensorRT-LLM (and its API line), TensorRT, ModelOpt, torch and transformers versions."""
        line = self._api_line()
        versions = {"tensorrt_llm": adapter.tensorrt_llm_version(), "tensorrt_llm_api": line}
        for name in ("tensorrt", "nvidia-modelopt", "torch", "transformers"):
            versions[name] = _package_version(name)
        return versions

    def device_info(self, spec: BuildSpec) -> Dict[str, str]:
        """GPU name, compute capability, CUDA, Jetson L4T release and board: an engine only runs on
        the GPU model and software stack it was compiled for."""
        facts = adapter.device_facts(spec.device)
        return {"gpu": facts.gpu, "sm": facts.sm_text, "cuda": facts.cuda, "l4t": facts.l4t,
                "board": facts.board}

    def build(self, spec: BuildSpec, out_dir: Path, progress: ProgressFn,
              cancel: threading.Event) -> Dict[str, Any]:
        """Build the engine into ``out_dir`` and copy the tokenizer files beside it."""
        plan = self.plan(spec)
        out_dir = Path(out_dir)
        hf_dir = str(Path(spec.model).expanduser().resolve())

        def phase(name: str, fraction: float) -> None:
            if cancel.is_set():
                raise BuildCancelled(f"build cancelled before {name}")
            progress(name, fraction)

        phase("plan", 0.0)
        # Scratch (the quantized checkpoint, converted calibration text) beside out_dir rather than in
        # /tmp: it is as large as the model, and /tmp may be RAM-backed on a Jetson.
        with tempfile.TemporaryDirectory(prefix=".tmp-trtllm-scratch-", dir=out_dir.parent) as tmp:
            scratch = Path(tmp)
            calib_dir = ""
            if plan.quantization.needs_calibration:
                calib_dir = prepare_calibration_data(spec.calib_dataset, scratch)
            job = adapter.EngineBuildJob(
                hf_dir=hf_dir, out_dir=str(out_dir),
                checkpoint_dir=str(scratch / "checkpoint"),
                trt_architecture=plan.trt_architecture,
                quant_algo=plan.quantization.quant_algo, dtype=plan.dtype,
                max_batch_size=spec.max_batch_size, max_input_len=spec.max_input_len,
                max_seq_len=spec.max_seq_len, max_num_tokens=plan.max_num_tokens, phase=phase,
                group_size=plan.quantization.group_size,
                smoothquant_val=plan.quantization.smoothquant_val, calib_dir=calib_dir,
                kv_cache_fraction=BUILD_KV_CACHE_FRACTION)
            try:
                facts = adapter.build_engine(job)
            except _LIBRARY_ERRORS as exc:
                raise BuildError(
                    f"build: TensorRT-LLM failed to build {spec.model} ({plan.quantization.name}, "
                    f"{plan.dtype}, {plan.trt_architecture}): {type(exc).__name__}: {exc}") from exc
        phase("save", 0.95)
        copied = adapter.copy_tokenizer_files(hf_dir, str(out_dir))
        if not any(name.startswith("tokenizer") for name in copied):
            raise BuildError(f"build: {spec.model} has no tokenizer files to put beside the engine")
        try:
            info = adapter.read_engine_config(str(out_dir))
        except ModelLoadError as exc:
            raise BuildError(f"build: TensorRT-LLM wrote no usable engine: {exc}") from exc
        return {
            **facts,
            "quantization": plan.quantization.name,
            "quant_algo": plan.quantization.quant_algo or "none",
            "dtype": plan.dtype,
            "architecture": plan.architecture,
            "trt_architecture": plan.trt_architecture,
            "max_batch_size": info.max_batch_size,
            "max_input_len": info.max_input_len,
            "max_seq_len": info.max_seq_len,
            "max_num_tokens": info.max_num_tokens,
            "calibration": Path(spec.calib_dataset).name if calib_dir else "",
            "tokenizer_files": copied,
        }
