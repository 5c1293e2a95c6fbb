"""Backend names → implementations, imported only when asked for."""

from __future__ import annotations

import importlib
from typing import Dict, Tuple

from slm_ros.backends.base import Backend
from slm_ros.core.errors import BackendUnavailable, ConfigError

# (modality, name) -> (module, class). Imported lazily: torch / tensorrt_llm are heavy and may be
# missing on a given machine.
_BACKENDS: Dict[Tuple[str, str], Tuple[str, str]] = {
    ("text", "transformers"): ("slm_ros.backends.transformers_backend", "TransformersBackend"),
    ("text", "tensorrt_llm"): ("slm_ros.backends.tensorrt_llm_backend", "TensorRtLlmBackend"),
    ("vision", "transformers"): ("slm_ros.backends.transformers_vlm_backend",
                                 "TransformersVlmBackend"),
}

MODALITIES = ("text", "vision")


def available_backends(modality: str = "text") -> Tuple[str, ...]:
    """Names accepted by :func:`create_backend` for ``modality`` (text or vision)."""
    return tuple(sorted(name for (kind, name) in _BACKENDS if kind == modality))


def create_backend(name: str, modality: str = "text") -> Backend:
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
