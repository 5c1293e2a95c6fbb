"""A real OpenAI-compatible server for tests: llama-cpp-python's own (`python -m llama_cpp.server`)
serving the embedded SmolLM2 GGUF on loopback, as a subprocess that dies with the test process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import httpx

from ros_helpers import _die_with_parent


def embedded_gguf() -> str:
    """Path of the GGUF shipped with the embedded SmolLM2 package."""
    from slm_ros.models import embedded_gguf as _embedded_gguf
    return str(_embedded_gguf())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaCppServer:
    """`python -m llama_cpp.server` on 127.0.0.1; start() waits until GET /v1/models answers 200.
    restart() comes back on the same port, so a client keeps its base_url across kill/restart."""

    def __init__(self, model_path: str, alias: str = "smollm2", n_ctx: int = 2048, threads: int = 2,
                 api_key: str = "", log_path=None) -> None:
        self.model_path = str(model_path)
        self._alias = alias
        self.n_ctx = n_ctx
        self.threads = threads
        self.api_key = api_key
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="llama-cpp-server-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self._port: Optional[int] = None
        self.proc: Optional[subprocess.Popen] = None
        self._log = None
        self.start_seconds: Optional[float] = None  # how long the last start() took to be ready

    # -- properties ----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._port is not None, "LlamaCppServer not started"
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def alias(self) -> str:
        return self._alias

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        if self._log is not None and not self._log.closed:
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> "LlamaCppServer":
        if self.proc is not None and self.proc.poll() is None:
            return self
        if self._port is None:
            self._port = free_port()
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", self.model_path,
               "--model_alias", self._alias, "--host", "127.0.0.1", "--port", str(self._port),
               "--n_ctx", str(self.n_ctx), "--n_threads", str(self.threads), "--verbose", "False",
               # By default this server aborts the running request when another one arrives; a
               # server shared by several clients must queue them instead.
               "--interrupt_requests", "False"]
        if self.api_key:
            cmd += ["--api_key", self.api_key]
        self._log = open(self.log_path, "a")
        self._log.write(f"=== {' '.join(cmd)}\n")
        self._log.flush()
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"),
                                     preexec_fn=_die_with_parent)
        deadline = t0 + timeout
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    code = self.proc.returncode
                    self._close_log()
                    raise AssertionError(f"llama_cpp.server exited with {code} before it was ready "
                                         f"(port {self._port}); log tail:\n{self._log_tail()}")
                try:
                    if client.get(f"{self.base_url}/models", headers=self._headers()).status_code == 200:
                        self.start_seconds = time.monotonic() - t0
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        self.kill()
        raise AssertionError(f"llama_cpp.server not ready on port {self._port} within {timeout} s; "
                             f"log tail:\n{self._log_tail()}")

    def _close_log(self) -> None:
        if self._log is not None and not self._log.closed:
            self._log.close()

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._close_log()

    def stop(self) -> None:
        """SIGTERM, wait up to 10 s, then SIGKILL."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def restart(self, timeout: float = 60.0) -> "LlamaCppServer":
        """Stop if running, then start again on the same port."""
        self.stop()
        return self.start(timeout=timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "LlamaCppServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- requests ------------------------------------------------------------------------------

    def chat(self, messages, timeout: float = 120.0, **body) -> dict:
        """Non-streamed POST /v1/chat/completions; returns the parsed JSON (raises on HTTP errors)."""
        payload = {"model": self._alias, "messages": messages, **body, "stream": False}
        response = httpx.post(f"{self.base_url}/chat/completions", json=payload,
                              headers=self._headers(), timeout=timeout)
        response.raise_for_status()
        return response.json()
