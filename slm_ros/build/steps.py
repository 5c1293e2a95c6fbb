"""Backend name → build step, imported only when asked for (torch / TensorRT-LLM are heavy)."""

from __future__ import annotations

import importlib
from typing import Dict, Tuple

from slm_ros.build.spec import BuildStep
from slm_ros.core.errors import BackendUnavailable, ConfigError

# backend -> (module, class)
_STEPS: Dict[str, Tuple[str, str]] = {
    "transformers": ("slm_ros.build.transformers_step", "TransformersStep"),
    "tensorrt_llm": ("slm_ros.build.trtllm_step", "TensorRtLlmStep"),
    "llama_cpp": ("slm_ros.build.llama_cpp_step", "LlamaCppStep"),
    "openvino": ("slm_ros.build.openvino_step", "OpenVinoStep"),
    "onnxruntime_genai": ("slm_ros.build.onnxruntime_genai_step", "OnnxRuntimeGenAiStep"),
}


def known_backends() -> Tuple[str, ...]:
    """Backends the builder can build for."""
    return tuple(sorted(_STEPS))


def get_step(backend: str) -> BuildStep:
    """A new build step for ``backend``.

    Raises :class:`ConfigError` for an unknown backend (listing the known ones) and
    :class:`BackendUnavailable`, naming the missing package, when the step cannot be imported here.
    """
    try:
        module_name, class_name = _STEPS[backend]
    except KeyError:
        raise ConfigError(f"no engine build step for backend {backend!r}; known: "
                          f"{', '.join(known_backends())}") from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailable(
            f"cannot build for backend {backend!r} here: {exc} (install its dependencies)") from exc
    cls = getattr(module, class_name, None)
    if cls is None:  # tolerate another class name: the one class declaring this backend
        found = [c for c in vars(module).values() if isinstance(c, type)
                 and getattr(c, "backend", None) == backend and callable(getattr(c, "build", None))]
        if len(found) != 1:
            raise BackendUnavailable(f"{module_name} defines no {class_name} build step")
        cls = found[0]
    return cls()
