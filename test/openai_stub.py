"""A scriptable loopback OpenAI-compatible HTTP server for error-case tests (no mocks: a real socket,
real HTTP/1.1, real SSE).

    with StubServer() as stub:
        stub.script(status(429, retry_after=1), cut(after_pieces=2), ok("Hi there."))
        ...  # point the client under test at stub.base_url
        assert len(stub.requests) == 3

Each POST /v1/chat/completions consumes the next scripted behaviour; when the queue is empty `ok()`
is used. Streamed responses are `text/event-stream` with `Connection: close`, sent with chunked
transfer encoding by default (as uvicorn / llama-cpp-python's server do), so `cut()` looks to a
client like a real server dying mid-body (httpx: RemoteProtocolError "incomplete chunked read").
`StubServer(chunked=False)` sends close-delimited bodies instead (no Content-Length, end of body =
connection close), where `cut()` looks like a clean end of the stream without finish_reason/[DONE].

A request body without "stream" is answered as with "stream": false (OpenAI's default).
"""

from __future__ import annotations

import collections
import json
import re
import select
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Deque, Dict, List, Optional

PROMPT_TOKENS = 7
DEFAULT_TEXT = "Hello from the stub."
STALL_MAX_S = 120.0
_STEP_S = 0.02

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 409: "conflict_error", 422: "invalid_request_error",
                429: "rate_limit_error"}


# ---------------------------------------------------------------------------------------------
# Behaviours


@dataclass(frozen=True)
class Behaviour:
    """One scripted response: `kind` names it, `params` are the factory's arguments."""
    kind: str
    params: Dict[str, Any] = field(default_factory=dict)


def split_pieces(text: str) -> List[str]:
    """Words with their leading whitespace: "Hello from" -> ["Hello", " from"]; joins back to text."""
    pieces = re.findall(r"\s*\S+", text)
    rest = text[len("".join(pieces)):]
    if rest:
        pieces.append(rest)
    return pieces


def _pieces(text: str, pieces) -> List[str]:
    return list(pieces) if pieces is not None else split_pieces(text)


def ok(text: str = DEFAULT_TEXT, pieces=None, delay_s: float = 0.0, finish_reason: str = "stop",
       usage: bool = True, first_delay_s: float = 0.0) -> Behaviour:
    """A good streamed completion (or a chat.completion JSON for "stream": false)."""
    return Behaviour("ok", dict(text=text, pieces=_pieces(text, pieces), delay_s=delay_s,
                                finish_reason=finish_reason, usage=usage,
                                first_delay_s=first_delay_s))


def tool_calls(calls, text: str = "", finish_reason: str = "tool_calls") -> Behaviour:
    """A streamed answer calling tools: ``calls`` are (id, name, arguments text); each call's
    arguments arrive in two pieces after a first delta with its id and name, as servers stream
    them."""
    return Behaviour("tool_calls", dict(calls=[tuple(c) for c in calls], text=text,
                                        finish_reason=finish_reason))


def status(code: int, message: str = "stub error", retry_after=None, body=None) -> Behaviour:
    """HTTP `code` with an OpenAI-style error JSON (or `body` verbatim: str/bytes as is, anything
    else JSON-encoded), plus `Retry-After` when `retry_after` is given."""
    return Behaviour("status", dict(code=int(code), message=message, retry_after=retry_after,
                                    body=body))


def cut(after_pieces: int = 2, text: str = DEFAULT_TEXT, pieces=None) -> Behaviour:
    """Stream `after_pieces` content events, then shutdown + close the socket (no finish, no
    [DONE], no terminating chunk)."""
    return Behaviour("cut", dict(after_pieces=after_pieces, pieces=_pieces(text, pieces)))


def malformed(after_pieces: int = 1, line: str = "data: {not json", text: str = DEFAULT_TEXT) -> Behaviour:
    """Stream `after_pieces` good pieces, then `line` + blank line, then the rest normally."""
    return Behaviour("malformed", dict(after_pieces=after_pieces, line=line,
                                       pieces=split_pieces(text)))


def sse_comments(text: str = DEFAULT_TEXT, pieces=None) -> Behaviour:
    """Like ok(), with `: ping` comment lines and `event:`/`id:`/`retry:` fields interleaved."""
    return Behaviour("sse_comments", dict(pieces=_pieces(text, pieces)))


def stall(after_pieces: int = 1, text: str = DEFAULT_TEXT) -> Behaviour:
    """Stream `after_pieces` pieces, then send nothing more and hold the connection until the
    client disconnects, stop() is called, or 120 s pass."""
    return Behaviour("stall", dict(after_pieces=after_pieces, pieces=split_pieces(text)))


def error_event(after_pieces: int = 1, message: str = "model crashed",
                text: str = DEFAULT_TEXT) -> Behaviour:
    """Stream pieces, then `data: {"error": {...}}`, then end the body and close."""
    return Behaviour("error_event", dict(after_pieces=after_pieces, message=message,
                                         pieces=split_pieces(text)))


def error_json(code: int, message: str, type_: Optional[str] = None, code_field=None) -> dict:
    """An OpenAI-style error body."""
    if type_ is None:
        type_ = _ERROR_TYPES.get(code, "server_error" if code >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": type_, "param": None,
                      "code": code if code_field is None else code_field}}


# ---------------------------------------------------------------------------------------------
# Server


class _ClientGone(Exception):
    """The client closed its end of the connection."""


class _Stopped(Exception):
    """StubServer.stop() was called while a response was in progress."""


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    stub: "StubServer"

    def handle_error(self, request, client_address):  # keep test output quiet
        self.stub.errors.append(repr(sys.exc_info()[1]))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "openai-stub/1.0"
    sys_version = ""
    timeout = 60  # an idle keep-alive connection is dropped after this

    # -- plumbing ------------------------------------------------------------------------------

    @property
    def stub(self) -> "StubServer":
        return self.server.stub  # type: ignore[attr-defined]

    def setup(self):
        super().setup()
        self.stub._track(self.connection, True)

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.stub._track(self.connection, False)

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    def _client_gone(self) -> bool:
        """True when the client has closed (EOF or reset) its end; never blocks."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (ConnectionError, OSError, ValueError):
            return True

    def _pause(self, seconds: float) -> None:
        """Sleep `seconds` in small steps; raise when the client leaves or the stub stops."""
        deadline = time.monotonic() + seconds
        while True:
            if self.stub._stopping.is_set():
                raise _Stopped
            if self._client_gone():
                raise _ClientGone
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.stub._stopping.wait(min(_STEP_S, left))

    def _write(self, data: bytes) -> None:
        if self.stub._stopping.is_set():
            raise _Stopped
        if self._client_gone():
            raise _ClientGone
        if self._chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        self.wfile.write(data)
        self.wfile.flush()

    def _raw(self, text: str) -> None:
        self._write(text.encode("utf-8"))

    def _event(self, obj) -> None:
        self._raw("data: " + (obj if isinstance(obj, str) else json.dumps(obj)) + "\n\n")

    def _end_body(self) -> None:
        if self._chunked:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    def _abort(self) -> None:
        """Abrupt close: no terminating chunk, FIN straight away."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.connection.close()

    def _send_json(self, code: int, obj, headers: Optional[Dict[str, str]] = None) -> None:
        if isinstance(obj, bytes):
            payload = obj
        elif isinstance(obj, str):
            payload = obj.encode("utf-8")
        else:
            payload = json.dumps(obj).encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()

    def _start_stream(self) -> None:
        self._chunked = self.stub.chunked
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def _chunk(self, delta: dict, finish_reason=None) -> dict:
        return {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.stub.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}

    def _usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion_tokens,
                "total_tokens": PROMPT_TOKENS + completion_tokens}

    # -- request dispatch ----------------------------------------------------------------------

    _chunked = False

    def _authorized(self) -> bool:
        key = self.stub.api_key
        if not key or self.headers.get("Authorization", "") == f"Bearer {key}":
            return True
        self._send_json(401, error_json(401, "Incorrect API key provided.",
                                        "invalid_request_error", "invalid_api_key"))
        return False

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def do_GET(self):
        try:
            if not self._authorized():
                return
            if self.path.split("?")[0].rstrip("/") == "/v1/models":
                self._send_json(200, {"object": "list", "data": [
                    {"id": self.stub.model, "object": "model", "created": 0, "owned_by": "stub"}]})
            else:
                self._send_json(404, error_json(404, f"Unknown path {self.path}"))
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True

    def do_POST(self):
        try:
            raw = self._read_body()
            path = self.path.split("?")[0].rstrip("/")
            if path != "/v1/chat/completions":
                if self._authorized():
                    self._send_json(404, error_json(404, f"Unknown path {self.path}"))
                return
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            self.stub._record({"body": body, "headers": {k.lower(): v for k, v in self.headers.items()},
                               "time": time.monotonic()})
            if not self._authorized():
                return
            if not isinstance(body, dict):
                self._send_json(400, error_json(400, "request body is not a JSON object"))
                return
            behaviour = self.stub._next_behaviour()
            stream = body.get("stream") is True
            getattr(self, f"_do_{behaviour.kind}")(stream=stream, **behaviour.params)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, _ClientGone):
            self.close_connection = True
            self.stub._count_disconnect()
        except _Stopped:
            self._abort()
        except Exception as exc:  # never take the server down; keep it for the test to see
            self.close_connection = True
            self.stub.errors.append(repr(exc))

    # -- behaviours ----------------------------------------------------------------------------

    def _stream_pieces(self, pieces, delay_s: float = 0.0, first_delay_s: float = 0.0) -> None:
        for i, piece in enumerate(pieces):
            if i == 0 and first_delay_s:
                self._pause(first_delay_s)
            elif i > 0 and delay_s:
                self._pause(delay_s)
            self._event(self._chunk({"content": piece}))

    def _finish(self, finish_reason: str = "stop", n_pieces: int = 0, usage: bool = True) -> None:
        self._event(self._chunk({}, finish_reason))
        if usage:
            chunk = self._chunk({})
            chunk["choices"] = []
            chunk["usage"] = self._usage(n_pieces)
            self._event(chunk)
        self._event("[DONE]")
        self._end_body()

    def _do_ok(self, stream, text, pieces, delay_s, finish_reason, usage, first_delay_s):
        if not stream:
            self._pause(first_delay_s + delay_s * max(len(pieces) - 1, 0))
            result = {"id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()),
                      "model": self.stub.model,
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                                   "finish_reason": finish_reason}]}
            if usage:
                result["usage"] = self._usage(len(pieces))
            self._send_json(200, result)
            return
        self._start_stream()
        self._event(self._chunk({"role": "assistant"}))
        self._stream_pieces(pieces, delay_s, first_delay_s)
        self._finish(finish_reason, len(pieces), usage)

    def _do_tool_calls(self, stream, calls, text, finish_reason):
        self._start_stream()
        self._event(self._chunk({"role": "assistant"}))
        if text:
            self._stream_pieces(split_pieces(text))
        for index, (call_id, name, arguments) in enumerate(calls):
            self._event(self._chunk({"tool_calls": [{
                "index": index, "id": call_id, "type": "function",
                "function": {"name": name, "arguments": ""}}]}))
            half = len(arguments) // 2
            for piece in (arguments[:half], arguments[half:]):
                self._event(self._chunk({"tool_calls": [{"index": index,
                                                         "function": {"arguments": piece}}]}))
        self._finish(finish_reason, len(calls) * 3)

    def _do_status(self, stream, code, message, retry_after, body):
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        self._send_json(code, error_json(code, message) if body is None else
                        (body if isinstance(body, (str, bytes)) else json.dumps(body)), headers)

    def _do_cut(self, stream, after_pieces, pieces):
        if not stream:  # promise a full body, send half of it, close
            payload = json.dumps({"id": "chatcmpl-stub", "object": "chat.completion",
                                  "model": self.stub.model, "choices": [
                                      {"index": 0, "message": {"role": "assistant",
                                                               "content": "".join(pieces)},
                                       "finish_reason": "stop"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self._abort()
            return
        self._start_stream()
        self._event(self._chunk({"role": "assistant"}))
        self._stream_pieces(pieces[:after_pieces])
        self._abort()

    def _do_malformed(self, stream, after_pieces, line, pieces):
        if not stream:
            payload = line[len("data: "):] if line.startswith("data: ") else line
            self._send_json(200, payload)
            return
        self._start_stream()
        self._event(self._chunk({"role": "assistant"}))
        self._stream_pieces(pieces[:after_pieces])
        self._raw(line + "\n\n")
        self._stream_pieces(pieces[after_pieces:])
        self._finish("stop", len(pieces))

    def _do_sse_comments(self, stream, pieces):
        if not stream:
            return self._do_ok(stream, "", pieces, 0.0, "stop", True, 0.0)
        self._start_stream()
        self._raw(": ping\n\n")
        self._raw("retry: 1000\n\n")
        events = [self._chunk({"role": "assistant"})] + [self._chunk({"content": p}) for p in pieces]
        events.append(self._chunk({}, "stop"))
        usage = self._chunk({})
        usage["choices"] = []
        usage["usage"] = self._usage(len(pieces))
        events += [usage, "[DONE]"]
        for n, event in enumerate(events, start=1):
            data = event if isinstance(event, str) else json.dumps(event)
            lines = [": ping"] if n % 2 else []
            lines += ["event: message", f"id: {n}"]
            if n == 3:
                lines.append("retry: 1000")
            lines.append("data: " + data)
            if n % 2 == 0:
                lines.append(": keep-alive")
            self._raw("\n".join(lines) + "\n\n")
            if n % 3 == 0:
                self._raw(": ping\n\n")
        self._end_body()

    def _do_stall(self, stream, after_pieces, pieces):
        if stream:
            self._start_stream()
            self._event(self._chunk({"role": "assistant"}))
            self._stream_pieces(pieces[:after_pieces])
        else:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.flush()
        self._pause(STALL_MAX_S)
        self._abort()

    def _do_error_event(self, stream, after_pieces, message, pieces):
        err = {"error": {"message": message, "type": "server_error"}}
        if not stream:
            self._send_json(200, err)
            return
        self._start_stream()
        self._event(self._chunk({"role": "assistant"}))
        self._stream_pieces(pieces[:after_pieces])
        self._event(err)
        self._end_body()


class StubServer:
    """A loopback OpenAI-compatible server whose chat-completions answers are scripted."""

    def __init__(self, model: str = "stub-model", api_key: str = "", chunked: bool = True) -> None:
        self.model = model
        self.api_key = api_key
        self.chunked = chunked
        self.requests: List[Dict[str, Any]] = []
        self.disconnects = 0
        self.errors: List[str] = []  # unexpected handler exceptions (should stay empty)
        self._queue: Deque[Behaviour] = collections.deque()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._connections: set = set()
        self._httpd: Optional[_HTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> "StubServer":
        if self._httpd is not None:
            return self
        self._stopping.clear()
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.stub = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"openai-stub:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        with self._lock:
            conns = list(self._connections)
        for conn in conns:  # idle keep-alive connections and anything still streaming
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "StubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "StubServer not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- scripting and inspection --------------------------------------------------------------

    def script(self, *behaviours: Behaviour) -> "StubServer":
        """Queue behaviours, consumed one per chat-completions request (then `ok()` by default)."""
        for b in behaviours:
            if not isinstance(b, Behaviour):
                raise TypeError(f"not a stub behaviour: {b!r}")
        with self._lock:
            self._queue.extend(behaviours)
        return self

    @property
    def pending(self) -> int:
        """Scripted behaviours not yet consumed."""
        with self._lock:
            return len(self._queue)

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> bool:
        """Block until at least `n` chat-completions requests were received."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.requests) >= n, timeout)

    def wait_for_disconnects(self, n: int, timeout: float = 10.0) -> bool:
        """Block until at least `n` responses were ended by the client closing the connection."""
        with self._cond:
            return self._cond.wait_for(lambda: self.disconnects >= n, timeout)

    # -- used by the handler -------------------------------------------------------------------

    def _next_behaviour(self) -> Behaviour:
        with self._lock:
            return self._queue.popleft() if self._queue else ok()

    def _record(self, request: Dict[str, Any]) -> None:
        with self._cond:
            self.requests.append(request)
            self._cond.notify_all()

    def _count_disconnect(self) -> None:
        with self._cond:
            self.disconnects += 1
            self._cond.notify_all()

    def _track(self, conn, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)
