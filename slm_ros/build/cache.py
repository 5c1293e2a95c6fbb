"""The on-disk engine cache: model digests, keys, manifests, locks, atomic publish and LRU eviction.

Layout under the cache root (default ``$SLM_ROS_CACHE/engines``, see :func:`default_cache_root`)::

    <backend>-<quantization>-<key[:16]>/   a published artifact; manifest.json inside, written last
        manifest.json  .last_used          (.last_used: mtime = last reuse, for LRU eviction)
    .tmp-<name>.<random>/                  a build in progress: .owner.json (pid, host, start time),
        artifact/                          the step's out_dir, renamed to <name>/ when complete
        (anything else)                    the step's scratch space beside out_dir, deleted with it
    .trash-<name>.<random>/                an artifact being deleted (replaced or evicted)
    .locks/<name>.lock                     held (exclusive) while <name> is being built
    .locks/<name>.use                      held (shared) by processes using <name>; blocks eviction
    .digests.json                          sidecar: file digests by (path, size, mtime, inode)

Everything that publishes or deletes an artifact renames a whole directory, so a reader sees either a
complete artifact or none; a process killed at any moment leaves at worst a ``.tmp-``/``.trash-``
directory, which the next run removes. Lock files are never deleted (deleting a file others may hold
a lock on would let two processes "hold" it at once); they are empty.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from slm_ros.build.spec import BuildCancelled, BuildError

MANIFEST = "manifest.json"
#: Bumped when the manifest or key layout changes; older artifacts are then rebuilt.
FORMAT = 1
STAMP = ".last_used"
OWNER = ".owner.json"
LOCKS = ".locks"
DIGESTS = ".digests.json"
TMP_PREFIX = ".tmp-"
#: Inside a build workspace: the directory the step builds into and that gets published.
ARTIFACT_DIR = "artifact"
TRASH_PREFIX = ".trash-"
#: A temporary build directory older than this is removed even if its owner looks alive.
STALE_TMP_SECONDS = 24 * 3600.0
#: Files smaller than this are rehashed every time (cheaper than a sidecar entry).
SIDECAR_MIN_BYTES = 1 << 20
_SIDECAR_MAX_ENTRIES = 4096
_CHUNK = 1 << 20

#: Files of a checkpoint directory that do not count for its digest: the marker
#: :mod:`slm_ros.models` writes into prepared copies (it holds a timestamp and the source path).
IGNORED_FILES = frozenset({"slm_ros_prepared.json"})


def default_cache_root() -> Path:
    """``<slm_ros cache>/engines`` (the slm_ros cache honours ``$SLM_ROS_CACHE``)."""
    from slm_ros.models import cache_root
    return cache_root() / "engines"


# --------------------------------------------------------------------------- model content digest

def model_files(model: Path) -> List[Tuple[str, Path]]:
    """``(name, path)`` of every file that makes up a checkpoint, sorted by name.

    A directory contributes its regular files (symlinks followed, as in Hugging Face snapshot dirs)
    by path relative to it; hidden files and directories (``.git``, ``.cache/huggingface``) and
    :data:`IGNORED_FILES` are skipped. A single file (GGUF) contributes itself under the name ``""``,
    so renaming it does not change the digest either.
    """
    if model.is_file():
        return [("", model)]
    if not model.is_dir():
        raise BuildError(f"model path {str(model)!r} does not exist")
    found = []
    for here, dirs, files in os.walk(model):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith(".") or name in IGNORED_FILES:
                continue
            path = Path(here) / name
            if path.is_file():
                found.append((path.relative_to(model).as_posix(), path))
    if not found:
        raise BuildError(f"model directory {str(model)!r} contains no files")
    return sorted(found)


class DigestSidecar:
    """File digests remembered by ``(resolved path, size, mtime_ns, inode)`` in a small JSON file,
    so a relaunch does not rehash hundreds of MB. Like ``make`` and ``rsync``, a file rewritten with
    the same size and its old mtime restored would be missed; any real write changes the mtime."""

    def __init__(self, path: Optional[Path]):
        self._path = path
        self._entries: Dict[str, list] = {}
        self._dirty: Dict[str, list] = {}
        if path is not None:
            try:
                data = json.loads(path.read_text())
                if isinstance(data, dict):
                    self._entries = data
            except (OSError, ValueError):
                pass  # missing or damaged sidecar: rehash

    @staticmethod
    def _identity(path: Path) -> Tuple[str, list]:
        st = path.stat()
        return str(path.resolve()), [st.st_size, st.st_mtime_ns, st.st_ino]

    def get(self, path: Path) -> Tuple[Optional[str], list]:
        """(remembered digest or None, the file's identity now: pass it to :meth:`put`)."""
        name, ident = self._identity(path)
        entry = self._entries.get(name)
        if isinstance(entry, list) and len(entry) == 4 and entry[:3] == ident:
            return str(entry[3]), ident
        return None, ident

    def put(self, path: Path, digest: str, ident_before: list) -> None:
        """Remember ``digest`` unless the file changed while it was being hashed."""
        name, ident = self._identity(path)
        if ident[0] >= SIDECAR_MIN_BYTES and ident == ident_before:
            self._dirty[name] = ident + [digest]

    def save(self) -> None:
        """Merge new entries into the sidecar file (under a lock, atomically)."""
        if self._path is None or not self._dirty:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(self._path.with_name(self._path.name + ".lock")).hold():
            try:
                current = json.loads(self._path.read_text())
                current = current if isinstance(current, dict) else {}
            except (OSError, ValueError):
                current = {}
            current.update(self._dirty)
            if len(current) > _SIDECAR_MAX_ENTRIES:  # forget entries of files that are gone
                current = {k: v for k, v in current.items() if os.path.exists(k)}
                while len(current) > _SIDECAR_MAX_ENTRIES:
                    current.pop(next(iter(current)))
            _atomic_write(self._path, json.dumps(current))
        self._dirty.clear()


def content_digest(model: Path, sidecar: Optional[Path] = None,
                   progress: Optional[Callable[[int, int], None]] = None,
                   cancel: Optional[threading.Event] = None) -> str:
    """SHA-256 over the checkpoint's file names (relative) and contents: ``sha256:<hex>``.

    ``progress(done_bytes, total_bytes)`` is called as files are read; ``cancel`` is checked per MiB.
    """
    files = model_files(model)
    cache = DigestSidecar(sidecar)
    total = sum(p.stat().st_size for _, p in files)
    done = 0
    outer = hashlib.sha256(b"slm_ros model digest v1\n")
    for name, path in files:
        digest, ident = cache.get(path)
        if digest is None:
            inner = hashlib.sha256()
            try:
                with open(path, "rb") as handle:
                    while True:
                        if cancel is not None and cancel.is_set():
                            raise BuildCancelled("build cancelled while hashing the model")
                        chunk = handle.read(_CHUNK)
                        if not chunk:
                            break
                        inner.update(chunk)
                        done += len(chunk)
                        if progress:
                            progress(done, total)
            except OSError as exc:
                raise BuildError(f"cannot read model file {path}: {exc}") from exc
            digest = inner.hexdigest()
            cache.put(path, digest, ident)
        else:
            done += ident[0]
            if progress:
                progress(done, total)
        outer.update(f"{name}\0{digest}\n".encode())
    try:
        cache.save()
    except OSError as exc:  # a read-only cache only costs a rehash next time
        logging.getLogger(__name__).debug("digest sidecar not saved: %s", exc)
    return "sha256:" + outer.hexdigest()


# --------------------------------------------------------------------------- keys and manifests

def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def cache_key(key_inputs: Mapping[str, Any]) -> str:
    """SHA-256 hex of the canonical JSON of everything the artifact depends on."""
    return hashlib.sha256(canonical_json(key_inputs).encode()).hexdigest()


_NAME = re.compile(r"^[a-z0-9_.]+-[a-z0-9_.]+-[0-9a-f]{16}$")


def artifact_name(backend: str, quantization: str, key: str) -> str:
    """Directory name of an artifact: readable prefix + the first 16 hex digits of the key."""
    def clean(text: str) -> str:
        return "".join(c if (c.isascii() and c.isalnum()) or c in "_." else "_"
                       for c in text.lower()) or "none"
    return f"{clean(backend)}-{clean(quantization)}-{key[:16]}"


def diff_inputs(expected: Any, found: Any, prefix: str = "") -> List[str]:
    """Human differences between two key-input trees, e.g. ``runtime.tensorrt 10.3 != 10.4``
    (found first: what the cached artifact was built with, then what this machine has)."""
    if isinstance(expected, Mapping) and isinstance(found, Mapping):
        out = []
        for k in sorted(set(expected) | set(found), key=str):
            where = f"{prefix}.{k}" if prefix else str(k)
            if k not in found:
                out.append(f"{where} missing in the manifest")
            elif k not in expected:
                out.append(f"{where} {found[k]!r} not expected")
            else:
                out.extend(diff_inputs(expected[k], found[k], where))
        return out
    if expected != found:
        return [f"{prefix or 'value'} {_show(found)} != {_show(expected)}"]
    return []


def _show(value: Any) -> str:
    return value if isinstance(value, str) and value else repr(value)


def read_manifest(artifact: Path) -> Tuple[Optional[Dict[str, Any]], str]:
    """``(manifest, "")``, or ``(None, why)`` when it is missing, unreadable or not an object."""
    path = artifact / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, f"no {MANIFEST} in {artifact.name} (incomplete artifact)"
    except OSError as exc:
        return None, f"cannot read {path}: {exc}"
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        return None, f"corrupt {MANIFEST} in {artifact.name}: {exc}"
    if not isinstance(manifest, dict):
        return None, f"corrupt {MANIFEST} in {artifact.name}: not a JSON object"
    return manifest, ""


def check_manifest(manifest: Mapping[str, Any], key: str, key_inputs: Mapping[str, Any],
                   artifact: Path) -> str:
    """Why the artifact cannot be reused on this machine, or ``""`` when it can."""
    if manifest.get("format") != FORMAT:
        return f"manifest format {manifest.get('format')!r} != {FORMAT}"
    found = manifest.get("key_inputs")
    if not isinstance(found, Mapping):
        return "manifest has no key_inputs (incomplete)"
    differences = diff_inputs(dict(key_inputs), dict(found))
    if differences:
        return "manifest mismatch: " + "; ".join(differences)
    if manifest.get("key") != key:
        return f"manifest key {str(manifest.get('key'))[:16]}... != {key[:16]}..."
    files = manifest.get("files")
    if not isinstance(files, Mapping) or not files:
        return "manifest lists no files (incomplete)"
    for name, size in files.items():
        path = artifact / name
        try:
            actual = path.stat().st_size
        except OSError:
            return f"artifact file {name} is missing"
        if actual != size:
            return f"artifact file {name} has {actual} bytes, manifest says {size}"
    return ""


def artifact_files(directory: Path) -> Dict[str, int]:
    """``{relative path: size}`` of the files of a built artifact (hidden files excluded)."""
    out = {}
    for here, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith(".") or name == MANIFEST:
                continue
            path = Path(here) / name
            out[path.relative_to(directory).as_posix()] = path.stat().st_size
    return dict(sorted(out.items()))


def write_manifest(directory: Path, manifest: Mapping[str, Any]) -> None:
    """Flush every artifact file to disk, then write the manifest (last, also flushed): after a
    power cut a manifest never describes files whose data did not reach the disk."""
    for here, _dirs, files in os.walk(directory):
        for name in files:
            _fsync_file(Path(here) / name)
    _atomic_write(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    _fsync_dir(directory)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- locks

class FileLock:
    """An ``fcntl.flock`` on a file (released by the kernel when the process dies).

    ``optional`` locks count as taken when the lock file cannot be created at all (a read-only
    cache baked into an image): nobody can build or evict there either.
    """

    def __init__(self, path: Path, shared: bool = False, optional: bool = False):
        self.path = path
        self._mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        self._optional = optional
        self._handle = None

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it in a conflicting mode; never waits."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+")
        except OSError as exc:
            if self._optional and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                return True
            raise
        try:
            fcntl.flock(handle, self._mode | fcntl.LOCK_NB)
        except OSError as exc:
            handle.close()
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        self._handle = handle
        return True

    def acquire(self, cancel: Optional[threading.Event] = None, poll_s: float = 0.2,
                on_wait: Optional[Callable[[], None]] = None) -> None:
        """Wait for the lock, polling so that ``cancel`` is honoured (BuildCancelled)."""
        waited = False
        while not self.try_acquire():
            if not waited and on_wait is not None:
                on_wait()
            waited = True
            if cancel is not None and cancel.wait(poll_s):
                raise BuildCancelled(f"build cancelled while waiting for {self.path.name}")
            if cancel is None:
                time.sleep(poll_s)

    def release(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    @property
    def held(self) -> bool:
        return self._handle is not None

    @contextlib.contextmanager
    def hold(self, cancel: Optional[threading.Event] = None,
             on_wait: Optional[Callable[[], None]] = None) -> Iterator["FileLock"]:
        self.acquire(cancel, on_wait=on_wait)
        try:
            yield self
        finally:
            self.release()


class CacheLease:
    """A shared hold on a published artifact: eviction skips it while the lease is held.

    Hold one while loading (or serving) an artifact; call :meth:`release` (or use ``with``) when done.
    """

    def __init__(self, lock: FileLock, path: Path):
        self._lock = lock
        self.path = path

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> "CacheLease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# --------------------------------------------------------------------------- the cache directory

@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """A published artifact as seen by eviction."""

    name: str
    path: Path
    size_bytes: int
    last_used: float


class EngineCache:
    """Operations on one cache root. Safe across threads and processes (file locks + renames)."""

    def __init__(self, root: Path, logger: Any = None):
        self.root = Path(root)
        self._log = logger or logging.getLogger("slm_ros.build")

    # paths
    def path(self, name: str) -> Path:
        return self.root / name

    def build_lock(self, name: str) -> FileLock:
        return FileLock(self.root / LOCKS / f"{name}.lock")

    def use_lock(self, name: str, shared: bool = True) -> FileLock:
        return FileLock(self.root / LOCKS / f"{name}.use", shared=shared, optional=shared)

    def digest(self, model: Path, progress: Optional[Callable[[int, int], None]] = None,
               cancel: Optional[threading.Event] = None) -> str:
        """Content digest of a checkpoint, remembering big files' digests in the sidecar."""
        self.root.mkdir(parents=True, exist_ok=True)
        return content_digest(model, self.root / DIGESTS, progress, cancel)

    # leases and LRU stamps
    def lease(self, name: str) -> CacheLease:
        """Hold ``name`` against eviction (shared; many processes may hold it)."""
        lock = self.use_lock(name)
        lock.acquire()
        return CacheLease(lock, self.path(name))

    def touch(self, name: str) -> None:
        """Record a use of ``name`` for least-recently-used eviction."""
        stamp = self.path(name) / STAMP
        try:
            stamp.touch()
            os.utime(stamp)
        except OSError as exc:  # read-only cache: eviction order just gets less precise
            self._log.debug(f"cannot stamp {stamp}: {exc}")

    # temporary directories
    def new_workspace(self, name: str) -> Path:
        """A build workspace for ``name`` (call with the build lock held); the step builds into its
        empty ``artifact`` subdirectory and may use the workspace for scratch files."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{name}.", dir=self.root))
        (tmp / OWNER).write_text(json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
        (tmp / ARTIFACT_DIR).mkdir()
        return tmp

    def clean_stale(self, max_age_s: float = STALE_TMP_SECONDS,
                    holding: Sequence[str] = ()) -> List[Path]:
        """Remove build directories whose builder is gone and half-deleted artifacts.

        A ``.tmp-<name>.*`` directory is stale when nobody holds ``<name>``'s build lock (the kernel
        drops the lock of a killed builder), or when ``holding`` says this process holds it (so the
        directory is a leftover); on filesystems without locks, when it is older than ``max_age_s``.
        """
        removed = []
        if not self.root.is_dir():
            return removed
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(TRASH_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
                continue
            if not entry.name.startswith(TMP_PREFIX) or not entry.is_dir():
                continue
            name = entry.name[len(TMP_PREFIX):].rsplit(".", 1)[0]
            if not _NAME.match(name):  # not made by new_workspace: only age tells
                name = ""
            why = self._stale_reason(entry, name, max_age_s, name in holding)
            if why:
                self._log.info(f"removing stale temporary build directory {entry} ({why})")
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        return removed

    def _stale_reason(self, tmp: Path, name: str, max_age_s: float, we_hold: bool) -> str:
        # Builds of <name> create their directory only while holding <name>'s build lock, and a
        # builder that takes the lock first removes the leftovers of earlier ones (we_hold). So a
        # free lock means the owner is gone -- whatever its pid means in this pid namespace (two
        # containers sharing a cache volume see different pids), which is why the lock, not the
        # recorded pid, decides. Only where the filesystem cannot lock does age decide.
        if we_hold:
            return "left by an earlier build of the same artifact"
        owner: Dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            owner = json.loads((tmp / OWNER).read_text())
        who = f"started by pid {owner.get('pid', '?')} on {owner.get('host', '?')}"
        free: Optional[bool] = None
        if name:
            lock = self.build_lock(name)
            with contextlib.suppress(OSError):
                free = lock.try_acquire()
        if free:
            lock.release()
            return f"{who}, which no longer runs: nobody holds its build lock"
        if free is None:
            started = owner.get("started")
            if not isinstance(started, (int, float)):
                with contextlib.suppress(OSError):
                    started = tmp.stat().st_mtime
            if isinstance(started, (int, float)) and time.time() - started > max_age_s:
                return f"{who}, older than {max_age_s / 3600:.0f} h"
        return ""

    # publish and delete
    def publish(self, workspace: Path, name: str) -> Path:
        """Atomically move a workspace's finished artifact into place, then delete the workspace
        (call with the build lock held).

        An existing directory of the same name (an invalid or forced-out artifact) is first renamed
        away, then deleted: at no moment does an incomplete artifact sit under ``name``.
        """
        final = self.path(name)
        if final.exists():
            self._discard(final)
        os.rename(workspace / ARTIFACT_DIR, final)
        _fsync_dir(self.root)
        shutil.rmtree(workspace, ignore_errors=True)
        return final

    def _discard(self, path: Path) -> None:
        trash = Path(tempfile.mkdtemp(prefix=f"{TRASH_PREFIX}{path.name}.", dir=self.root))
        os.rename(path, trash / "artifact")
        shutil.rmtree(trash, ignore_errors=True)

    # eviction
    def entries(self) -> List[CacheEntry]:
        """Published artifacts, least recently used first."""
        out = []
        if not self.root.is_dir():
            return out
        for path in self.root.iterdir():
            if path.name.startswith(".") or not path.is_dir():
                continue
            manifest, _why = read_manifest(path)
            size = manifest.get("size_bytes") if manifest else None
            if not isinstance(size, int):
                size = _du(path)
            last = 0.0  # no manifest: broken, evict first
            if manifest:
                for probe in (path / STAMP, path / MANIFEST):
                    with contextlib.suppress(OSError):
                        last = probe.stat().st_mtime
                        break
            out.append(CacheEntry(path.name, path, size, last))
        return sorted(out, key=lambda e: (e.last_used, e.name))

    def size_bytes(self) -> int:
        return sum(e.size_bytes for e in self.entries())

    def evict(self, max_bytes: int, keep: Sequence[str] = ()) -> List[str]:
        """Delete least-recently-used artifacts until the cache holds at most ``max_bytes``.

        Never deletes a name in ``keep`` (the artifact just built), one being built, or one a
        process holds a :class:`CacheLease` on.
        """
        if max_bytes <= 0:
            return []
        entries = self.entries()
        total = sum(e.size_bytes for e in entries)
        evicted = []
        for entry in entries:
            if total <= max_bytes:
                break
            if entry.name in keep:
                continue
            build, use = self.build_lock(entry.name), self.use_lock(entry.name, shared=False)
            if not build.try_acquire():
                self._log.info(f"cache over its limit but {entry.name} is being built: kept")
                continue
            try:
                if not use.try_acquire():
                    self._log.info(f"cache over its limit but {entry.name} is in use: kept")
                    continue
                try:
                    self._discard(entry.path)
                finally:
                    use.release()
            finally:
                build.release()
            total -= entry.size_bytes
            evicted.append(entry.name)
            self._log.info(f"evicted {entry.name} ({entry.size_bytes / 1e6:.1f} MB, least recently "
                           f"used) to keep the cache under {max_bytes / 1e6:.1f} MB")
        if total > max_bytes:
            self._log.warning(f"engine cache holds {total / 1e6:.1f} MB, over its "
                              f"{max_bytes / 1e6:.1f} MB limit: the rest is in use or just built")
        return evicted


def _du(path: Path) -> int:
    total = 0
    for here, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(here) / name).stat().st_size
    return total

