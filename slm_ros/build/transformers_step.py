"""Build step for the transformers backend: a safetensors checkpoint that loads fast.

The artifact is a plain Hugging Face checkpoint directory -- weights at the chosen dtype as
safetensors, tokenizer files, generation config and chat template -- so the LLM node loads it with
``BackendConfig(model=<artifact dir>)``. What building buys: a GGUF source is dequantized once instead
of on every start (tens of seconds), weights are stored at the dtype the backend will run
(``auto`` resolves like the backend does: float32 on CPUs without native bf16), and the spec, versions
and device are recorded in the manifest.

``int8_dynamic`` (PyTorch dynamic int8 on every ``nn.Linear``, CPU only) cannot be stored as plain
safetensors: its packed weights are not tensors transformers can load. Quantizing at load is cheap,
so the honest artifact is the float32 checkpoint plus ``slm_ros_load.json`` saying
``{"quantize_dynamic": "qint8"}``; :func:`apply_load_options` does the quantization after
``from_pretrained``. A backend that ignores the file still loads a correct float32 model.
Measured with SmolLM2-135M on a 2-core AVX2 CPU (greedy, 64 new tokens): load 1.8 s instead of
0.45 s, decode 26-28 instead of 15-17 tokens/s, time to first token 90 instead of 170 ms (37-token
prompt) and 320 instead of 450 ms (203 tokens). Outputs change: greedy text matched float32 for 64
tokens on one prompt and differed from the first token on another. ``torch.ao.quantization`` is
deprecated in favour of torchao (still present in torch 2.13).
"""

from __future__ import annotations

import gc
import json
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any, Dict

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from slm_ros.backends.transformers_backend import resolve_device, resolve_dtype
from slm_ros.build import device as device_facts
from slm_ros.build.spec import BuildCancelled, BuildError, BuildSpec, ProgressFn
from slm_ros.core.errors import ConfigError

QUANTIZATIONS = ("none", "int8_dynamic")
#: Load-time options of an artifact, read by :func:`apply_load_options`.
LOAD_OPTIONS = "slm_ros_load.json"
# Files some checkpoints carry that save_pretrained may not rewrite; copied when the artifact lacks them.
_EXTRA_FILES = ("chat_template.jinja", "chat_template.json", "generation_config.json",
                "special_tokens_map.json", "tokenizer.model", "added_tokens.json")
_LIMITS = ("max_input_len", "max_seq_len", "max_batch_size")


def _is_gguf(spec: BuildSpec) -> bool:
    return Path(spec.model).suffix.lower() == ".gguf"


def target_dtype(spec: BuildSpec) -> torch.dtype:
    """The dtype the artifact stores: the backend's own resolution of ``spec.dtype``; float32 for
    ``int8_dynamic`` (dynamic quantization takes float32 modules)."""
    device = resolve_device(spec.device)
    if spec.quantization == "int8_dynamic" and (spec.dtype or "auto").strip().lower() == "auto":
        return torch.float32
    return resolve_dtype(spec.dtype, device)


class TransformersStep:
    """:class:`~slm_ros.build.spec.BuildStep` for the ``transformers`` backend."""

    backend = "transformers"

    def validate(self, spec: BuildSpec) -> None:
        if spec.quantization not in QUANTIZATIONS:
            raise BuildError(f"quantization {spec.quantization!r} is not available for the "
                             f"transformers backend; valid: {', '.join(QUANTIZATIONS)} (weight-only "
                             f"int8/int4 and AWQ are tensorrt_llm quantizations)")
        try:
            device = resolve_device(spec.device)
            dtype = target_dtype(spec)
        except ConfigError as exc:
            raise BuildError(f"build: {exc}") from exc
        if spec.quantization == "int8_dynamic":
            if device != "cpu":
                raise BuildError(f"quantization int8_dynamic is a CPU quantization; device "
                                 f"{spec.device!r} resolves to {device}: use device cpu or "
                                 f"quantization none")
            if dtype != torch.float32:
                raise BuildError(f"quantization int8_dynamic needs float32 weights; dtype "
                                 f"{spec.dtype!r} asks for {dtype}: use dtype auto or float32")
            engines = set(torch.backends.quantized.supported_engines) - {"none"}
            if not engines:
                raise BuildError(f"quantization int8_dynamic: this torch build "
                                 f"({torch.__version__}) has no quantized engine")
        if not _is_gguf(spec):
            self._check_architecture(Path(spec.model))

    @staticmethod
    def _check_architecture(path: Path) -> None:
        try:
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
        except (ValueError, KeyError) as exc:
            raise BuildError(f"{path / 'config.json'}: transformers {transformers.__version__} does "
                             f"not know this model_type or architecture: {exc}") from exc
        except OSError as exc:
            raise BuildError(f"cannot read {path / 'config.json'}: {exc}") from exc
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise BuildError(f"{path / 'config.json'}: model_type {config.model_type!r} is not a "
                             f"causal language model transformers can generate with")

    def key_fields(self, spec: BuildSpec) -> Dict[str, Any]:
        """The token limits are applied when the backend loads, not baked into this artifact."""
        fields = spec.key_fields()
        for name in _LIMITS:
            fields.pop(name)
        return fields

    def runtime_versions(self) -> Dict[str, str]:
        import safetensors
        return {"torch": torch.__version__, "transformers": transformers.__version__,
                "safetensors": getattr(safetensors, "__version__", "")}

    def device_info(self, spec: BuildSpec) -> Dict[str, str]:
        device = resolve_device(spec.device)
        info = {"device": "cuda" if device.startswith("cuda") else "cpu",
                "dtype": str(target_dtype(spec)).replace("torch.", ""),
                "machine": device_facts.cpu_info()["machine"], "l4t": device_facts.l4t_release()}
        if device.startswith("cuda"):
            gpu = device_facts.cuda_device(int(device.split(":", 1)[1]) if ":" in device else 0)
            info.update({"gpu": gpu.get("gpu", ""), "sm": gpu.get("sm", "")})
        return info

    def build(self, spec: BuildSpec, out_dir: Path, progress: ProgressFn,
              cancel: threading.Event) -> Dict[str, Any]:
        dtype = target_dtype(spec)
        source = Path(spec.model)
        progress("load", 0.0)
        model, tokenizer = _load(source, dtype)
        try:
            if cancel.is_set():
                raise BuildCancelled("build cancelled after loading the model")
            progress("save", 0.6)
            try:
                model.save_pretrained(str(out_dir))
                tokenizer.save_pretrained(str(out_dir))
            except (OSError, RuntimeError, ValueError) as exc:
                raise BuildError(f"saving the prepared copy of {source} to {out_dir} failed: "
                                 f"{exc}") from exc
            if source.is_dir():
                for name in _EXTRA_FILES:
                    if (source / name).is_file() and not (out_dir / name).exists():
                        shutil.copy2(source / name, out_dir / name)
            facts: Dict[str, Any] = {
                "dtype": str(dtype).replace("torch.", ""),
                "parameters": int(sum(p.numel() for p in model.parameters())),
                "model_type": model.config.model_type,
                "architectures": list(getattr(model.config, "architectures", None) or []),
                "source_format": "gguf" if _is_gguf(spec) else "huggingface",
                "chat_template": _has_chat_template(out_dir, tokenizer),
            }
            if spec.quantization == "int8_dynamic":
                options = {"quantize_dynamic": "qint8", "modules": ["Linear"],
                           "note": "stored float32; apply_load_options() quantizes after loading"}
                (out_dir / LOAD_OPTIONS).write_text(json.dumps(options, indent=2) + "\n")
                facts["load_options"] = options
            progress("save", 1.0)
            return facts
        finally:
            del model
            gc.collect()


def _load(source: Path, dtype: torch.dtype):
    """Tokenizer and model from a checkpoint directory or a GGUF file, at ``dtype``."""
    try:
        if source.suffix.lower() == ".gguf":
            kwargs = {"gguf_file": source.name}
            where = str(source.parent)
        else:
            kwargs, where = {}, str(source)
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, trust_remote_code=False,
                                                     **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        raise BuildError(f"transformers could not load {source}: {type(exc).__name__}: {exc}") from exc
    if kwargs:  # transformers refuses to save a model that still carries its GGUF quantizer
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model, tokenizer


def _has_chat_template(out_dir: Path, tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) or \
        (out_dir / "chat_template.jinja").is_file() or (out_dir / "chat_template.json").is_file()


def load_options(artifact_dir: str) -> Dict[str, Any]:
    """The load-time options of an artifact (``{}`` for plain checkpoints)."""
    path = Path(artifact_dir) / LOAD_OPTIONS
    if not path.is_file():
        return {}
    try:
        options = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BuildError(f"cannot read {path}: {exc}") from exc
    if not isinstance(options, dict):
        raise BuildError(f"{path} is not a JSON object")
    return options


def apply_load_options(model: torch.nn.Module, artifact_dir: str) -> torch.nn.Module:
    """Apply an artifact's load-time options to a model just loaded from it (float32, on CPU).

    For ``int8_dynamic`` artifacts: every ``nn.Linear`` becomes a dynamically quantized int8 linear
    (weights int8, activations quantized per batch on the fly). Returns the model to use.
    """
    options = load_options(artifact_dir)
    if options.get("quantize_dynamic") != "qint8":
        return model
    with warnings.catch_warnings():  # torch.ao.quantization warns that it moves to torchao
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
