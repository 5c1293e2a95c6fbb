"""Backend names → implementations, imported only when asked for."""

from __future__ import annotations

import importlib
from typing import Dict, Tuple

from slm_ros.backends.base import Backend
from slm_ros.core.errors import BackendUnavailable, ConfigError

# name -> (module, class). Imported lazily: torch / tensorrt_llm are heavy and may be missing.
_BACKENDS: Dict[str, Tuple[str, str]] = {
    "transformers": ("slm_ros.backends.transformers_backend", "TransformersBackend"),
}


def available_backends() -> Tuple[str, ...]:
    """Names accepted by :func:`create_backend`."""
    return tuple(sorted(_BACKENDS))


def create_backend(name: str) -> Backend:
    """Instantiate the backend called ``name`` (not loaded yet).

    Raises :class:`ConfigError` for an unknown name and :class:`BackendUnavailable`, with the missing
    package in the message, when its libraries cannot be imported here.
    """
    try:
        module_name, class_name = _BACKENDS[name]
    except KeyError:
        raise ConfigError(
            f"unknown backend {name!r}; available: {', '.join(available_backends())}") from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailable(
            f"backend {name!r} cannot run here: {exc} (install its dependencies, see README)") from exc
    return getattr(module, class_name)()
