"""The request engine: one bounded FIFO queue, workers, exactly one final chunk per request.

Requests from every source (topic, action, CLI, tests) go through :meth:`Engine.submit`. Each request
gets a stream of :class:`~slm_ros.core.types.Chunk` objects delivered to its ``sink`` callback, seq
0, 1, 2, ... and exactly one final chunk - on success, on a bad request, when the queue is full, when
cancelled, when the backend fails and when the engine stops. The engine never raises into its callers
for a bad request and its workers never die on a failed one.

A local model (:class:`~slm_ros.backends.base.Backend`) gets one worker: requests run one at a time,
token ids detokenized here. A :class:`~slm_ros.backends.base.TextStreamBackend` (a remote server)
gets as many workers as it runs requests at once, and streams text.
"""

from __future__ import annotations

import collections
import functools
import dataclasses
import logging
import threading
import time
import unicodedata
import uuid
from typing import Callable, Deque, List, Optional, Set

from slm_ros.backends.base import BackendBase, TextStreamBackend
from slm_ros.core.constraints import compile_format, plan_tools
from slm_ros.core.errors import BackendError, ConfigError, RequestError, SlmError
from slm_ros.core.session import SessionStore, Turn, build_messages, fit_prompt
from slm_ros.core.streaming import IncrementalDetokenizer, StopStringFilter
from slm_ros.core.types import Chunk, FinishReason, Request, SamplingParams, Stats

Sink = Callable[[Chunk], None]

#: How a refusal of an id already in use starts (see :meth:`Engine.submit`).
DUPLICATE_ID = "duplicate request_id"


def _blank(text: str) -> bool:
    """True when ``text`` has nothing but whitespace and invisible format characters (zero-width
    space and joiners, BOM, bidi marks: Unicode category Cf)."""
    return all(c.isspace() or unicodedata.category(c) == "Cf" for c in text)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Node-level settings of the engine, validated at construction."""

    defaults: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    system_prompt: str = ""
    max_queue: int = 16            # requests waiting behind the running one
    max_history_turns: int = 8     # per session
    max_context_tokens: int = 0    # 0 = the model's context length
    #: Shortest time between two streamed chunks of a request; text generated meanwhile goes out
    #: together in the next chunk. The first chunk and the final one are never held back. 0 = a
    #: chunk per piece of text.
    stream_interval_ms: int = 0
    #: Prompts (with their system prompt) larger than this many UTF-8 bytes are refused before
    #: tokenizing. 0 = no limit.
    max_prompt_bytes: int = 262_144
    #: A request still unfinished this many seconds after it was accepted (queue wait included)
    #: is stopped with an error: a backstop for requests nobody waits for any more. 0 = off.
    request_timeout_s: float = 0.0

    def __post_init__(self) -> None:
        if self.max_queue < 0:
            raise ConfigError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_history_turns < 0:
            raise ConfigError(f"max_history_turns must be >= 0, got {self.max_history_turns}")
        if self.max_context_tokens < 0:
            raise ConfigError(f"max_context_tokens must be >= 0, got {self.max_context_tokens}")
        if self.max_prompt_bytes < 0:
            raise ConfigError(f"max_prompt_bytes must be >= 0, got {self.max_prompt_bytes}")
        if not self.request_timeout_s >= 0:
            raise ConfigError(f"request_timeout_s must be >= 0, got {self.request_timeout_s}")
        if not 0 <= self.stream_interval_ms <= 10_000:
            raise ConfigError(f"stream_interval_ms must be between 0 and 10000, got "
                              f"{self.stream_interval_ms}")


@dataclasses.dataclass
class EngineCounters:
    """Running totals for diagnostics."""

    accepted: int = 0
    rejected: int = 0      # refused before queueing (bad request, duplicate id, queue full)
    succeeded: int = 0     # finish reason stop or length
    cancelled: int = 0
    failed: int = 0        # finish reason error after being queued
    last_ttft_ms: float = 0.0
    last_tokens_per_second: float = 0.0


class _Job:
    """A request inside the engine, with its stream position and cancel flag."""

    def __init__(self, request: Request, sink: Sink, logger, interval_s: float = 0.0) -> None:
        self.request = request
        self.sink = sink
        self.params: Optional[SamplingParams] = None
        self.cancel = threading.Event()
        self.abort_reason = ""       # set when the engine (not the user) stops the request
        self.cancel_note = ""        # why a cancel came from the node, not the user (final chunk's error)
        self.t_accept = time.monotonic()
        self._seq = 0
        self._final_sent = False
        self._logger = logger
        self._interval_s = interval_s   # the engine's stream_interval_ms, in seconds
        # Text and token ids generated but not yet sent (see stream()).
        self.deadline: Optional[threading.Timer] = None   # request_timeout_s of a running job
        self._held_text: List[str] = []
        self._held_ids: List[int] = []
        self._t_sent = 0.0

    def emit(self, text: str = "", token_ids=(), **final) -> None:
        """Deliver one chunk; a chunk with ``finish_reason`` is the final one (sent once only)."""
        if self._final_sent:
            return
        is_final = "finish_reason" in final
        chunk = Chunk(self.request.request_id, self.request.session, self._seq, text,
                      tuple(token_ids), is_final, **final)
        self._seq += 1
        self._final_sent = is_final
        try:
            self.sink(chunk)
        except Exception as exc:  # noqa: BLE001 - a broken consumer must not stop the worker
            self._logger.error(f"request {self.request.request_id}: delivering chunk {chunk.seq} "
                               f"failed: {type(exc).__name__}: {exc}")

    def stream(self, text: str, token_ids=()) -> None:
        """A piece of the answer: sent now when it is the first chunk or the stream interval has
        passed since the last one, else held and sent with the next chunk (the final one
        included)."""
        self._held_ids.extend(token_ids)
        if text:
            self._held_text.append(text)
        if not self._held_text:
            return   # token ids without text yet (a split character) ride with the next text
        now = time.monotonic()
        if self._seq and now - self._t_sent < self._interval_s:
            return
        self._t_sent = now
        text, ids = "".join(self._held_text), self._held_ids
        self._held_text, self._held_ids = [], []
        self.emit(text, ids)

    def finish(self, tail: str = "", token_ids=(), **final) -> None:
        """The final chunk, carrying whatever :meth:`stream` still holds."""
        text = "".join(self._held_text) + tail
        ids = self._held_ids + list(token_ids)
        self._held_text, self._held_ids = [], []
        self.emit(text, ids, **final)

    def fail(self, message: str, stats: Optional[Stats] = None) -> None:
        self.finish(finish_reason=FinishReason.ERROR, error=message, stats=stats or Stats())


def _formatted(request: Request) -> bool:
    """The request constrains its output with a response format."""
    return request.response_format is not None and request.response_format.constrained


def _tool_plan(request: Request, syntax: str = "generic"):
    """The request's :class:`~slm_ros.core.constraints.ToolPlan` (None: no tools apply);
    RequestError for bad tools, or tools together with a response format."""
    tools = plan_tools(request.tools, request.tool_choice, syntax)
    if tools is not None and _formatted(request):
        raise RequestError("response_format and tools cannot be combined (set tool_choice none to "
                           "use the response format)")
    return tools


class Engine:
    """Serialises generation on one backend; see the module docstring for the guarantees."""

    def __init__(self, backend: BackendBase, config: EngineConfig, logger=None) -> None:
        self._backend = backend
        self._config = config
        self._log = logger or logging.getLogger("slm_ros.engine")
        self._sessions = SessionStore(max_turns=config.max_history_turns)
        self._queue: Deque[_Job] = collections.deque()
        self._active: Set[_Job] = set()
        self._lock = threading.Condition()
        self._running = False
        self._workers = max(1, backend.max_concurrency)
        self._threads: List[threading.Thread] = []
        self.counters = EngineCounters()
        ctx = backend.context_length
        if config.max_context_tokens:
            ctx = min(ctx, config.max_context_tokens) if ctx else config.max_context_tokens
        self._context = ctx
        self._interval_s = config.stream_interval_ms / 1e3

    @property
    def context_tokens(self) -> int:
        """Tokens available per request (prompt + answer); 0 = not known here (a remote server
        enforces its own)."""
        return self._context

    @property
    def queue_depth(self) -> int:
        """Requests waiting (not counting the one being generated)."""
        with self._lock:
            return len(self._queue)

    @property
    def busy(self) -> bool:
        """True while any request is being generated."""
        with self._lock:
            return bool(self._active)

    @property
    def workers(self) -> int:
        """Requests generated at once."""
        return self._workers

    def start(self) -> None:
        """Start the worker threads."""
        with self._lock:
            if self._running:
                return
            self._running = True
        self._threads = [threading.Thread(target=self._work, name=f"slm-engine-{i}", daemon=True)
                         for i in range(self._workers)]
        for thread in self._threads:
            thread.start()

    def stop(self, reason: str = "the node is shutting down") -> None:
        """Stop the worker; queued and running requests get a final error chunk naming ``reason``."""
        with self._lock:
            self._running = False
            dropped = list(self._queue)
            self._queue.clear()
            for job in self._active:
                job.abort_reason = reason
                job.cancel.set()
            self._lock.notify_all()
        for job in dropped:
            job.fail(f"request dropped: {reason}")
        for thread in self._threads:
            thread.join()
        self._threads = []

    def submit(self, request: Request, sink: Sink) -> str:
        """Queue ``request``; its chunks go to ``sink``. Returns the request id (assigned if empty).

        Problems found now (empty prompt, invalid sampling, duplicate id, full queue, engine stopped)
        are answered at once with a final error chunk, from the caller's thread.

        A request whose id is already queued or running is refused under an id of its own,
        ``<id>#duplicate-<8 hex digits>`` (returned), never under the running request's id: a
        stream of chunks with one request id is only ever that request's.
        """
        if not request.request_id:
            request = dataclasses.replace(request, request_id=uuid.uuid4().hex)
        job = _Job(request, sink, self._log, self._interval_s)
        error = self._validate(job)
        if not error:
            with self._lock:
                error = self._admit(job)
        if error.startswith(DUPLICATE_ID):
            job.request = dataclasses.replace(
                request, request_id=f"{request.request_id}#duplicate-{uuid.uuid4().hex[:8]}")
            error += f"; this refusal is sent as {job.request.request_id!r}"
        if error:
            self._refuse(job, error)
        return job.request.request_id

    def reject(self, error: str, sink: Sink, request_id: str = "", session_id: str = "") -> str:
        """Answer a request that could not even be built (e.g. invalid sampling fields) with its
        final error chunk, counted like any refused request. Returns the request id used."""
        request = Request(prompt="", request_id=request_id or uuid.uuid4().hex,
                          session_id=session_id)
        self._refuse(_Job(request, sink, self._log), error)
        return request.request_id

    def _refuse(self, job: _Job, error: str) -> None:
        self.counters.rejected += 1
        self._log.warning(f"request {job.request.request_id} rejected: {error}")
        job.fail(error)

    def cancel(self, request_id: str, note: str = "") -> bool:
        """Cancel a queued or running request. Returns False if no such request is pending.

        ``note`` says why when the node, not the requester, cancels (e.g. its client is gone): the
        final chunk (finish reason cancelled) carries it as its ``error`` text."""
        with self._lock:
            for job in self._active:
                if job.request.request_id == request_id:
                    job.cancel_note = note
                    job.cancel.set()
                    return True
            for job in self._queue:
                if job.request.request_id == request_id:
                    self._queue.remove(job)
                    break
            else:
                return False
        self.counters.cancelled += 1
        job.finish(finish_reason=FinishReason.CANCELLED, error=note, stats=self._stats(job, 0, 0))
        return True

    # -- internals -------------------------------------------------------------------------------

    def _validate(self, job: _Job) -> str:
        request = job.request
        if not isinstance(request.prompt, str) or _blank(request.prompt):
            return "empty prompt: the request has no text to answer"
        limit = self._config.max_prompt_bytes
        if limit:
            size = len(request.prompt.encode("utf-8", "surrogatepass")) + \
                len(request.system_prompt.encode("utf-8", "surrogatepass"))
            if size > limit:
                return (f"prompt is too large: {size} bytes (with its system prompt) > "
                        f"max_prompt_bytes {limit}")
        try:
            job.params = request.sampling.resolve(self._config.defaults)
        except SlmError as exc:
            return f"invalid sampling: {exc}"
        return ""

    def _admit(self, job: _Job) -> str:
        """Queue the job (lock held) or say why not."""
        if not self._running:
            return "the engine is not running (node not active)"
        rid = job.request.request_id
        pending = list(self._active) + list(self._queue)
        if any(j.request.request_id == rid for j in pending):
            return f"{DUPLICATE_ID} {rid!r}: a request with this id is still queued or running"
        # Full when max_queue requests wait and no worker is free to take one more at once.
        if len(self._queue) >= self._config.max_queue and len(pending) >= self._workers:
            return (f"queue full: {len(self._queue)} requests waiting (max_queue="
                    f"{self._config.max_queue}); retry later")
        self._queue.append(job)
        self.counters.accepted += 1
        self._lock.notify()
        return ""

    def _work(self) -> None:
        while True:
            with self._lock:
                while self._running and not self._queue:
                    self._lock.wait()
                if not self._running:
                    return
                job = self._queue.popleft()
                self._active.add(job)
            timeout = self._config.request_timeout_s
            if timeout:
                left = job.t_accept + timeout - time.monotonic()
                if left <= 0:
                    self._expire(job, " while it waited in the queue")
                else:
                    job.deadline = threading.Timer(left, self._expire, (job,))
                    job.deadline.daemon = True
                    job.deadline.start()
            try:
                if isinstance(self._backend, TextStreamBackend):
                    self._run_text(job)
                else:
                    self._run(job)
            except Exception as exc:  # noqa: BLE001 - the worker must survive any request
                self._log.error(f"request {job.request.request_id} failed: {type(exc).__name__}: {exc}")
                self.counters.failed += 1
                job.fail(f"generation failed: {type(exc).__name__}: {exc}")
            finally:
                if job.deadline is not None:
                    job.deadline.cancel()
                with self._lock:
                    self._active.discard(job)

    def _expire(self, job: _Job, where: str = "") -> None:
        """The request timeout of ``job`` passed: stop it with an error naming the limit."""
        job.abort_reason = f"request_timeout_s ({self._config.request_timeout_s:g} s) passed{where}"
        job.cancel.set()

    def _run(self, job: _Job) -> None:
        request, params, backend = job.request, job.params, self._backend
        t_start = time.monotonic()
        if request.reset_session:
            self._sessions.reset(request.session)
        system = request.system_prompt or self._config.system_prompt
        try:
            tools = _tool_plan(request, backend.tool_syntax() if request.tools else "generic")
            template = functools.partial(backend.apply_chat_template, images=self._images(request))
            if tools is not None and tools.template_tools:   # the chat template renders them
                template = functools.partial(template, tools=tools.template_tools)
            elif tools is not None:
                system = f"{system}\n\n{tools.prompt}".strip()
            prompt_ids, _, budget = fit_prompt(
                template, system, self._sessions.history(request.session),
                request.prompt, self._context, params.max_new_tokens)
            constraint = None
            if tools is not None:
                constraint = backend.token_constraint(tools.constraint)
            elif _formatted(request):
                constraint = backend.token_constraint(compile_format(request.response_format))
        except RequestError as exc:
            self._refuse_started(job, exc, t_start)
            return
        if job.cancel.is_set():
            self._finish_cancelled(job, len(prompt_ids), 0, "", t_start)
            return

        detok = IncrementalDetokenizer(backend.decode)
        stops = StopStringFilter(params.stop)
        eos = backend.eos_token_ids
        pieces: List[str] = []
        n = 0
        t_first = t_last = 0.0
        finish = None
        for token in backend.generate(prompt_ids, dataclasses.replace(
                params, max_new_tokens=budget, constraint=constraint), job.cancel):
            t_last = time.monotonic()
            if n == 0:
                t_first = t_last
            n += 1
            if token in eos:
                job.stream("", (token,))   # no text: held for the final chunk
                finish = FinishReason.STOP
                break
            text = stops.feed(detok.push(token))
            if text:
                pieces.append(text)
            job.stream(text, (token,))
            if stops.stopped:
                finish = FinishReason.STOP
                break
            if job.cancel.is_set():
                break
        if finish is None:
            if job.cancel.is_set():
                finish = FinishReason.CANCELLED
            elif n >= budget:
                finish = FinishReason.LENGTH
            else:
                finish = FinishReason.STOP
        tail = ""
        if not stops.stopped:
            tail = stops.feed(detok.flush()) + stops.flush()
            if tail:
                pieces.append(tail)
        stats = self._stats(job, len(prompt_ids), n, t_start, t_first, t_last)
        if finish is FinishReason.CANCELLED:
            self._finish_cancelled(job, len(prompt_ids), n, tail, t_start, stats)
            return
        calls = ()
        if constraint is not None:
            problem = constraint.rejected or constraint.constraint.problem(
                "".join(pieces), constraint.complete, finish is FinishReason.LENGTH)
            if not problem and tools is not None:
                try:
                    calls = tools.calls("".join(pieces), request.request_id)
                except RequestError as exc:
                    problem = str(exc)
            if problem:
                self._fail_output(job, tail, problem, stats)
                return
        self._succeed(job, pieces, tail, finish, stats, calls)

    def _run_text(self, job: _Job) -> None:
        """One request on a text-streaming backend: the conversation goes out as messages (history
        trimmed by turns; the server enforces its context window), text deltas come back."""
        request, params = job.request, job.params
        backend: TextStreamBackend = self._backend
        t_start = time.monotonic()
        if request.reset_session:
            self._sessions.reset(request.session)
        messages = build_messages(request.system_prompt or self._config.system_prompt,
                                  self._sessions.history(request.session), request.prompt)
        constraint = None
        try:
            # Tools go to the server (its chat template renders them); its calls are validated here.
            tools = _tool_plan(request)
            if _formatted(request):
                # The server constrains (where its API can say it); the result is validated here.
                constraint = compile_format(request.response_format)
                params = dataclasses.replace(params, constraint=constraint)
            stream = backend.stream_chat(messages, self._images(request), params, job.cancel,
                                         tools=request.tools if tools is not None else (),
                                         tool_choice=request.tool_choice.strip())
        except RequestError as exc:
            self._refuse_started(job, exc, t_start)
            return
        stops = StopStringFilter(params.stop)
        pieces: List[str] = []
        n = 0
        t_first = t_last = 0.0
        error = ""
        try:
            for delta in stream:
                t_last = time.monotonic()
                if n == 0:
                    t_first = t_last
                n += 1
                text = stops.feed(delta.replace("\x00", "\ufffd"))   # ROS strings end at NUL
                if text:
                    pieces.append(text)
                    job.stream(text)
                if stops.stopped:
                    stream.close()
                    break
        except BackendError as exc:
            error = str(exc)
        tail = "" if stops.stopped else stops.flush()
        if tail:
            pieces.append(tail)
        tokens = stream.completion_tokens if stream.completion_tokens else n
        stats = self._stats(job, stream.prompt_tokens or 0, tokens, t_start, t_first, t_last)
        if error:
            self.counters.failed += 1
            self._log.warning(f"request {request.request_id} failed after {n} pieces: {error}")
            job.finish(tail, finish_reason=FinishReason.ERROR, error=error, stats=stats)
            return
        if stops.stopped:
            finish = FinishReason.STOP
        elif job.cancel.is_set() or stream.finish_reason == "cancelled":
            self._finish_cancelled(job, stream.prompt_tokens or 0, tokens, tail, t_start, stats)
            return
        else:
            finish = FinishReason(stream.finish_reason)
        if constraint is not None:
            # No matcher saw a server's tokens: the output is complete when it validates.
            text = "".join(pieces)
            problem = constraint.problem(text, complete=True, cut=False)
            if problem and finish is FinishReason.LENGTH:
                problem = constraint.problem(text, complete=False, cut=True)
            if problem:
                self._fail_output(job, tail, f"the server's output failed validation on the "
                                             f"robot: {problem}", stats)
                return
        calls = ()
        if tools is not None:
            try:
                calls = tools.server_calls(stream.tool_calls, request.request_id,
                                           request.tool_choice.strip())
            except RequestError as exc:
                self._fail_output(job, tail, f"the server's tool call failed validation on the "
                                             f"robot: {exc}", stats)
                return
        self._succeed(job, pieces, tail, finish, stats, calls)

    @staticmethod
    def _images(request: Request) -> tuple:
        """The request's image (its provider called now: the newest frame), as the backends take
        it; raises the provider's RequestError (no frame, stale frame, bad image)."""
        if request.image is None:
            return ()
        return (request.image() if callable(request.image) else request.image,)

    def _fail_output(self, job: _Job, tail: str, problem: str, stats: Stats) -> None:
        """A generated output that is not a valid result (constraint, tool call): the final chunk
        is an error naming ``problem``, the text streamed so far kept."""
        self.counters.failed += 1
        self._log.warning(f"request {job.request.request_id}: {problem}")
        job.finish(tail, finish_reason=FinishReason.ERROR, error=problem, stats=stats)

    def _refuse_started(self, job: _Job, exc: RequestError, t_start: float) -> None:
        """A dequeued request that cannot run (prompt too long, no usable image)."""
        self.counters.failed += 1
        self._log.warning(f"request {job.request.request_id} refused: {exc}")
        job.fail(str(exc), self._stats(job, 0, 0, t_start=t_start))

    def _succeed(self, job: _Job, pieces: List[str], tail: str, finish: FinishReason,
                 stats: Stats, tool_calls: tuple = ()) -> None:
        """Record the finished turn in its session and send the final chunk."""
        request = job.request
        self._sessions.append(request.session, Turn(request.prompt, "".join(pieces)))
        self.counters.succeeded += 1
        self.counters.last_ttft_ms = stats.time_to_first_token_ms
        self.counters.last_tokens_per_second = stats.tokens_per_second
        job.finish(tail, finish_reason=finish, stats=stats, tool_calls=tool_calls)

    def _finish_cancelled(self, job, prompt_tokens, n, tail, t_start, stats=None):
        if job.abort_reason:
            self.counters.failed += 1
            job.finish(tail, finish_reason=FinishReason.ERROR,
                     error=f"request stopped: {job.abort_reason}",
                     stats=stats or self._stats(job, prompt_tokens, n, t_start))
            return
        self.counters.cancelled += 1
        job.finish(tail, finish_reason=FinishReason.CANCELLED, error=job.cancel_note,
                   stats=stats or self._stats(job, prompt_tokens, n, t_start))

    @staticmethod
    def _stats(job: _Job, prompt_tokens: int, n: int, t_start: Optional[float] = None,
               t_first: float = 0.0, t_last: float = 0.0) -> Stats:
        now = time.monotonic()
        t_start = now if t_start is None else t_start
        decode_s = t_last - t_first
        return Stats(
            prompt_tokens=prompt_tokens,
            completion_tokens=n,
            time_to_first_token_ms=(t_first - job.t_accept) * 1e3 if n else 0.0,
            tokens_per_second=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            total_ms=(now - job.t_accept) * 1e3,
            queue_ms=(t_start - job.t_accept) * 1e3,
        )

