"""Build step for the onnxruntime_genai backend: a Hugging Face checkpoint → an ONNX Runtime GenAI
model folder, made by the library's own model builder (``onnxruntime_genai.models.builder``).

The artifact is the folder the model builder writes -- ``genai_config.json``, ``model.onnx`` with
its external data, tokenizer files and chat template -- plus the checkpoint's ``config.json`` and
``generation_config.json`` (so the folder is recognised as a model and planned like its source);
the LLM node loads it with ``backend: onnxruntime_genai``.

Quantization names are the model builder's precisions: ``int4`` and ``int8`` (weight-only
MatMulNBits, symmetric, block size :data:`BLOCK_SIZE`, round-to-nearest; on the CPU the int4
matmuls run with int8 activations, the builder's default accuracy level 4), ``fp16`` and ``bf16``
(CUDA only) and ``fp32``. ``none`` means no quantization: ``fp32``, or ``fp16`` / ``bf16`` when
``dtype`` says float16 / bfloat16. The execution provider comes from ``device``: ``cpu``, ``cuda``
/ ``cuda:N`` (the graph is built for the provider: a CUDA build uses CUDA-only operators), ``auto``
= cuda when the installed onnxruntime-genai has CUDA support, else cpu. The model builder supports
the combinations FP32/INT8/INT4 on the CPU and FP32/FP16/BF16/INT8/INT4 on CUDA; others are
refused before any work. Token limits are not baked in (the builder writes the model's trained
context; the backend bounds each request's KV cache), so they are not part of the cache key.

The model builder runs in a subprocess (``python -m onnxruntime_genai.models.builder``, offline:
``HF_HUB_OFFLINE=1`` and ``hf_token=false``): progress is read from its output, and a cancel kills
it. Architectures are checked before building against the ones the installed model builder names
(``LlamaForCausalLM``, ``Phi3ForCausalLM``, ``Qwen2ForCausalLM``, ``Gemma2ForCausalLM``, ...).

Measured on the embedded SmolLM2-135M-Instruct (float32 safetensors, 538 MB) on a 2-core CPU: int4
in 9-10 s in the model builder, 12-19 s for the whole cold build with hashing (load average 1-4),
an 86 MB artifact (int4 matmuls and the tied embedding/LM head, float32 scales: about 5 bits per
weight); the model builder peaks at 1.8 GB RSS. A cache hit costs the checkpoint hash check only
(milliseconds once the digest sidecar exists; 1.8 s for ``slm-ros build`` including its start).

Multimodal folders (Phi-3.5-vision) are not made here: this model builder exports the text decoder
of vision-language architectures only; the vision encoder and embedding models come from separate
export scripts.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

from slm_ros.build import device as device_facts
from slm_ros.build.builder import read_hf_config
from slm_ros.build.spec import BuildCancelled, BuildError, BuildSpec, ProgressFn

#: Block size of the int4 / int8 weight quantization (values sharing one scale): the builder's
#: default, the layout Microsoft's published ``*-int4-rtn-block-32`` folders use.
BLOCK_SIZE = 32
PRECISIONS = ("int4", "int8", "fp16", "bf16", "fp32")
QUANTIZATIONS = ("none", *PRECISIONS)
#: Precisions the model builder offers per execution provider.
_VALID = {"cpu": ("fp32", "int8", "int4"), "cuda": ("fp32", "fp16", "bf16", "int8", "int4")}
_NONE_DTYPES = {"auto": "fp32", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
_UNUSED_FIELDS = ("max_input_len", "max_seq_len", "max_batch_size", "dtype")
_EXTRA_FILES = ("config.json", "generation_config.json")
#: The model builder's output lines that mark its phases: (pattern, phase, fraction of the step).
_MARKS = (
    (re.compile(r"^Reading layer (\d+)"), "load", None),
    (re.compile(r"^Reading (final norm|LM head)"), "load", 0.45),
    (re.compile(r"^Saving ONNX model"), "compile", 0.5),
    (re.compile(r"^Saving GenAI config"), "save", 0.9),
    (re.compile(r"^Saving processing files"), "save", 0.95),
)
_ARCH_PATTERN = re.compile(r"""architectures\[0\]\s*==\s*["'](\w+)["']""")
#: Speech models the model builder also exports: not language models the LLM node can serve.
_NOT_TEXT = ("WhisperForConditionalGeneration", "Lfm2AudioForConditionalGeneration")


def _version(*names: str) -> str:
    """Installed version of the first of ``names`` (PyPI distributions) that is present."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""


def normalize(quantization: str) -> str:
    """Canonical quantization name; BuildError lists the valid ones."""
    name = (quantization or "none").strip().lower().replace("-", "_")
    if name not in QUANTIZATIONS:
        raise BuildError(f"quantization {quantization!r} is not available for the "
                         f"onnxruntime_genai backend; valid: {', '.join(QUANTIZATIONS)}")
    return name


def precision(spec: BuildSpec) -> str:
    """The model builder's ``--precision`` for ``spec`` (see the module docstring)."""
    name = normalize(spec.quantization)
    dtype = (spec.dtype or "auto").strip().lower()
    if name == "none":
        if dtype not in _NONE_DTYPES:
            raise BuildError(f"dtype {spec.dtype!r} is not available for the onnxruntime_genai "
                             f"backend; valid: {', '.join(_NONE_DTYPES)}")
        return _NONE_DTYPES[dtype]
    if dtype not in ("auto", ""):
        raise BuildError(f"dtype {spec.dtype!r} with quantization {name}: for the "
                         f"onnxruntime_genai backend the quantization names the precision; leave "
                         f"dtype auto")
    return name


def _cuda_available() -> bool:
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return False
    import onnxruntime_genai as og
    return bool(og.is_cuda_available())


def execution_provider(spec: BuildSpec) -> str:
    """``cpu`` or ``cuda`` for ``spec.device``."""
    device = (spec.device or "auto").strip().lower()
    if device == "auto":
        return "cuda" if _cuda_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda" or re.fullmatch(r"cuda:\d+", device):
        return "cuda"
    raise BuildError(f"device must be auto, cpu, cuda or cuda:N for the onnxruntime_genai build, "
                     f"got {spec.device!r}")


def supported_architectures() -> List[str]:
    """The architectures (config.json ``architectures[0]``) the installed model builder dispatches
    on, read from its source; empty when it cannot be read (the builder then decides)."""
    found = importlib.util.find_spec("onnxruntime_genai.models.builder")
    if found is None or not found.origin:
        return []
    try:
        text = Path(found.origin).read_text(encoding="utf-8")
    except OSError:
        return []
    return sorted(set(_ARCH_PATTERN.findall(text)) - set(_NOT_TEXT))


def check_architecture(path: Path) -> Dict[str, Any]:
    """Refuse a checkpoint whose model_type transformers does not know or whose architecture the
    model builder cannot export; returns config.json."""
    config = read_hf_config(path)
    config_path = path / "config.json"
    model_type = config.get("model_type")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    if model_type not in CONFIG_MAPPING_NAMES:
        raise BuildError(f"{config_path}: model_type {model_type!r} is not a model type "
                         f"transformers {_version('transformers')} knows, so the onnxruntime_genai "
                         f"model builder cannot read this checkpoint")
    architectures = config.get("architectures") or []
    if not architectures:
        raise BuildError(f"{config_path} has no architectures field: the onnxruntime_genai model "
                         f"builder chooses its exporter by architecture")
    supported = supported_architectures()
    if supported and architectures[0] not in supported:
        version = _version("onnxruntime-genai", "onnxruntime-genai-cuda")
        raise BuildError(f"{config_path}: architecture {architectures[0]!r} is not supported by "
                         f"the model builder of onnxruntime-genai {version}; supported: "
                         f"{', '.join(supported)}")
    return config


def _count_parameters(path: Path) -> int:
    """Number of weights in the checkpoint's safetensors files (headers only; 0 if none)."""
    total = 0
    for weights in sorted(path.glob("*.safetensors")):
        try:
            with open(weights, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
        except (OSError, ValueError):
            return 0
        for name, entry in header.items():
            if name != "__metadata__" and isinstance(entry, dict):
                count = 1
                for dim in entry.get("shape", []):
                    count *= int(dim)
                total += count
    return total


class OnnxRuntimeGenAiStep:
    """:class:`~slm_ros.build.spec.BuildStep` for the ``onnxruntime_genai`` backend."""

    backend = "onnxruntime_genai"

    def validate(self, spec: BuildSpec) -> None:
        target = precision(spec)
        provider = execution_provider(spec)
        if target not in _VALID[provider]:
            raise BuildError(f"quantization {spec.quantization!r} (precision {target}) is not "
                             f"available on the {provider} execution provider; valid there: "
                             f"{', '.join(_VALID[provider])}")
        if provider == "cuda" and not _cuda_available():
            raise BuildError(f"device {spec.device!r}: this onnxruntime-genai has no CUDA support "
                             f"(install onnxruntime-genai-cuda), use device cpu")
        if importlib.util.find_spec("onnxruntime_genai") is None:
            raise BuildError("the onnxruntime_genai build needs `pip install "
                             "onnxruntime-genai==0.18.0 onnx onnx_ir`")
        source = Path(spec.model).expanduser()
        if not source.is_dir():
            raise BuildError(f"the onnxruntime_genai build step needs a Hugging Face checkpoint "
                             f"directory; {spec.model!r} is not one (a GGUF file can be "
                             f"prepared as a checkpoint first: the LLM node does it for model "
                             f"files)")
        check_architecture(source)

    def key_fields(self, spec: BuildSpec) -> Dict[str, Any]:
        """The precision (and backend, device) shape the folder; see ``_UNUSED_FIELDS``."""
        fields = spec.key_fields()
        for name in _UNUSED_FIELDS:
            fields.pop(name)
        fields["quantization"] = precision(spec)
        return fields

    def runtime_versions(self) -> Dict[str, str]:
        return {"onnxruntime_genai": _version("onnxruntime-genai", "onnxruntime-genai-cuda"),
                "onnxruntime": _version("onnxruntime", "onnxruntime-gpu"),
                "onnx": _version("onnx"), "onnx_ir": _version("onnx-ir", "onnx_ir"),
                # The model builder reads the checkpoint with them.
                "transformers": _version("transformers"), "torch": _version("torch")}

    def device_info(self, spec: BuildSpec) -> Dict[str, str]:
        provider = execution_provider(spec)
        info = {"device": provider, "dtype": precision(spec),
                "machine": device_facts.cpu_info()["machine"], "l4t": device_facts.l4t_release()}
        if provider == "cuda":
            device = (spec.device or "").strip().lower()
            gpu = device_facts.cuda_device(int(device.split(":", 1)[1]) if ":" in device else 0)
            info.update({"gpu": gpu.get("gpu", ""), "sm": gpu.get("sm", "")})
        return info

    def build(self, spec: BuildSpec, out_dir: Path, progress: ProgressFn,
              cancel: threading.Event) -> Dict[str, Any]:
        target = precision(spec)
        provider = execution_provider(spec)
        source = Path(spec.model).expanduser().resolve()
        config = check_architecture(source)
        out_dir.mkdir(parents=True, exist_ok=True)
        scratch = out_dir.parent / "ort_genai_scratch"   # the workspace; never published
        scratch.mkdir(exist_ok=True)
        extra = ["hf_token=false"]
        if target in ("int4", "int8"):
            extra.append(f"block_size={BLOCK_SIZE}")
        cmd = [sys.executable, "-u", "-m", "onnxruntime_genai.models.builder", "-i", str(source),
               "-o", str(out_dir), "-p", target, "-e", provider, "-c", str(scratch),
               "--extra_options", *extra]
        progress("load", 0.0)
        t0 = time.monotonic()
        try:
            _run_builder(cmd, int(config.get("num_hidden_layers") or 0), target, progress, cancel)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        seconds = time.monotonic() - t0
        progress("save", 0.97)
        genai_path = out_dir / "genai_config.json"
        try:
            genai = json.loads(genai_path.read_text(encoding="utf-8"))["model"]
            onnx_file = out_dir / genai["decoder"]["filename"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BuildError(f"the onnxruntime_genai model builder finished but {genai_path} is "
                             f"missing or unreadable: {exc}") from exc
        if not onnx_file.is_file():
            raise BuildError(f"the onnxruntime_genai model builder wrote no {onnx_file.name}")
        for name in _EXTRA_FILES:
            if (source / name).is_file() and not (out_dir / name).exists():
                shutil.copy2(source / name, out_dir / name)
        facts: Dict[str, Any] = {
            "precision": target, "execution_provider": provider,
            "block_size": BLOCK_SIZE if target in ("int4", "int8") else 0,
            "model_type": genai.get("type", config.get("model_type", "")),
            "architectures": list(config.get("architectures") or []),
            "parameters": _count_parameters(source),
            "context_length": int(genai.get("context_length") or 0),
            "vocab_size": int(genai.get("vocab_size") or 0),
            "builder_seconds": round(seconds, 2),
            "size_bytes": sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file()),
        }
        progress("save", 1.0)
        return facts


def _run_builder(cmd: List[str], layers: int, target: str, progress: ProgressFn,
                 cancel: threading.Event) -> None:
    """Run the model builder, reporting its phases; kill it on cancel; BuildError on failure."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, text=True, errors="replace")
    except OSError as exc:
        raise BuildError(f"cannot start the onnxruntime_genai model builder: {exc}") from exc
    lines: "queue.Queue[Optional[str]]" = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            # Progress bars redraw with carriage returns: keep what follows the last one.
            lines.put(line.rstrip("\n").split("\r")[-1])
        lines.put(None)

    reader = threading.Thread(target=read, name="slm-ort-genai-builder-output", daemon=True)
    reader.start()
    tail: List[str] = []
    compile_phase = "quantize" if target in ("int4", "int8") else "compile"
    finished = False
    try:
        while not finished:
            if cancel.is_set():
                raise BuildCancelled("build cancelled: the onnxruntime_genai model builder was "
                                     "stopped")
            try:
                line = lines.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None:
                finished = True
                continue
            if line.strip():
                tail = (tail + [line])[-20:]
            for pattern, phase, fraction in _MARKS:
                match = pattern.match(line)
                if not match:
                    continue
                if fraction is None:   # a decoder layer read: 0 .. 0.45 over the layers
                    fraction = 0.45 * (int(match.group(1)) + 1) / max(layers, 1)
                progress(compile_phase if phase == "compile" else phase, min(fraction, 0.45)
                         if phase == "load" else fraction)
                break
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(timeout=5)
    if rc != 0:
        # The error is usually the last line (a Python exception); INFO lines are noise.
        useful = [t for t in tail if "[INFO]" not in t and "it/s]" not in t][-6:]
        raise BuildError(f"the onnxruntime_genai model builder failed (exit code {rc}): "
                         f"{' | '.join(useful) or 'no output'}")
