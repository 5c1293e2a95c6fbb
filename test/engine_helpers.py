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
