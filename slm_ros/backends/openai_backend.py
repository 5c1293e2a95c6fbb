"""Backend ``openai``: generation on a remote OpenAI-compatible server (trtllm-serve, vLLM, NVIDIA
NIM, Ollama, llama.cpp's server), streamed back as server-sent events.

The robot keeps its ROS interface and the engine its guarantees (one final chunk per request, a
bounded queue, sessions); only the model runs elsewhere. How it talks to the server:

* ``POST {base_url}/chat/completions`` with ``stream: true`` (and ``stream_options.include_usage``
  for the server's token counts); the conversation goes as chat messages, an image as a base64 JPEG
  data URL in the last user message.
* httpx's asyncio client on one event-loop thread per backend, at most ``max_in_flight`` connections:
  a cancel cancels the request's task, which closes its connection at once, and the server sees
  the request end (servers stop generating for a closed connection).
* Timeouts: connect (httpx), first token (from sending the request) and between tokens (each
  read), so a stalled server fails a request instead of hanging it.
* Retries only before the first token (connection refused/reset, 429 with its Retry-After, 502, 503,
  504): text already streamed is never streamed twice. A stream cut after the first token ends the
  request with an error naming what happened; the text streamed so far stands.

The API key comes from the environment variable ``api_key_env`` names, read per request (so a key
rotated in the environment is picked up) and never logged.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import os
import queue
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import httpx

from slm_ros.backends.base import BackendConfig, RemoteConfig, TextStream, TextStreamBackend
from slm_ros.core.errors import BackendError, RequestError
from slm_ros.core.session import Message
from slm_ros.core.types import GREEDY_TEMPERATURE, SamplingParams

#: What ``model`` means when it is left at the default: the first model the server lists.
FIRST_SERVED_MODEL = ("", "default")
#: HTTP statuses worth a retry before the first token (the server is busy or restarting).
RETRY_STATUS = (429, 502, 503, 504)
#: Transport errors worth a retry before the first token (refused, reset, dropped connection).
RETRY_TRANSPORT = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError)
#: How often a waiting consumer looks at its cancel flag (seconds).
_POLL_S = 0.02


def response_format_body(constraint, style: str = "openai") -> Dict[str, Any]:
    """The OpenAI ``response_format`` for a compiled response format: ``json_object``, or the
    schema (``style`` openai: ``json_schema``, strict; json_object: llama-cpp-python's
    ``{"type": "json_object", "schema": ...}``). The OpenAI API has no regex or grammar: those are
    refused (RequestError) rather than sent unconstrained. Whatever the server returns is validated
    on the robot before it is called a success (the engine)."""
    from slm_ros.core.constraints import JSON_OBJECT, JSON_SCHEMA
    if constraint.kind == JSON_OBJECT and constraint.schema == {"type": "object"}:
        return {"type": "json_object"}
    if constraint.kind in (JSON_OBJECT, JSON_SCHEMA):
        if style == "json_object":
            return {"type": "json_object", "schema": constraint.schema}
        return {"type": "json_schema",
                "json_schema": {"name": "response", "schema": constraint.schema, "strict": True}}
    raise RequestError(f"the openai backend cannot send a {constraint.kind} response_format: the "
                       f"OpenAI API has only json_object and json_schema (use llama_cpp or "
                       f"transformers for regex and grammar)")


def tools_body(tools: Sequence[Any], choice: str) -> Dict[str, Any]:
    """The OpenAI ``tools`` and ``tool_choice`` of a request's tools (function tools; the JSON
    Schema of each one's arguments) and its tool_choice ("" / auto, required, or a tool's name)."""
    listed = [tool.function() for tool in tools]
    choice = (choice or "").strip()
    if choice in ("", "auto", "required"):
        wire: Any = choice or "auto"
    else:
        wire = {"type": "function", "function": {"name": choice}}
    return {"tools": listed, "tool_choice": wire}


class OpenAiBackend(TextStreamBackend):
    """A client of one OpenAI-compatible server; see the module docstring."""

    name = "openai"
    supports_images = True
    remote = True

    def __init__(self) -> None:
        self._config: Optional[RemoteConfig] = None
        self._model = ""              # served model name; resolved from /models when left default
        self._context = 0
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._client: Optional[httpx.AsyncClient] = None
        self._requested_model = ""
        self._warn = ""               # why the startup probe failed, for diagnostics

    # -- lifecycle -------------------------------------------------------------------------------

    def load(self, config: BackendConfig) -> None:
        remote = config.remote
        self._config = remote
        self._requested_model = (config.model or "").strip()
        self._context = config.max_context_tokens
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="slm-openai-http",
                                        daemon=True)
        self._thread.start()
        limits = httpx.Limits(max_connections=remote.max_in_flight,
                              max_keepalive_connections=remote.max_in_flight)
        # Read timeouts are ours (first token / between tokens); httpx bounds connect and write.
        timeout = httpx.Timeout(connect=remote.connect_timeout_s, read=None,
                                write=remote.token_timeout_s, pool=None)

        async def make_client() -> httpx.AsyncClient:
            return httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False)

        self._client = self._call(make_client(), 10.0)
        if self._requested_model not in FIRST_SERVED_MODEL:
            self._model = self._requested_model

    def warmup(self) -> None:
        """Probe the server (GET /models) so a wrong URL or key shows in the log at startup. A server
        that is not up yet is not an error: requests fail with the reason until it is."""
        try:
            self._adopt(*self._call(self._list_models(), self._config.connect_timeout_s + 10))
        except BackendError as exc:
            self._warn = str(exc)
            return
        self._warn = ""

    def _adopt(self, models: List[str], context: int) -> None:
        """Take what the server lists: the first model when ``model`` was left default, and its
        context length unless ``max_context_tokens`` set one."""
        if not self._model and models:
            self._model = models[0]
        self._context = self._context or context

    @property
    def max_concurrency(self) -> int:
        return self._config.max_in_flight if self._config else 1

    def describe(self) -> dict:
        info = {"backend": self.name, "device": "remote", "dtype": "",
                "server": self._config.base_url if self._config else "",
                "model": self._model or self._requested_model or "default"}
        if self._warn:
            info["warning"] = self._warn
        return info

    def close(self) -> None:
        if self._loop is None:
            return
        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:     # requests still running (the engine has stopped them)
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._loop.shutdown_asyncgens()
            if self._client is not None:
                await self._client.aclose()

        try:
            self._call(shutdown(), 5.0)
        except Exception:  # noqa: BLE001 - closing must not fail the node's shutdown
            pass
        self._client = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5.0)
        self._loop.close()
        self._loop = self._thread = None

    # -- generation ------------------------------------------------------------------------------

    def stream_chat(self, messages: List[Message], images: Sequence[Any], params: SamplingParams,
                    cancel: threading.Event, tools: Sequence[Any] = (),
                    tool_choice: str = "") -> TextStream:
        if self._client is None:
            raise BackendError("the openai backend is not loaded")
        body = self._body(messages, images, params)
        if tools:
            body.update(tools_body(tools, tool_choice))
        return _SseStream(self, body, cancel)

    def _body(self, messages: List[Message], images: Sequence[Any],
              params: SamplingParams) -> Dict[str, Any]:
        wire: List[Dict[str, Any]] = [dict(m) for m in messages]
        if images:
            parts: List[Dict[str, Any]] = [{"type": "text", "text": wire[-1]["content"]}]
            parts += [{"type": "image_url", "image_url": {"url": jpeg_data_url(img)}}
                      for img in images]
            wire[-1]["content"] = parts
        body: Dict[str, Any] = {
            "messages": wire, "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": params.max_new_tokens,
            # Below the floor the server would divide by ~0 as well: ask it for greedy.
            "temperature": params.temperature if params.temperature >= GREEDY_TEMPERATURE else 0.0,
            "top_p": params.top_p,
        }
        if params.seed:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if params.constraint is not None:
            body["response_format"] = response_format_body(params.constraint,
                                                           self._config.json_schema_style)
        if self._config.extra_sampling:
            if params.top_k:
                body["top_k"] = params.top_k
            if params.repetition_penalty != 1.0:
                body["repetition_penalty"] = params.repetition_penalty   # vLLM, trtllm-serve
                body["repeat_penalty"] = params.repetition_penalty       # llama.cpp
        return body

    # -- HTTP (runs on the event-loop thread) ------------------------------------------------------

    def _call(self, coro, timeout: float):
        """Run ``coro`` on the loop thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _headers(self) -> Dict[str, str]:
        headers = {"Accept": "text/event-stream"}
        env = self._config.api_key_env
        key = os.environ.get(env, "") if env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _url(self, path: str) -> str:
        return self._config.base_url.rstrip("/") + path

    def where(self) -> str:
        """How the server is named in messages."""
        return f"openai server {self._config.base_url}"

    async def _list_models(self) -> Tuple[List[str], int]:
        """Served model ids and, when the server says (vLLM's max_model_len), the context length."""
        try:
            response = await self._client.get(self._url("/models"), headers=self._headers(),
                                              timeout=self._config.connect_timeout_s + 5)
        except httpx.HTTPError as exc:
            raise BackendError(f"{self.where()}: {describe_transport_error(exc, self._config)}") \
                from None
        if response.status_code != 200:
            raise BackendError(f"{self.where()}: GET /models: "
                               f"{describe_status(response.status_code, response.text, self._config)}")
        try:
            data = response.json().get("data") or []
            ids = [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]
            context = next((int(m["max_model_len"]) for m in data
                            if isinstance(m, dict) and m.get("max_model_len")), 0)
        except (ValueError, AttributeError, TypeError, KeyError):
            raise BackendError(f"{self.where()}: GET /models did not return an OpenAI model list: "
                               f"{response.text[:200]!r}") from None
        return ids, context

    async def _resolve_model(self) -> str:
        if not self._model:
            self._adopt(*await self._list_models())
            if not self._model:
                raise BackendError(f"{self.where()}: the server lists no models (GET /models); set "
                                   f"the `model` parameter to the served model's name")
        return self._model

    async def run_stream(self, body: Dict[str, Any], out: "queue.SimpleQueue") -> None:
        """One request with its retries; every outcome ends up in ``out`` as
        ``("text", str)``..., then ``("end", finish, usage, tool calls)`` or ``("error", message)``."""
        config = self._config
        attempt = 0
        while True:
            retry_in: Optional[float] = None
            try:
                body["model"] = await self._resolve_model()
                t_sent = time.monotonic()
                request = self._client.build_request("POST", self._url("/chat/completions"),
                                                     json=body, headers=self._headers())
                try:
                    # The first-token deadline covers the wait for the response headers too.
                    response = await asyncio.wait_for(self._client.send(request, stream=True),
                                                      config.first_token_timeout_s)
                except asyncio.TimeoutError:
                    raise BackendError(f"{self.where()}: no response within "
                                       f"{config.first_token_timeout_s:g} s "
                                       f"(remote.first_token_timeout_s)") from None
                try:
                    if response.status_code == 200:
                        await self._read_events(response, out, t_sent)
                        return
                    retry_in = await self._refused(response, body["model"], attempt)
                finally:
                    await response.aclose()
            except BackendError as exc:
                out.put(("error", str(exc)))
                return
            except httpx.HTTPError as exc:
                message = describe_transport_error(exc, config)
                # _read_events lets transport errors through only before the first token.
                if attempt >= config.max_retries or not isinstance(exc, RETRY_TRANSPORT):
                    if attempt:
                        message += f" (after {attempt} retries)"
                    out.put(("error", f"{self.where()}: {message}"))
                    return
                retry_in = retry_delay(None, attempt)
            attempt += 1
            await asyncio.sleep(retry_in)

    async def _refused(self, response: httpx.Response, model: str, attempt: int) -> float:
        """A non-200 answer: seconds to wait before retrying, or BackendError naming it."""
        config = self._config
        text = (await response.aread()).decode("utf-8", "replace")
        status = response.status_code
        message = describe_status(status, text, config, model=model)
        if status == 404:
            message += await self._served_models_hint(model)
        if status not in RETRY_STATUS or attempt >= config.max_retries:
            if attempt:
                message += f" (after {attempt} retries)"
            raise BackendError(f"{self.where()}: {message}")
        delay = retry_delay(response.headers.get("retry-after"), attempt)
        if delay > config.max_retry_wait_s:
            raise BackendError(f"{self.where()}: {message}; the server asks to retry in "
                               f"{delay:.0f} s, longer than remote.max_retry_wait_s="
                               f"{config.max_retry_wait_s:g}")
        return delay

    async def _served_models_hint(self, model: str) -> str:
        try:
            models, _ = await self._list_models()
        except BackendError:
            return ""
        if model in models:
            return ""
        return f"; the server serves: {', '.join(models) or 'no models'} (set `model`)"

    async def _read_events(self, response: httpx.Response, out: "queue.SimpleQueue",
                           t_sent: float) -> None:
        """Parse the SSE stream into ``out``."""
        lines = response.aiter_lines()
        try:
            await self._parse_events(lines, out, t_sent)
        finally:
            await lines.aclose()

    async def _parse_events(self, lines, out: "queue.SimpleQueue", t_sent: float) -> None:
        config = self._config
        got_text = False
        finish: Optional[str] = None
        usage: Dict[str, int] = {}
        pieces = 0
        calls: Dict[int, Dict[str, str]] = {}   # streamed tool calls by index
        while True:
            if got_text:
                timeout, what = config.token_timeout_s, (
                    f"no token for {config.token_timeout_s:g} s after {pieces} streamed "
                    f"(remote.token_timeout_s); the answer so far is kept")
            else:
                timeout = max(0.0, t_sent + config.first_token_timeout_s - time.monotonic())
                what = (f"no first token within {config.first_token_timeout_s:g} s "
                        f"(remote.first_token_timeout_s)")
            try:
                line = await asyncio.wait_for(lines.__anext__(), timeout)
            except StopAsyncIteration:
                if finish is not None:     # some servers end without [DONE]
                    break
                raise BackendError(
                    f"{self.where()}: the stream ended before the answer finished (no "
                    f"finish_reason, no [DONE]) after {pieces} pieces; the answer so far is kept")
            except asyncio.TimeoutError:
                raise BackendError(f"{self.where()}: {what}") from None
            except httpx.HTTPError as exc:
                if not got_text:
                    raise      # before the first token: the caller may retry
                raise BackendError(
                    f"{self.where()}: the stream was cut after {pieces} pieces "
                    f"({describe_transport_error(exc, config)}); the answer so far is kept") \
                    from None
            event = parse_sse_line(line)
            if event is None:
                continue
            if event == "[DONE]":
                break
            if isinstance(event, SseError):
                raise BackendError(f"{self.where()}: {event.message}")
            text, event_finish, event_usage = chunk_fields(event)
            if event_usage:
                usage = event_usage
            if text:
                got_text = True
                pieces += 1
                out.put(("text", text))
            if add_tool_call_deltas(event, calls):
                got_text = True
                pieces += 1
            if event_finish:
                finish = event_finish
        out.put(("end", finish or "stop", usage,
                 tuple((c["id"], c["name"], c["arguments"]) for _, c in sorted(calls.items()))))


class SseError:
    """A server-sent event that is a failure (malformed line, an error object)."""

    def __init__(self, message: str) -> None:
        self.message = message


def parse_sse_line(line: str):
    """One line of an SSE stream: the decoded JSON of a ``data:`` line, ``"[DONE]"``, None for lines
    to skip (blank, comments, event/id/retry fields), or an :class:`SseError`."""
    line = line.rstrip("\r")
    if not line or line.startswith(":"):
        return None
    field, _, value = line.partition(":")
    value = value[1:] if value.startswith(" ") else value
    if field in ("event", "id", "retry"):
        return None
    if field != "data":
        return SseError(f"malformed server-sent event line: {line[:120]!r}")
    if value.strip() == "[DONE]":
        return "[DONE]"
    try:
        event = json.loads(value)
    except ValueError:
        return SseError(f"malformed server-sent event data (not JSON): {value[:120]!r}")
    if not isinstance(event, dict):
        return SseError(f"malformed server-sent event data (not an object): {value[:120]!r}")
    if event.get("error"):
        error = event["error"]
        message = error.get("message", error) if isinstance(error, dict) else error
        return SseError(f"the server reported an error mid-stream: {message}")
    return event


def chunk_fields(event: Dict[str, Any]) -> Tuple[str, Optional[str], Dict[str, int]]:
    """(text delta, finish reason or None, usage) of one chat.completion.chunk."""
    text, finish = "", None
    choices = event.get("choices") or []
    if choices and isinstance(choices[0], dict):
        choice = choices[0]
        delta = choice.get("delta") or {}
        if isinstance(delta, dict) and isinstance(delta.get("content"), str):
            text = delta["content"]
        finish = choice.get("finish_reason") or None
    usage = event.get("usage")
    counts: Dict[str, int] = {}
    if isinstance(usage, dict):
        for key in ("prompt_tokens", "completion_tokens"):
            if isinstance(usage.get(key), int):
                counts[key] = usage[key]
    return text, finish, counts


def add_tool_call_deltas(event: Dict[str, Any], calls: Dict[int, Dict[str, str]]) -> bool:
    """Merge one chunk's ``delta.tool_calls`` pieces into ``calls`` (index -> id, name and the
    arguments text so far: servers stream the arguments in pieces); True if it had any."""
    choices = event.get("choices") or []
    delta = choices[0].get("delta") if choices and isinstance(choices[0], dict) else None
    pieces = delta.get("tool_calls") if isinstance(delta, dict) else None
    if not isinstance(pieces, list):
        return False
    for position, piece in enumerate(pieces):
        if not isinstance(piece, dict):
            continue
        index = piece.get("index", position)
        call = calls.setdefault(index if isinstance(index, int) else position,
                                {"id": "", "name": "", "arguments": ""})
        if isinstance(piece.get("id"), str) and piece["id"]:
            call["id"] = piece["id"]
        function = piece.get("function") or {}
        if isinstance(function, dict):
            if isinstance(function.get("name"), str) and function["name"]:
                call["name"] = function["name"]
            if isinstance(function.get("arguments"), str):
                call["arguments"] += function["arguments"]
            elif isinstance(function.get("arguments"), dict):   # Ollama sends an object
                call["arguments"] = json.dumps(function["arguments"])
    return bool(pieces)


def describe_status(status: int, body: str, config: RemoteConfig, model: str = "") -> str:
    """A user-facing message for an HTTP error status, with the server's own message."""
    server_says = ""
    try:
        error = json.loads(body).get("error")
        server_says = error.get("message", "") if isinstance(error, dict) else str(error or "")
    except (ValueError, AttributeError):
        server_says = body.strip()[:200]
    server_says = f": {server_says}" if server_says else ""
    if status in (401, 403):
        env = config.api_key_env
        if env and os.environ.get(env):
            hint = f"the server refused the API key from ${env}"
        elif env:
            hint = f"no API key sent: ${env} is not set in the node's environment"
        else:
            hint = "no API key sent: remote.api_key_env is empty"
        return f"{status} {'Unauthorized' if status == 401 else 'Forbidden'} ({hint}){server_says}"
    if status == 404:
        return f"404 Not Found: no model {model!r} or wrong remote.base_url path{server_says}"
    if status == 429:
        return f"429 Too Many Requests (rate limited){server_says}"
    if status >= 500:
        return f"{status} server error{server_says}"
    return f"HTTP {status}{server_says}"


def _causes(exc: BaseException) -> List[BaseException]:
    """``exc`` and what caused it (anyio wraps the socket error of a failed connect)."""
    chain: List[BaseException] = []
    while exc is not None and len(chain) < 10:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def describe_transport_error(exc: Exception, config: RemoteConfig) -> str:
    """A user-facing message for a connection-level failure."""
    text = str(exc) or type(exc).__name__
    causes = _causes(exc)
    refused = any(isinstance(c, ConnectionRefusedError) for c in causes)
    low = " ".join(str(c) for c in causes).lower()
    if isinstance(exc, httpx.ConnectTimeout):
        return f"could not connect within {config.connect_timeout_s:g} s (remote.connect_timeout_s)"
    if isinstance(exc, httpx.ConnectError):
        if "name or service not known" in low or "nodename nor servname" in low or \
                "temporary failure in name resolution" in low or "no address associated" in low:
            host = httpx.URL(config.base_url).host
            return f"DNS failure: cannot resolve host {host!r} ({text})"
        if refused or "refused" in low:
            url = httpx.URL(config.base_url)
            port = url.port or (443 if url.scheme == "https" else 80)
            return f"connection refused: is the server running and listening on {url.host}:{port}?"
        return f"cannot connect: {text}"
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
        return f"the server closed the connection ({text})"
    return f"{type(exc).__name__}: {text}"


def retry_delay(retry_after: Optional[str], attempt: int) -> float:
    """Seconds before retry number ``attempt + 1``: the server's Retry-After (seconds or an HTTP
    date) when given, else exponential backoff from 0.25 s."""
    if retry_after:
        retry_after = retry_after.strip()
        try:
            return max(0.0, float(retry_after))
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(retry_after)
                return max(0.0, when.timestamp() - time.time())
            except (TypeError, ValueError):
                pass
    return 0.25 * (2 ** attempt)


def jpeg_data_url(image, quality: int = 90) -> str:
    """An RGB uint8 image (H x W x 3) as a ``data:image/jpeg;base64,...`` URL."""
    import cv2
    import numpy as np

    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise RequestError(f"image must be RGB uint8 H x W x 3, got {array.dtype} {array.shape}")
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(array, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RequestError("could not encode the image as JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(encoded.tobytes()).decode("ascii")


class _SseStream(TextStream):
    """The consumer side of one request: text deltas from the loop thread, cancel honoured while
    waiting."""

    def __init__(self, backend: OpenAiBackend, body: Dict[str, Any],
                 cancel: threading.Event) -> None:
        self._backend = backend
        self._cancel = cancel
        self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self._future = asyncio.run_coroutine_threadsafe(backend.run_stream(body, self._queue),
                                                        backend._loop)

    def __iter__(self) -> Iterator[str]:
        while True:
            if self._cancel.is_set():
                self.close()
                self.finish_reason = "cancelled"
                return
            try:
                kind, *value = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if self._future.done() and self._queue.empty():
                    exc = self._future.exception() if not self._future.cancelled() else None
                    raise BackendError(f"{self._backend.where()}: the request ended without an "
                                       f"answer ({type(exc).__name__ if exc else 'cancelled'}: "
                                       f"{exc})")
                continue
            if kind == "text":
                yield value[0]
            elif kind == "end":
                finish, usage, self.tool_calls = value
                self.finish_reason = "length" if finish == "length" else "stop"
                self.prompt_tokens = usage.get("prompt_tokens")
                self.completion_tokens = usage.get("completion_tokens")
                return
            else:
                raise BackendError(value[0])

    def close(self) -> None:
        """Cancel the request's task: its connection closes and the server sees the request end."""
        if not self._future.done():
            self._backend._loop.call_soon_threadsafe(self._future.cancel)
