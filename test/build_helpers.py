"""Helpers for the engine-builder tests: a small real checkpoint and a slow, test-only build step.

Run as a script it performs one build in its own process (the kill -9 and two-builder tests)::

    python build_helpers.py ROOT MODEL LOG [--delay S] [--version V]

and prints the result as one JSON line. The step appends ``<pid> start`` / ``<pid> <phase>`` /
``<pid> end`` lines to LOG, so a test can count how many builds really ran.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Optional

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 512,
    "tie_word_embeddings": True, "torch_dtype": "float32",
}


def write_safetensors(path: Path, tensors: Dict[str, bytes]) -> None:
    """A valid safetensors file of 1-D float32 tensors given as raw bytes (no torch needed)."""
    header, offset = {}, 0
    for name, data in tensors.items():
        header[name] = {"dtype": "F32", "shape": [len(data) // 4], "data_offsets": [offset,
                                                                                  offset + len(data)]}
        offset += len(data)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for data in tensors.values():
            f.write(data)


def make_checkpoint(directory: Path, weights: bytes = b"\0" * 4096,
                    config: Optional[Dict[str, Any]] = None) -> Path:
    """A Hugging Face-shaped checkpoint directory: config.json, model.safetensors, a tokenizer file."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config or TINY_CONFIG))
    write_safetensors(directory / "model.safetensors", {"weight": weights})
    (directory / "tokenizer_config.json").write_text("{}")
    return directory


class SlowStep:
    """A build step that writes a payload in three phases, sleeping ``delay`` after each one."""

    def __init__(self, backend: str = "slow", delay: float = 0.0, log: Optional[str] = None,
                 version: str = "1.0", sm: str = "8.7", payload: int = 1000,
                 fail_in: str = ""):
        self.backend = backend
        self.delay = delay
        self.log = log
        self.version = version
        self.sm = sm
        self.payload = payload
        self.fail_in = fail_in

    def _note(self, what: str) -> None:
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{os.getpid()} {what}\n")

    def validate(self, spec) -> None:
        from slm_ros.build.spec import BuildError
        if spec.quantization not in ("none", "w4a16", "w8a16"):
            raise BuildError(f"slow step: quantization {spec.quantization!r} not supported")

    def runtime_versions(self) -> Dict[str, str]:
        return {"slowlib": self.version}

    def device_info(self, spec) -> Dict[str, str]:
        return {"device": "cpu", "sm": self.sm}

    def build(self, spec, out_dir: Path, progress, cancel: threading.Event) -> Dict[str, Any]:
        from slm_ros.build.spec import BuildCancelled
        self._note("start")
        scratch = out_dir.parent / "scratch"  # beside out_dir, like the TensorRT-LLM step's scratch
        scratch.mkdir(exist_ok=True)
        (scratch / "checkpoint.bin").write_bytes(b"s" * 100)
        for i, phase in enumerate(("load", "compile", "save")):
            progress(phase, i / 3)
            if phase == self.fail_in:
                raise RuntimeError(f"simulated failure in {phase}")
            (out_dir / f"{phase}.bin").write_bytes(b"x" * (self.payload // 3))
            self._note(phase)
            if cancel.wait(self.delay):
                raise BuildCancelled(f"cancelled in {phase}")
        progress("save", 1.0)
        self._note("end")
        return {"phases": 3, "pid": os.getpid()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("model")
    parser.add_argument("log")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--version", default="1.0")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    from slm_ros.build.builder import Builder
    from slm_ros.build.spec import BuildSpec

    step = SlowStep(delay=args.delay, log=args.log, version=args.version)
    builder = Builder(args.root, step_factory=lambda backend: step)
    t0 = time.monotonic()
    result = builder.build(BuildSpec(model=args.model, backend="slow"))
    print(json.dumps({"cache_hit": result.cache_hit, "reason": result.reason,
                      "path": str(result.path), "seconds": time.monotonic() - t0}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
