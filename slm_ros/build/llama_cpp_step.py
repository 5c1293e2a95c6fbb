"""Build step for the llama_cpp backend: a GGUF file at the requested quantization.

The artifact is a directory holding one ``.gguf`` file; the LLM node loads it with ``backend:
llama_cpp`` (:func:`slm_ros.models.resolve_model` with ``prefer_gguf`` resolves the directory to the
file). The source must be a GGUF file: converting a Hugging Face checkpoint to GGUF needs llama.cpp's
``convert_hf_to_gguf.py``, which llama-cpp-python does not ship.

Quantization names are llama.cpp's file types, lower case: ``none`` (copy the file as it is), ``f32``,
``f16``, ``bf16``, ``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1`` and the k-quants ``q2_k`` ...
``q6_k`` (``q4_k_m`` is llama.cpp's usual choice). The i-quants need an importance matrix and are
not offered. Quantizing a file that is already quantized (the embedded SmolLM2 is Q4_1) works but
cannot bring back what the first quantization lost: ``q8_0`` of a Q4_1 file is larger, not better.
k-quants need rows that are multiples of 256 values; llama.cpp falls back to a legacy type for other
tensors (SmolLM2's 576-wide matrices), and the manifest records how many did.

Measured on the embedded SmolLM2-135M (Q4_1, 97 MB) on a 2-core CPU: q4_0 0.7 s (92 MB), q8_0 1.3 s
(145 MB), f16 1.4 s (271 MB), q4_k_m 2.7 s (105 MB, 181 of 272 tensors fell back).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List

import llama_cpp

from slm_ros.build import device as device_facts
from slm_ros.build.builder import gguf_config
from slm_ros.build.spec import BuildCancelled, BuildError, BuildSpec, ProgressFn

#: Quantization name -> llama.cpp file type constant (looked up in llama_cpp at use).
_FILE_TYPES = {
    "f32": "LLAMA_FTYPE_ALL_F32", "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "bf16": "LLAMA_FTYPE_MOSTLY_BF16", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0", "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K", "q3_k_s": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M", "q3_k_l": "LLAMA_FTYPE_MOSTLY_Q3_K_L",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
QUANTIZATIONS = ("none", *_FILE_TYPES)
# What the step does not bake into the artifact: token limits are set when the backend loads, and a
# GGUF's weight types come from the quantization, not from a dtype.
_UNUSED_FIELDS = ("max_input_len", "max_seq_len", "max_batch_size", "dtype")
# llama.cpp prints one line per tensor that a k-quant could not take; they are counted instead.
_FALLBACK_LINE = re.compile(r"^warning: \S+\s+- .*falling back to")


def normalize(quantization: str) -> str:
    """Canonical quantization name (case-insensitive, ``-`` accepted for ``_``); BuildError lists the
    valid ones."""
    name = (quantization or "none").strip().lower().replace("-", "_")
    if name not in QUANTIZATIONS:
        hint = (" (i-quants need an importance matrix, which this step does not make)"
                if name.startswith("iq") else "")
        raise BuildError(f"quantization {quantization!r} is not available for the llama_cpp "
                         f"backend{hint}; valid: {', '.join(QUANTIZATIONS)}")
    return name


class LlamaCppStep:
    """:class:`~slm_ros.build.spec.BuildStep` for the ``llama_cpp`` backend."""

    backend = "llama_cpp"

    def validate(self, spec: BuildSpec) -> None:
        name = normalize(spec.quantization)
        if name != "none" and not hasattr(llama_cpp, _FILE_TYPES[name]):
            raise BuildError(f"quantization {name!r}: llama-cpp-python {llama_cpp.__version__} "
                             f"has no {_FILE_TYPES[name]}")
        source = Path(spec.model)
        if source.suffix.lower() != ".gguf" or not source.is_file():
            raise BuildError(
                f"the llama_cpp build step needs a GGUF file; {spec.model!r} is not one (convert a "
                f"Hugging Face checkpoint with llama.cpp's convert_hf_to_gguf.py first, or build for "
                f"backend transformers)")

    def key_fields(self, spec: BuildSpec) -> Dict[str, Any]:
        """Only the quantization (and backend, device) shape the file; see ``_UNUSED_FIELDS``."""
        fields = spec.key_fields()
        for name in _UNUSED_FIELDS:
            fields.pop(name)
        fields["quantization"] = normalize(spec.quantization)
        return fields

    def runtime_versions(self) -> Dict[str, str]:
        return {"llama_cpp_python": llama_cpp.__version__}

    def device_info(self, spec: BuildSpec) -> Dict[str, str]:
        # A GGUF file runs on any device llama.cpp supports; nothing device-specific is baked in.
        return {"device": "any", "machine": device_facts.cpu_info()["machine"]}

    def build(self, spec: BuildSpec, out_dir: Path, progress: ProgressFn,
              cancel: threading.Event) -> Dict[str, Any]:
        name = normalize(spec.quantization)
        source = Path(spec.model)
        source_type = _file_type(source)
        target = out_dir / (source.name if name == "none" else f"{source.stem}-{name}.gguf")
        out_dir.mkdir(parents=True, exist_ok=True)
        if cancel.is_set():
            raise BuildCancelled("build cancelled before quantizing")
        progress("quantize", 0.0)
        fallbacks = 0
        if name == "none":
            shutil.copyfile(source, target)
        else:
            fallbacks = _quantize(source, target, getattr(llama_cpp, _FILE_TYPES[name]))
        if cancel.is_set():
            raise BuildCancelled("build cancelled after quantizing")
        progress("save", 0.9)
        config = gguf_config(target)  # the result must at least be a readable GGUF
        facts: Dict[str, Any] = {
            "file": target.name, "quantization": name, "source_file_type": source_type,
            "file_type": _file_type(target), "size_bytes": target.stat().st_size,
            "architecture": config.get("model_type", ""),
            "context_length": config.get("max_position_embeddings", 0),
        }
        if fallbacks:
            facts["fallback_tensors"] = fallbacks
        progress("save", 1.0)
        return facts


def _file_type(path: Path) -> str:
    """The ``general.file_type`` of a GGUF as a quantization name, read by llama.cpp itself
    (vocabulary only, no weights): a file it cannot open raises BuildError."""
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    _quiet()
    with _stderr_filtered():
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise BuildError(f"llama.cpp cannot open {path} as a GGUF model")
    try:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_model_meta_val_str(model, b"general.file_type", buf, len(buf))
        value = int(buf.value) if n > 0 and buf.value.isdigit() else None
    finally:
        llama_cpp.llama_model_free(model)
    if value is None:
        return "unknown"
    for key, const in _FILE_TYPES.items():
        if getattr(llama_cpp, const, None) == value:
            return key
    return str(value)


def _quantize(source: Path, target: Path, file_type: int) -> int:
    """Run llama.cpp's quantizer; return how many tensors fell back to another type."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type
    params.allow_requantize = True   # sources are often quantized already (the embedded model is)
    params.nthread = 0               # 0 = all hardware threads
    _quiet()
    with _stderr_filtered() as lines:
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(),
                                            ctypes.byref(params))
    if rc != 0:
        detail = "; ".join(line for line in lines if "error" in line.lower())[-500:]
        raise BuildError(f"llama.cpp could not quantize {source} to {target.name} (code {rc})"
                         + (f": {detail}" if detail else ""))
    return sum(1 for line in lines if _FALLBACK_LINE.match(line))


def _quiet() -> None:
    """llama-cpp-python forwards llama.cpp's log lines to stderr when its logger's level allows
    (everything until a ``Llama`` is created with ``verbose=False``): keep errors only."""
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)


@contextlib.contextmanager
def _stderr_filtered() -> Iterator[List[str]]:
    """Capture what C code writes to stderr (fd 2) meanwhile; afterwards write it back without
    llama.cpp's per-tensor fallback lines. Yields the list the captured lines land in."""
    lines: List[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines.extend(capture.read().decode("utf-8", errors="replace").splitlines())
            kept = [line for line in lines if not _FALLBACK_LINE.match(line)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()
