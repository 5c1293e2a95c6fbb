"""Helpers for tests that drive the core Engine directly (no ROS)."""

import contextlib
import threading

from slm_ros.core.engine import Engine


@contextlib.contextmanager
def running_engine(backend, config):
    """An Engine on ``backend`` with ``config``, started, and stopped on exit."""
    engine = Engine(backend, config)
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


class Collector:
    """Sink that records every chunk per request and waits for final chunks."""

    def __init__(self, timeout: float = 30.0):
        self.chunks = {}
        self.cv = threading.Condition()
        self.timeout = timeout

    def __call__(self, chunk):
        with self.cv:
            self.chunks.setdefault(chunk.request_id, []).append(chunk)
            self.cv.notify_all()

    def final(self, rid, timeout=None):
        """The (one) final chunk of request ``rid``, waiting for it."""
        with self.cv:
            assert self.cv.wait_for(lambda: any(c.is_final for c in self.chunks.get(rid, ())),
                                    timeout or self.timeout), f"no final chunk for {rid}"
            return [c for c in self.chunks[rid] if c.is_final][0]

    def text(self, rid):
        return "".join(c.text for c in self.chunks[rid])


def reference_text(model: str, prompt: str, config, sampling=None, backend_name="llama_cpp",
                   **backend_options) -> str:
    """What the core engine answers ``prompt`` with on this machine: ``model`` loaded in this
    process with ``backend_name``, a fresh session, the node's engine settings ``config``.

    llama.cpp is compiled for the CPU it runs on, and a small 4-bit model's greedy choice can
    differ between instruction sets (AVX2 vs AVX-512): tests compare a node's answer with this,
    never with one CPU's wording."""
    from slm_ros.backends.base import BackendConfig
    from slm_ros.backends.registry import create_backend
    from slm_ros.core.types import Request, SamplingOverrides

    backend = create_backend(backend_name)
    backend.load(BackendConfig(model=model, device="cpu", **backend_options))
    try:
        with running_engine(backend, config) as engine:
            sink = Collector(timeout=120)
            rid = engine.submit(Request(prompt=prompt, session_id="reference", reset_session=True,
                                        sampling=sampling or SamplingOverrides()), sink)
            final = sink.final(rid)
            assert final.finish_reason.value in ("stop", "length"), final
            return sink.text(rid)
    finally:
        backend.close()
