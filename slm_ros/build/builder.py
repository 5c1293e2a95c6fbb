"""The engine builder: checkpoint + backend + quantization + limits → a cached, ready-to-load artifact.

ROS-free. One :meth:`Builder.build` call:

1. **check** the checkpoint (config.json, weight files, safetensors headers, GGUF magic) and let the
   backend's step refuse what it cannot build here -- before any expensive work;
2. **hash** the checkpoint's content (file names relative to it + contents; big files' digests are
   remembered in a sidecar keyed by path/size/mtime/inode) and derive the cache key from it, the
   spec, the step's runtime versions and the device;
3. reuse the artifact under that key if its ``manifest.json`` matches this machine, else log why not;
4. **plan** memory (:mod:`slm_ros.build.planner`) and refuse, with the numbers, what cannot fit;
5. take the key's file lock (a second builder of the same key waits, then reuses), build into a
   temporary directory, write the manifest last and **publish** with an atomic rename;
6. evict least-recently-used artifacts if the cache has a size limit.

Logging goes to the ``slm_ros.build`` logger or to an injected one (e.g. a ROS node's logger; only
``info``/``warning``/``debug`` with one preformatted string are used).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from slm_ros.build import cache as cache_mod
from slm_ros.build.cache import CacheLease, EngineCache
from slm_ros.build.device import DeviceProfile, detect_profile
from slm_ros.build.planner import GGUF_FILE_TYPES, MemoryPlan, plan_memory
from slm_ros.build.spec import BuildCancelled, BuildError, BuildSpec, BuildStep, ProgressFn
from slm_ros.build.steps import get_step
from slm_ros.core.errors import SlmError

# Shares of the whole build's progress.
_HASH_END, _STEP_START, _STEP_END = 0.10, 0.12, 0.95


@dataclasses.dataclass(frozen=True)
class BuildResult:
    """Outcome of :meth:`Builder.build` or :meth:`Builder.lookup`.

    ``path`` is where the artifact is (or would be); ``manifest`` is None when nothing usable is
    there (lookup only); ``reason`` says why it was reused or (re)built, for logs and status.
    """

    key: str
    path: Path
    manifest: Optional[Dict[str, Any]]
    cache_hit: bool
    reason: str

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def usable(self) -> bool:
        return self.manifest is not None


# --------------------------------------------------------------------------- checkpoints

@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A model checkpoint that passed the cheap checks: ``kind`` is ``hf`` (directory) or ``gguf``;
    ``config`` is config.json (or what the GGUF header says, in config.json terms)."""

    path: Path
    kind: str
    config: Dict[str, Any]


_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def inspect_checkpoint(model: str) -> Checkpoint:
    """Check that ``model`` is a usable checkpoint without loading it; BuildError names what is wrong."""
    path = Path(model).expanduser()
    if not path.exists():
        raise BuildError(f"model path {model!r} does not exist")
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise BuildError(f"model file {str(path)!r} is not a .gguf file; pass a Hugging Face "
                             f"checkpoint directory or a GGUF file")
        return Checkpoint(path, "gguf", gguf_config(path))
    config_path = path / "config.json"
    if not config_path.is_file():
        raise BuildError(f"model directory {str(path)!r} has no config.json: not a Hugging Face "
                         f"checkpoint")
    config = read_hf_config(path)
    if not config.get("model_type"):
        raise BuildError(f"{config_path} has no model_type field: cannot tell the architecture")
    for weights in _weight_files(path):
        if weights.suffix == ".safetensors":
            check_safetensors(weights)
    return Checkpoint(path, "hf", config)


def read_hf_config(directory: Path) -> Dict[str, Any]:
    """A checkpoint's ``config.json`` as a dict; BuildError naming the file when it cannot be read
    or is not a JSON object."""
    config_path = directory / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BuildError(f"cannot read {config_path}: {exc}") from exc
    if not isinstance(config, dict):
        raise BuildError(f"{config_path} is not a JSON object")
    return config


def _weight_files(directory: Path) -> List[Path]:
    for index_name in _WEIGHT_INDEXES:
        index = directory / index_name
        if not index.is_file():
            continue
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BuildError(f"cannot read the weight index {index}: {exc}") from exc
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise BuildError(f"{directory}: weight shard(s) {', '.join(missing)} listed in "
                             f"{index_name} are missing")
        return [directory / s for s in shards]
    found = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not found:
        raise BuildError(f"model directory {str(directory)!r} has no weights (model.safetensors, "
                         f"a sharded index, or pytorch_model.bin)")
    return found


def check_safetensors(path: Path) -> None:
    """Validate a safetensors file's header against its size (catches truncated or garbage files)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise BuildError(f"corrupt safetensors file {path}: {size} bytes, no header")
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, 100 * 1024 * 1024):
                raise BuildError(f"corrupt safetensors file {path}: header length {length} does "
                                 f"not fit in a {size}-byte file")
            header = json.loads(handle.read(length).decode("utf-8"))
    except OSError as exc:
        raise BuildError(f"cannot read safetensors file {path}: {exc}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise BuildError(f"corrupt safetensors file {path}: header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise BuildError(f"corrupt safetensors file {path}: header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, IndexError, TypeError, ValueError):
            raise BuildError(f"corrupt safetensors file {path}: tensor {name!r} has no "
                             f"data_offsets") from None
    if 8 + length + end != size:
        raise BuildError(f"corrupt safetensors file {path}: tensors end at byte {8 + length + end} "
                         f"but the file has {size} bytes (truncated or damaged)")


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}


def gguf_config(path: Path) -> Dict[str, Any]:
    """The architecture numbers of a GGUF file in config.json terms (for the memory planner).

    Reads only the header (a few ms; the ``gguf`` package's reader takes ~10 s on a 49k-token
    vocabulary here). Raises BuildError when the file is not GGUF.
    """
    meta: Dict[str, Any] = {}
    tensors = set()
    try:
        with open(path, "rb") as f:
            def read(fmt: str):
                size = struct.calcsize(fmt)
                data = f.read(size)
                if len(data) != size:
                    raise BuildError(f"GGUF file {path} is truncated in its header")
                return struct.unpack(fmt, data)[0]

            def string() -> str:
                return f.read(read("<Q")).decode("utf-8", errors="replace")

            def value(kind: int, keep: bool):
                if kind in _GGUF_SCALARS:
                    return read(_GGUF_SCALARS[kind])
                if kind == 8:
                    return string()
                if kind == 9:
                    item, count = read("<I"), read("<Q")
                    if item in _GGUF_SCALARS and not keep:
                        f.seek(count * struct.calcsize(_GGUF_SCALARS[item]), os.SEEK_CUR)
                        return count
                    items = [value(item, keep) for _ in range(count)]
                    return items if keep else count
                raise BuildError(f"GGUF file {path}: unknown metadata value type {kind}")

            if f.read(4) != b"GGUF":
                raise BuildError(f"{path} is not a GGUF file (bad magic)")
            version = read("<I")
            if version < 2:
                raise BuildError(f"{path}: GGUF version {version} is not supported")
            n_tensors, n_kv = read("<Q"), read("<Q")
            for _ in range(n_kv):
                key = string()
                meta[key] = value(read("<I"), keep=not key.startswith("tokenizer."))
            for _ in range(n_tensors):
                tensors.add(string())
                f.seek(read("<I") * 8 + 4 + 8, os.SEEK_CUR)  # dims, type, offset
    except OSError as exc:
        raise BuildError(f"cannot read GGUF file {path}: {exc}") from exc
    arch = str(meta.get("general.architecture", ""))

    def arch_field(name: str) -> Any:
        return meta.get(f"{arch}.{name}")

    config = {
        "model_type": arch,
        "hidden_size": arch_field("embedding_length"),
        "num_hidden_layers": arch_field("block_count"),
        "num_attention_heads": arch_field("attention.head_count"),
        "num_key_value_heads": arch_field("attention.head_count_kv"),
        "intermediate_size": arch_field("feed_forward_length"),
        "head_dim": arch_field("attention.key_length"),
        "vocab_size": arch_field("vocab_size") or meta.get("tokenizer.ggml.tokens"),
        "max_position_embeddings": arch_field("context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
        "_gguf_name": meta.get("general.name", ""),
        "_gguf_file_type": GGUF_FILE_TYPES.get(meta.get("general.file_type")),
    }
    return {k: v for k, v in config.items() if v is not None}


# --------------------------------------------------------------------------- the builder

class _Progress:
    """Never-decreasing progress reports; a missing callback costs nothing."""

    def __init__(self, fn: Optional[ProgressFn]):
        self._fn = fn
        self._last = 0.0
        self._sent: Tuple[str, float] = ("", -1.0)

    def __call__(self, phase: str, fraction: float) -> None:
        self._last = max(self._last, min(1.0, max(0.0, float(fraction))))
        # Reported on a phase change and every 1 %: hashing alone makes one call per MiB.
        if self._fn is not None and (phase != self._sent[0] or self._last >= 1.0 or
                                     self._last - self._sent[1] >= 0.01):
            self._sent = (phase, self._last)
            self._fn(phase, self._last)

    def scaled(self, start: float, end: float) -> ProgressFn:
        return lambda phase, f: self(phase, start + (end - start) * min(1.0, max(0.0, float(f))))


@dataclasses.dataclass
class _Prepared:
    step: BuildStep
    checkpoint: Checkpoint
    key_inputs: Dict[str, Any]
    key: str
    name: str


class Builder:
    """Builds and caches artifacts under ``cache_root`` (default :func:`cache.default_cache_root`).

    ``max_cache_bytes`` > 0 turns on least-recently-used eviction after each build.
    ``step_factory`` maps a backend name to its build step (default :func:`steps.get_step`).
    ``device_profile`` overrides the detected memory profile the plan is checked against;
    ``check_memory=False`` logs the plan without refusing builds that do not fit.
    """

    def __init__(self, cache_root: Optional[os.PathLike] = None, max_cache_bytes: int = 0,
                 logger: Any = None, step_factory: Callable[[str], BuildStep] = get_step,
                 device_profile: Optional[DeviceProfile] = None, check_memory: bool = True,
                 stale_tmp_hours: float = cache_mod.STALE_TMP_SECONDS / 3600):
        self.cache = EngineCache(Path(cache_root) if cache_root else cache_mod.default_cache_root(),
                                 logger)
        self.max_cache_bytes = int(max_cache_bytes)
        self._log = logger or logging.getLogger("slm_ros.build")
        self._step_factory = step_factory
        self._profile = device_profile
        self._check_memory = check_memory
        self._stale_s = stale_tmp_hours * 3600

    @property
    def root(self) -> Path:
        return self.cache.root

    # -- public API

    def lookup(self, spec: BuildSpec, cancel: Optional[threading.Event] = None) -> BuildResult:
        """Key check without building: hashes the checkpoint (fast when the sidecar knows it) and
        says whether a usable artifact exists, and if not why."""
        prepared = self._prepare(spec, _Progress(None), cancel or threading.Event())
        manifest, reason = self._existing(prepared)
        return BuildResult(prepared.key, self.cache.path(prepared.name), manifest,
                           manifest is not None, reason)

    def plan(self, spec: BuildSpec) -> Optional[MemoryPlan]:
        """The memory plan of ``spec`` on this machine (None when the config cannot be planned)."""
        step = self._step_factory(spec.backend)
        return self._plan(spec, inspect_checkpoint(spec.model), step)

    def lease(self, result: BuildResult) -> CacheLease:
        """Hold an artifact against eviction while it is loaded or served; release when done."""
        return self.cache.lease(result.name)

    def clean(self) -> List[Path]:
        """Remove stale temporary build directories now (builds also do it)."""
        return self.cache.clean_stale(self._stale_s)

    def build(self, spec: BuildSpec, progress: Optional[ProgressFn] = None,
              cancel: Optional[threading.Event] = None, force: bool = False) -> BuildResult:
        """Return a usable artifact for ``spec``, building it unless the cache has it.

        Raises :class:`BuildError` (bad checkpoint, unsupported quantization, does not fit, step
        failure) or :class:`BuildCancelled`; nothing is published then.
        """
        report = _Progress(progress)
        cancel = cancel or threading.Event()
        prepared = self._prepare(spec, report, cancel)
        path = self.cache.path(prepared.name)
        self.cache.clean_stale(self._stale_s)
        if force:
            reason = "forced rebuild"
        else:
            manifest, reason = self._existing(prepared)
            if manifest is not None:
                self._log.info(f"engine cache hit: {path} ({_describe(spec)})")
                report("done", 1.0)
                return BuildResult(prepared.key, path, manifest, True, reason)
        self._log.info(f"engine cache miss for {_describe(spec)}: {reason}")

        report("plan", _HASH_END)
        plan = self._plan(spec, prepared.checkpoint, prepared.step)
        if plan is not None and self._check_memory:
            plan.check(build=True)

        lock = self.cache.build_lock(prepared.name)
        lock.acquire(cancel, on_wait=lambda: self._on_wait(prepared.name, report))
        try:
            if not force:  # another process may have built it while we waited
                manifest, _why = self._existing(prepared, quiet=True)
                if manifest is not None:
                    self._log.info(f"{path} was built by another process meanwhile: reusing it")
                    report("done", 1.0)
                    return BuildResult(prepared.key, path, manifest, True,
                                       "built by another process while waiting")
            self.cache.clean_stale(self._stale_s, holding=[prepared.name])
            manifest = self._build_locked(spec, prepared, plan, report, cancel)
        finally:
            lock.release()
        if self.max_cache_bytes > 0:
            self.cache.evict(self.max_cache_bytes, keep=[prepared.name])
        report("done", 1.0)
        return BuildResult(prepared.key, path, manifest, False, reason)

    # -- steps of a build

    def _prepare(self, spec: BuildSpec, report: _Progress, cancel: threading.Event) -> _Prepared:
        step = self._step_factory(spec.backend)
        checkpoint = inspect_checkpoint(spec.model)
        step.validate(spec)
        report("hash", 0.0)
        t0 = time.monotonic()
        digest = self.cache.digest(checkpoint.path,
                                   lambda done, total: report("hash", _HASH_END * done / max(total, 1)),
                                   cancel)
        self._log.debug(f"model digest {digest[:23]}... in {time.monotonic() - t0:.2f} s")
        calibration = ""
        if spec.calib_dataset:  # different calibration data, different quantized weights
            calib = Path(spec.calib_dataset).expanduser()
            if not calib.exists():
                raise BuildError(f"calib_dataset {spec.calib_dataset!r} does not exist")
            calibration = self.cache.digest(calib, None, cancel)
        key_fields = getattr(step, "key_fields", None)
        fields = dict(key_fields(spec) if callable(key_fields) else spec.key_fields())
        fields["backend"] = spec.backend
        key_inputs = {
            "format": cache_mod.FORMAT,
            "model": digest,
            "calibration": calibration,
            "spec": fields,
            "runtime": _strings(step.runtime_versions()),
            "device": _strings(step.device_info(spec)),
        }
        key = cache_mod.cache_key(key_inputs)
        name = cache_mod.artifact_name(spec.backend, spec.quantization, key)
        return _Prepared(step, checkpoint, key_inputs, key, name)

    def _existing(self, prepared: _Prepared,
                  quiet: bool = False) -> Tuple[Optional[Dict[str, Any]], str]:
        """(manifest, reason) of the artifact under the key; manifest None when it is not usable."""
        path = self.cache.path(prepared.name)
        use = self.cache.use_lock(prepared.name)
        use.acquire()  # an evictor holds it exclusively while deleting
        try:
            if not path.is_dir():
                return None, self._other_builds(prepared) or "not built yet"
            manifest, why = cache_mod.read_manifest(path)
            if manifest is not None:
                why = cache_mod.check_manifest(manifest, prepared.key, prepared.key_inputs, path)
            if why:
                if not quiet:
                    self._log.warning(f"cached artifact {path} cannot be reused: {why}")
                return None, why
            self.cache.touch(prepared.name)
            return manifest, "cache hit"
        finally:
            use.release()

    def _other_builds(self, prepared: _Prepared) -> str:
        """Why builds of the same model and spec that exist do not fit this machine, if any."""
        found = []
        for entry in self.cache.entries():
            manifest, _ = cache_mod.read_manifest(entry.path)
            inputs = (manifest or {}).get("key_inputs")
            if not isinstance(inputs, dict) or entry.name == prepared.name:
                continue
            if inputs.get("model") != prepared.key_inputs["model"] or \
                    inputs.get("spec") != prepared.key_inputs["spec"]:
                continue
            diffs = cache_mod.diff_inputs(prepared.key_inputs, inputs)
            if diffs:
                found.append(f"{entry.name} was built for another machine or runtime: "
                             f"{'; '.join(diffs)}")
        return ("manifest mismatch: " + " | ".join(found)) if found else ""

    def _plan(self, spec: BuildSpec, checkpoint: Checkpoint, step: BuildStep) -> Optional[MemoryPlan]:
        if not checkpoint.config:
            self._log.warning(f"no memory plan for {spec.model}: its architecture is unknown")
            return None
        info = step.device_info(spec)
        on_gpu = str(info.get("device", "")).startswith("cuda") or spec.backend == "tensorrt_llm"
        profile = self._profile or detect_profile("cuda" if on_gpu else "cpu")
        try:
            plan = plan_memory(
                checkpoint.config, profile, backend=spec.backend, quantization=spec.quantization,
                dtype=str(info.get("dtype") or spec.dtype), max_input_len=spec.max_input_len,
                max_seq_len=spec.max_seq_len, max_batch_size=spec.max_batch_size, on_gpu=on_gpu,
                source_dtype="gguf" if checkpoint.kind == "gguf" else "",
                name=checkpoint.config.get("_gguf_name") or checkpoint.path.name)
        except BuildError as exc:  # a config or scheme the planner does not know: do not block
            self._log.warning(f"no memory plan for {spec.model}: {exc}")
            return None
        self._log.info(f"memory plan: {plan.summary()}")
        return plan

    def _on_wait(self, name: str, report: _Progress) -> None:
        self._log.info(f"another process is building {name}: waiting for it")
        report("wait", _HASH_END)

    def _build_locked(self, spec: BuildSpec, prepared: _Prepared, plan: Optional[MemoryPlan],
                      report: _Progress, cancel: threading.Event) -> Dict[str, Any]:
        workspace = self.cache.new_workspace(prepared.name)
        tmp = workspace / cache_mod.ARTIFACT_DIR
        t0 = time.monotonic()
        try:
            if cancel.is_set():
                raise BuildCancelled("build cancelled before it started")
            try:
                facts = prepared.step.build(spec, tmp, report.scaled(_STEP_START, _STEP_END),
                                            cancel) or {}
            except SlmError:
                raise
            except (OSError, RuntimeError, ValueError, KeyError, ImportError, MemoryError) as exc:
                raise BuildError(f"building {prepared.name} from {spec.model} failed in the "
                                 f"{spec.backend} step: {type(exc).__name__}: {exc}") from exc
            if cancel.is_set():
                raise BuildCancelled("build cancelled; nothing was published")
            report("publish", _STEP_END)
            files = cache_mod.artifact_files(tmp)
            if not files:
                raise BuildError(f"the {spec.backend} step produced no files for {prepared.name}")
            manifest = {
                "format": cache_mod.FORMAT,
                "key": prepared.key,
                "key_inputs": prepared.key_inputs,
                "name": prepared.name,
                "backend": spec.backend,
                "spec": dataclasses.asdict(spec),
                "source": {"path": str(prepared.checkpoint.path), "kind": prepared.checkpoint.kind},
                "slm_ros_version": _slm_ros_version(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "created_unix": time.time(),
                "build_seconds": round(time.monotonic() - t0, 3),
                "built_by": {"pid": os.getpid(), "host": socket.gethostname()},
                "plan": plan.as_dict() if plan is not None else None,
                "step": json.loads(json.dumps(facts, default=str)),
                "files": files,
                "size_bytes": sum(files.values()),
            }
            cache_mod.write_manifest(tmp, manifest)
            if cancel.is_set():
                raise BuildCancelled("build cancelled; nothing was published")
            path = self.cache.publish(workspace, prepared.name)
        except BaseException:
            shutil.rmtree(workspace, ignore_errors=True)
            raise
        self.cache.touch(prepared.name)
        self._log.info(f"built {path} in {manifest['build_seconds']:.1f} s "
                       f"({manifest['size_bytes'] / 1e6:.1f} MB)")
        return manifest


def _describe(spec: BuildSpec) -> str:
    return (f"{spec.model} [{spec.backend}, quantization {spec.quantization}, dtype {spec.dtype}, "
            f"input {spec.max_input_len}, seq {spec.max_seq_len}, batch {spec.max_batch_size}]")


def _strings(values: Mapping[str, Any]) -> Dict[str, str]:
    return {str(k): str(v) for k, v in sorted(dict(values or {}).items())}


def _slm_ros_version() -> str:
    with contextlib.suppress(ImportError, AttributeError):
        import slm_ros
        return str(slm_ros.__version__)
    return ""
