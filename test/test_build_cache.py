"""Engine builder and cache, tier 1: real files, real locks, real processes; a test-only build step
(build_helpers.SlowStep) stands in for a backend so every case runs in well under a second."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from build_helpers import SlowStep, make_checkpoint, write_safetensors
from slm_ros.build import cache as cache_mod
from slm_ros.build.builder import Builder, inspect_checkpoint
from slm_ros.build.cache import FileLock
from slm_ros.build.spec import BuildCancelled, BuildError, BuildSpec
from slm_ros.core.errors import ConfigError

HELPER = str(Path(__file__).with_name("build_helpers.py"))


def builder(root, **step_args) -> Builder:
    def factory(backend):
        return SlowStep(backend=backend, **step_args)
    return Builder(root, step_factory=factory)


def published(root: Path):
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) \
        if root.exists() else []


def temporaries(root: Path):
    return sorted(p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".trash-"))) \
        if root.exists() else []


@pytest.fixture
def model(tmp_path):
    return make_checkpoint(tmp_path / "ckpt")


def spec_for(model, **kw):
    kw.setdefault("backend", "slow")
    return BuildSpec(model=str(model), **kw)


# ----------------------------------------------------------------------------- keys

def test_key_is_stable_and_ignores_the_checkpoint_path(tmp_path, model):
    root = tmp_path / "cache"
    first = builder(root).lookup(spec_for(model))
    assert builder(root).lookup(spec_for(model)).key == first.key
    moved = model.rename(tmp_path / "renamed-checkpoint")
    assert builder(root).lookup(spec_for(moved)).key == first.key
    copy = shutil.copytree(moved, tmp_path / "elsewhere" / "copy")
    assert builder(tmp_path / "other-cache").lookup(spec_for(copy)).key == first.key


def test_every_input_changes_the_key(tmp_path, model):
    root = tmp_path / "cache"
    base = builder(root).lookup(spec_for(model)).key
    keys = {"base": base}
    for field, value in [("quantization", "w4a16"), ("dtype", "float16"), ("device", "cuda"),
                         ("max_input_len", 1024), ("max_seq_len", 2048), ("max_batch_size", 2),
                         ("backend", "other")]:
        keys[field] = builder(root).lookup(spec_for(model, **{field: value})).key
    keys["runtime"] = builder(root, version="1.1").lookup(spec_for(model)).key
    keys["device sm"] = builder(root, sm="8.9").lookup(spec_for(model)).key
    calib = tmp_path / "calib.txt"
    calib.write_text("The robot arm picks the red cube.\n")
    keys["calibration data"] = builder(root).lookup(spec_for(model, calib_dataset=str(calib))).key
    with pytest.raises(BuildError, match="calib_dataset .* does not exist"):
        builder(root).lookup(spec_for(model, calib_dataset=str(tmp_path / "absent")))

    write_safetensors(model / "model.safetensors", {"weight": b"\1" + b"\0" * 4095})  # same size
    keys["weights"] = builder(root).lookup(spec_for(model)).key
    (model / "extra.txt").write_text("a new file")
    keys["new file"] = builder(root).lookup(spec_for(model)).key
    (model / "extra.txt").rename(model / "renamed.txt")
    keys["file name"] = builder(root).lookup(spec_for(model)).key
    assert len(set(keys.values())) == len(keys), keys


def test_hidden_files_and_prepared_marker_do_not_count(tmp_path, model):
    root = tmp_path / "cache"
    key = builder(root).lookup(spec_for(model)).key
    (model / ".cache" / "huggingface").mkdir(parents=True)
    (model / ".cache" / "huggingface" / "download.metadata").write_text(str(time.time()))
    (model / "slm_ros_prepared.json").write_text(json.dumps({"prepared_at": time.time()}))
    assert builder(root).lookup(spec_for(model)).key == key


def test_digest_sidecar_skips_rehash_but_sees_changes(tmp_path):
    big = make_checkpoint(tmp_path / "big", weights=b"\0" * (2 << 20))
    sidecar = tmp_path / "digests.json"
    first = cache_mod.content_digest(big, sidecar)
    entries = json.loads(sidecar.read_text())
    assert [Path(p).name for p in entries] == ["model.safetensors"]  # only big files are kept
    assert cache_mod.content_digest(big, sidecar) == first
    # The same bytes changed in place: new mtime, so the sidecar entry no longer applies.
    time.sleep(0.01)
    write_safetensors(big / "model.safetensors", {"weight": b"\1" * (2 << 20)})
    assert cache_mod.content_digest(big, sidecar) != first
    assert cache_mod.content_digest(big, None) == cache_mod.content_digest(big, sidecar)


# ----------------------------------------------------------------------------- reuse and rebuild

def test_build_then_reuse_with_manifest(tmp_path, model):
    root = tmp_path / "cache"
    log = tmp_path / "log"
    stages = []
    first = builder(root, log=str(log)).build(spec_for(model),
                                              progress=lambda p, f: stages.append((p, f)))
    assert not first.cache_hit and first.reason == "not built yet"
    manifest = json.loads((first.path / "manifest.json").read_text())
    assert manifest["key"] == first.key and manifest["source"]["path"] == str(model.resolve())
    assert manifest["key_inputs"]["runtime"] == {"slowlib": "1.0"}
    assert set(manifest["files"]) == {"load.bin", "compile.bin", "save.bin"}
    assert sorted(p.name for p in first.path.iterdir()) == [
        ".last_used", "compile.bin", "load.bin", "manifest.json", "save.bin"]
    assert temporaries(root) == []  # the workspace, with the step's scratch, is gone
    assert manifest["build_seconds"] >= 0 and manifest["slm_ros_version"]
    assert manifest["plan"]["fits"] is True
    fractions = [f for _, f in stages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {"hash", "plan", "load", "compile", "save", "publish", "done"} <= {p for p, _ in stages}

    again = builder(root, log=str(log)).build(spec_for(model))
    assert again.cache_hit and again.path == first.path and again.reason == "cache hit"
    assert log.read_text().count("start") == 1
    assert builder(root).lookup(spec_for(model)).cache_hit


@pytest.mark.parametrize("damage, reason", [
    (lambda m: m.update({"key_inputs": {**m["key_inputs"],
                                         "runtime": {"slowlib": "0.9"}}}),
     "manifest mismatch: runtime.slowlib 0.9 != 1.0"),
    (lambda m: m.update({"key": "0" * 64}), "manifest key"),
    (lambda m: m.pop("key_inputs"), "no key_inputs"),
    (lambda m: m.update({"format": 0}), "manifest format"),
])
def test_mismatched_manifest_is_rebuilt_with_the_reason_logged(tmp_path, model, caplog, damage,
                                                               reason):
    root = tmp_path / "cache"
    log = tmp_path / "log"
    built = builder(root, log=str(log)).build(spec_for(model))
    path = built.path / "manifest.json"
    manifest = json.loads(path.read_text())
    damage(manifest)
    path.write_text(json.dumps(manifest))

    looked = builder(root).lookup(spec_for(model))
    assert not looked.cache_hit and reason in looked.reason
    with caplog.at_level(logging.INFO, logger="slm_ros.build"):
        rebuilt = builder(root, log=str(log)).build(spec_for(model))
    assert not rebuilt.cache_hit and reason in rebuilt.reason
    assert reason in caplog.text
    assert log.read_text().count("start") == 2
    assert builder(root).lookup(spec_for(model)).cache_hit
    assert temporaries(root) == []


@pytest.mark.parametrize("damage, reason", [
    (lambda p: (p / "manifest.json").write_text("{not json"), "corrupt manifest.json"),
    (lambda p: (p / "manifest.json").unlink(), "no manifest.json"),
    (lambda p: (p / "compile.bin").unlink(), "artifact file compile.bin is missing"),
    (lambda p: (p / "save.bin").write_bytes(b"short"), "save.bin has 5 bytes"),
])
def test_incomplete_artifact_is_rebuilt(tmp_path, model, damage, reason):
    root = tmp_path / "cache"
    built = builder(root).build(spec_for(model))
    damage(built.path)
    rebuilt = builder(root).build(spec_for(model))
    assert not rebuilt.cache_hit and reason in rebuilt.reason
    assert builder(root).lookup(spec_for(model)).cache_hit


def test_build_for_another_runtime_is_not_reused_and_says_why(tmp_path, model, caplog):
    root = tmp_path / "cache"
    old = builder(root, version="10.3").build(spec_for(model))
    with caplog.at_level(logging.INFO, logger="slm_ros.build"):
        new = builder(root, version="10.4").build(spec_for(model))
    assert not new.cache_hit and new.path != old.path
    assert "runtime.slowlib 10.3 != 10.4" in new.reason
    assert "runtime.slowlib 10.3 != 10.4" in caplog.text


def test_force_rebuilds(tmp_path, model):
    root = tmp_path / "cache"
    log = tmp_path / "log"
    first = builder(root, log=str(log)).build(spec_for(model))
    forced = builder(root, log=str(log)).build(spec_for(model), force=True)
    assert not forced.cache_hit and forced.reason == "forced rebuild" and forced.path == first.path
    assert log.read_text().count("start") == 2
    assert builder(root).lookup(spec_for(model)).cache_hit


# ----------------------------------------------------------------------------- failures

def test_failed_and_cancelled_builds_publish_nothing(tmp_path, model):
    root = tmp_path / "cache"
    with pytest.raises(BuildError, match="simulated failure in compile"):
        builder(root, fail_in="compile").build(spec_for(model))
    assert published(root) == [] and temporaries(root) == []

    cancel = threading.Event()

    def progress(phase, fraction):
        if phase == "load":
            cancel.set()
    with pytest.raises(BuildCancelled):
        builder(root, delay=5).build(spec_for(model), progress=progress, cancel=cancel)
    assert published(root) == [] and temporaries(root) == []
    assert not builder(root).lookup(spec_for(model)).cache_hit


def test_unknown_backend_and_refused_quantization(tmp_path, model):
    with pytest.raises(ConfigError, match="known: llama_cpp, onnxruntime_genai, openvino, tensorrt_llm, transformers"):
        Builder(tmp_path / "cache").build(spec_for(model, backend="nope"))
    with pytest.raises(BuildError, match="quantization 'fp8' not supported"):
        builder(tmp_path / "cache").build(spec_for(model, quantization="fp8"))


def test_plan_that_does_not_fit_refuses_before_building(tmp_path, model):
    from slm_ros.build.device import DeviceProfile
    config = json.loads((Path(__file__).parent / "data" / "model_configs" /
                         "llama-3.2-3b-instruct.json").read_text())
    (model / "config.json").write_text(json.dumps(config))
    tiny_board = DeviceProfile("orin-nano-8gb", 8 << 30, shared=True, reserve_bytes=2 << 30)
    b = Builder(tmp_path / "cache", step_factory=lambda backend: SlowStep(backend=backend),
                device_profile=tiny_board)
    with pytest.raises(BuildError, match=r"does not fit.*GiB.*orin-nano-8gb has 6\.00 GiB"):
        b.build(spec_for(model, backend="tensorrt_llm"))
    assert published(tmp_path / "cache") == []


BAD_CHECKPOINTS = {
    "missing": (lambda d: d, "does not exist"),
    "no config": (lambda d: (d.mkdir(), d)[1], "has no config.json"),
    "bad json": (lambda d: (make_checkpoint(d), (d / "config.json").write_text("{"), d)[2],
                 "cannot read .*config.json"),
    "no model_type": (lambda d: make_checkpoint(d, config={"hidden_size": 8}), "no model_type"),
    "no weights": (lambda d: (make_checkpoint(d), (d / "model.safetensors").unlink(), d)[2],
                   "has no weights"),
    "truncated": (lambda d: (make_checkpoint(d), _truncate(d / "model.safetensors"), d)[2],
                  r"corrupt safetensors file .*model\.safetensors.*truncated"),
    "garbage": (lambda d: (make_checkpoint(d), (d / "model.safetensors").write_bytes(
        b"\x10\0\0\0\0\0\0\0not json at all!"), d)[2], "corrupt safetensors file"),
    "missing shard": (lambda d: (make_checkpoint(d), (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}})), d)[2],
        "model-00001-of-00002.safetensors listed in model.safetensors.index.json are missing"),
    "not gguf": (lambda d: (d.parent.mkdir(exist_ok=True), d.with_suffix(".bin").write_text("x"),
                            d.with_suffix(".bin"))[2], "is not a .gguf file"),
    "bad gguf": (lambda d: (d.parent.mkdir(exist_ok=True), d.with_suffix(".gguf").write_bytes(
        b"GGML" + b"\0" * 64), d.with_suffix(".gguf"))[2], "is not a GGUF file"),
}


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:-100])


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_refused_naming_the_problem(tmp_path, case):
    make, message = BAD_CHECKPOINTS[case]
    path = make(tmp_path / "ckpt")
    root = tmp_path / "cache"
    with pytest.raises(BuildError, match=message):
        builder(root).build(spec_for(path))
    assert published(root) == [] and temporaries(root) == []


# ----------------------------------------------------------------------------- processes

def _run_helper(root, model, log, delay):
    return subprocess.Popen([sys.executable, HELPER, str(root), str(model), str(log),
                             "--delay", str(delay)], cwd=str(root.parent),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _lines(log):
    return log.read_text().split("\n") if log.exists() else []


def test_kill_9_mid_build_leaves_nothing_that_looks_complete(tmp_path, model):
    root, log = tmp_path / "cache", tmp_path / "log"
    proc = _run_helper(root, model, log, delay=60)
    try:
        assert _wait_for(lambda: any(line.endswith(" load") for line in _lines(log))), \
            proc.stderr.read() if proc.poll() is not None else "builder never finished its load phase"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert published(root) == []
    (leftover,) = temporaries(root)
    assert (root / leftover / "artifact" / "load.bin").exists()
    assert not (root / leftover / "artifact" / "manifest.json").exists()
    looked = builder(root).lookup(spec_for(model))
    assert not looked.cache_hit and looked.reason == "not built yet"

    rebuilt = builder(root, log=str(log)).build(spec_for(model))
    assert not rebuilt.cache_hit and rebuilt.path.is_dir()
    assert temporaries(root) == [], "the stale temporary directory was not cleaned"
    assert builder(root).lookup(spec_for(model)).cache_hit


def test_two_concurrent_builders_build_once(tmp_path, model):
    root, log = tmp_path / "cache", tmp_path / "log"
    first = _run_helper(root, model, log, delay=1.5)
    try:
        assert _wait_for(lambda: any(line.endswith(" start") for line in _lines(log)))
        second = _run_helper(root, model, log, delay=1.5)
        out2, err2 = second.communicate(timeout=60)
        out1, err1 = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 0, err1
    assert second.returncode == 0, err2
    r1, r2 = json.loads(out1), json.loads(out2)
    assert not r1["cache_hit"] and r2["cache_hit"]
    assert r2["reason"] == "built by another process while waiting"
    assert r1["path"] == r2["path"]
    assert sum(line.endswith(" start") for line in _lines(log)) == 1
    assert "another process is building" in err2


def test_stale_temporary_directories(tmp_path, model):
    root = tmp_path / "cache"
    b = builder(root)
    name = cache_mod.artifact_name("slow", "none", b.lookup(spec_for(model)).key)
    dead = root / f".tmp-{name}.dead"
    dead.mkdir(parents=True)
    (dead / "half.bin").write_bytes(b"x")
    trash = root / ".trash-old.1"
    trash.mkdir()
    busy_name = "slow-none-0123456789abcdef"
    busy = root / f".tmp-{busy_name}.live"
    busy.mkdir()
    foreign_young = root / ".tmp-trtllm-scratch-abc"  # not a builder workspace: age decides
    foreign_young.mkdir()
    foreign_old = root / ".tmp-trtllm-scratch-old"
    foreign_old.mkdir()
    os.utime(foreign_old, (time.time() - 25 * 3600,) * 2)
    lock = FileLock(root / ".locks" / f"{busy_name}.lock")
    assert lock.try_acquire()  # a live builder holds its lock: its directory stays
    try:
        removed = b.clean()
        assert sorted(p.name for p in removed) == sorted([dead.name, trash.name, foreign_old.name])
        assert busy.is_dir() and foreign_young.is_dir()
    finally:
        lock.release()
    assert [p.name for p in b.clean()] == [busy.name]


# ----------------------------------------------------------------------------- eviction

def test_lru_eviction_keeps_recent_just_built_and_leased(tmp_path, model, caplog):
    root = tmp_path / "cache"
    payload = 300_000
    limit = 700_000  # room for two artifacts

    def b():
        return Builder(root, max_cache_bytes=limit,
                       step_factory=lambda backend: SlowStep(backend=backend, payload=payload))

    specs = [spec_for(model, max_input_len=256, max_seq_len=n) for n in (1024, 2048, 3072, 4000)]
    a = b().build(specs[0])
    time.sleep(0.02)
    bb = b().build(specs[1])
    time.sleep(0.02)
    assert b().lookup(specs[0]).cache_hit  # a used again: b is now least recently used
    time.sleep(0.02)
    c = b().build(specs[2])
    assert published(root) == sorted([a.name, c.name])

    with b().lease(b().lookup(specs[0])):  # a is in use: the next victim is c
        time.sleep(0.02)
        d = b().build(specs[3])
        assert published(root) == sorted([a.name, d.name])

    with caplog.at_level(logging.INFO, logger="slm_ros.build"):
        tight = Builder(root, max_cache_bytes=1000,
                        step_factory=lambda backend: SlowStep(backend=backend, payload=payload))
        e = tight.build(spec_for(model, max_input_len=256, max_seq_len=500))
    assert published(root) == [e.name]  # never the artifact just built
    assert "over its" in caplog.text
    assert bb.name not in published(root)


def test_inspect_checkpoint_reads_config(model):
    checkpoint = inspect_checkpoint(str(model))
    assert checkpoint.kind == "hf" and checkpoint.config["model_type"] == "llama"


def test_builder_core_imports_no_heavy_or_ros_module():
    code = ("import sys, slm_ros.build.builder, slm_ros.build.planner, slm_ros.build.steps; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'tensorrt_llm', 'rclpy')))")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
