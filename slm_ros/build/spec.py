"""What a build is asked to produce, and the contract every per-backend build step implements.

ROS-free. The engine builder (:mod:`slm_ros.build.builder`) hashes a :class:`BuildSpec` together with
the model's content, the step's runtime versions and the device into a cache key, asks the step to
build into a temporary directory, and publishes that directory atomically under the key.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Protocol

from slm_ros.core.errors import ConfigError, SlmError

#: progress(phase, fraction): phase is a short word (hash, plan, wait, load, quantize, compile, save,
#: publish, done); fraction is 0..1 over the whole build, never decreasing. A step's ``build`` gets a
#: ProgressFn too, and reports 0..1 over *its own* work: the builder maps that into the whole build.
ProgressFn = Callable[[str, float], None]


class BuildError(SlmError):
    """A build could not be done (bad checkpoint, unsupported quantization, does not fit, ...)."""


class BuildCancelled(BuildError):
    """The build was cancelled; nothing was published."""


@dataclasses.dataclass(frozen=True)
class BuildSpec:
    """One build request. ``model`` is a resolved local path: a Hugging Face checkpoint directory
    (config.json + weights) or a ``.gguf`` file."""

    model: str
    backend: str = "transformers"
    quantization: str = "none"
    dtype: str = "auto"
    device: str = "auto"
    max_input_len: int = 2048
    max_seq_len: int = 4096
    max_batch_size: int = 1
    #: Local calibration data for AWQ / SmoothQuant (a directory or a text/JSON file); never
    #: downloaded. Empty = refuse quantizations that need calibration.
    calib_dataset: str = ""

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("build: model is empty")
        for name in ("max_input_len", "max_seq_len", "max_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"build: {name} must be an integer >= 1, got {value!r}")
        if self.max_input_len > self.max_seq_len:
            raise ConfigError(f"build: max_input_len ({self.max_input_len}) must be <= max_seq_len "
                              f"({self.max_seq_len})")

    def key_fields(self) -> Dict[str, Any]:
        """The fields that go into the cache key (everything except the model's path, whose
        *content* digest is used instead, and the calibration data path)."""
        fields = dataclasses.asdict(self)
        fields.pop("model")
        fields.pop("calib_dataset")
        return fields


class BuildStep(Protocol):
    """A backend's build step. Implementations live in ``slm_ros/build/<backend>_step.py``.

    Optional hook: a step may define ``key_fields(spec) -> Dict[str, Any]`` returning the subset of
    :meth:`BuildSpec.key_fields` its artifact depends on (the transformers step drops the token
    limits, which it does not bake in); without it every key field counts.
    """

    #: The backend name this step builds for (``transformers``, ``tensorrt_llm``).
    backend: str

    def validate(self, spec: BuildSpec) -> None:
        """Refuse a spec this step cannot build here, before any work (raise BuildError/ConfigError
        naming the field and the reason, e.g. FP8 on an SM 87 GPU)."""

    def runtime_versions(self) -> Dict[str, str]:
        """Versions of the libraries the artifact depends on (they go into the key and manifest)."""

    def device_info(self, spec: BuildSpec) -> Dict[str, str]:
        """The device the artifact is built for (e.g. cpu, or GPU name + SM); key and manifest."""

    def build(self, spec: BuildSpec, out_dir: Path, progress: ProgressFn,
              cancel: threading.Event) -> Dict[str, Any]:
        """Build the artifact into ``out_dir`` (an empty temporary directory). Return extra facts for
        the manifest (JSON-serializable). Check ``cancel`` between phases and raise BuildCancelled
        when it is set. ``progress`` fractions are 0..1 over this step's work. Raise BuildError
        naming the file or field for a bad checkpoint; the builder publishes nothing on any error."""
