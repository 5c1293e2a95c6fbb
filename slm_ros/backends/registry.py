"""Backend names → implementations, imported only when asked for."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Dict, Tuple

from slm_ros.backends.base import BackendBase
from slm_ros.core.errors import BackendUnavailable, ConfigError

# (modality, name) -> (module, class). Imported lazily: torch / tensorrt_llm are heavy and may be
# missing on a given machine.
_BACKENDS: Dict[Tuple[str, str], Tuple[str, str]] = {
    ("text", "transformers"): ("slm_ros.backends.transformers_backend", "TransformersBackend"),
    ("text", "tensorrt_llm"): ("slm_ros.backends.tensorrt_llm_backend", "TensorRtLlmBackend"),
    ("text", "llama_cpp"): ("slm_ros.backends.llama_cpp_backend", "LlamaCppBackend"),
    ("text", "onnxruntime_genai"): ("slm_ros.backends.onnxruntime_genai_backend",
                                    "OnnxRuntimeGenAiBackend"),
    ("text", "openvino"): ("slm_ros.backends.openvino_backend", "OpenVinoBackend"),
    ("text", "openai"): ("slm_ros.backends.openai_backend", "OpenAiBackend"),
    ("vision", "transformers"): ("slm_ros.backends.transformers_vlm_backend",
                                 "TransformersVlmBackend"),
    ("vision", "openai"): ("slm_ros.backends.openai_backend", "OpenAiBackend"),
}

MODALITIES = ("text", "vision")
#: The ``backend`` value that lets :func:`choose_backend` pick.
AUTO = "auto"


def available_backends(modality: str = "text") -> Tuple[str, ...]:
    """Names accepted by :func:`create_backend` for ``modality`` (text or vision)."""
    return tuple(sorted(name for (kind, name) in _BACKENDS if kind == modality))


def create_backend(name: str, modality: str = "text") -> BackendBase:
    """Instantiate the backend called ``name`` for ``modality`` (not loaded yet).

    Raises :class:`ConfigError` for an unknown name and :class:`BackendUnavailable`, with the missing
    package in the message, when its libraries cannot be imported here.
    """
    if modality not in MODALITIES:
        raise ConfigError(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")
    try:
        module_name, class_name = _BACKENDS[(modality, name)]
    except KeyError:
        raise ConfigError(
            f"unknown {modality} backend {name!r}; available: "
            f"{', '.join(available_backends(modality))}") from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailable(
            f"backend {name!r} cannot run here: {exc} (install its dependencies, see README)") from exc
    return getattr(module, class_name)()


def choose_backend(requested: str, model_spec: str, device: str = "auto",
                   modality: str = "text") -> str:
    """The backend to load ``model_spec`` with when the ``backend`` parameter is ``requested``.

    Any name but ``auto`` is returned unchanged (checked later by :func:`create_backend`). ``auto``
    picks the engine an engine-builder artifact was built for -- ``onnxruntime_genai`` for a
    directory with ``genai_config.json``, ``openvino`` for one with ``openvino_model.xml`` -- and
    otherwise ``llama_cpp`` for a text model that is a GGUF -- ``default`` (the embedded SmolLM2), a
    ``.gguf`` file, or a directory holding one and no ``config.json`` -- when llama-cpp-python is
    installed and the model runs on the CPU (``device`` cpu, or auto on a machine without an NVIDIA
    GPU); everything else gets ``transformers``. On the embedded SmolLM2 on a 2-core CPU (greedy,
    48 new tokens, three runs on a shared machine) llama.cpp decoded 82-121 tokens/s against 9-18
    for transformers, reached the first token in 56-96 ms against 148-342 ms, loaded in 0.3-0.4 s
    against 2.5 s (plus 2.5-3 s importing torch, and a one-time ~40 s conversion of the GGUF), and
    peaked at 258 MB RSS against 925 MB.
    """
    requested = (requested or AUTO).strip()
    if requested != AUTO:
        return requested
    built_for = _artifact_backend(model_spec)
    if modality == "text" and built_for:
        return built_for
    if modality == "text" and _is_gguf_model(model_spec) and _runs_on_cpu(device) \
            and importlib.util.find_spec("llama_cpp") is not None:
        return "llama_cpp"
    return "transformers"


#: A file that marks a directory as another engine's model (built by the engine builder or
#: published in that form) -> the backend that runs it.
_ARTIFACT_MARKERS = (("genai_config.json", "onnxruntime_genai"), ("openvino_model.xml", "openvino"))


def _artifact_backend(spec: str) -> str:
    path = Path((spec or "").strip()).expanduser()
    if not path.is_dir():
        return ""
    for marker, backend in _ARTIFACT_MARKERS:
        if (path / marker).is_file():
            return backend
    return ""


def _is_gguf_model(spec: str) -> bool:
    spec = (spec or "").strip()
    if spec in ("", "default"):
        return True
    path = Path(spec).expanduser()
    if path.is_file():
        return path.suffix.lower() == ".gguf"
    return path.is_dir() and not (path / "config.json").is_file() and \
        len(list(path.glob("*.gguf"))) == 1


def _runs_on_cpu(device: str) -> bool:
    device = (device or "auto").strip().lower()
    if device == "cpu":
        return True
    if device != "auto":
        return False
    torch = sys.modules.get("torch")  # already imported: ask it; never import it just for this
    if torch is not None:
        return not torch.cuda.is_available()
    # NVIDIA driver device nodes (desktop GPUs; Jetson's integrated GPU)
    return not (any(Path("/dev").glob("nvidia[0-9]*")) or Path("/dev/nvhost-ctrl-gpu").exists())
