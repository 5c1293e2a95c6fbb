"""Turning a stream of token ids into safe text deltas, and running a producer on a thread.

* :class:`IncrementalDetokenizer` emits only complete UTF-8 characters: a byte-level tokenizer may split
  one character (an emoji, a CJK glyph) across several tokens, and those bytes are held back until the
  character is whole.
* :class:`StopStringFilter` cuts the text at the first stop string and holds back any tail that could
  still become one, so a stop string never leaks into the stream.
* :func:`iterate_in_thread` runs a blocking producer (e.g. ``model.generate`` with a streamer) on a worker
  thread and hands its items to the consumer through a bounded queue; producer exceptions re-raise in
  the consumer and a cancel event stops both sides.
* :func:`call_in_thread` runs one call on a short-lived thread and returns its result.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator, List, Sequence, TypeVar

T = TypeVar("T")

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decode token ids one at a time into text deltas that never split a UTF-8 character.

    ``decode`` turns a list of ids into text (``tokenizer.decode``). Only a short window of recent tokens
    is re-decoded each step, so the cost per token stays constant; decoding a window (rather than single
    tokens) keeps tokenizers that treat leading spaces specially correct.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self._ids: List[int] = []
        self._prefix = 0   # start of the window used as decoding context
        self._read = 0     # ids before this index have been emitted as text

    def push(self, token_id: int) -> str:
        """Add one token; return the new complete text (possibly empty)."""
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """Return whatever text is still held back (end of stream); incomplete bytes are dropped."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if final:
            after = after.rstrip(_REPLACEMENT)
        elif after.endswith(_REPLACEMENT):
            return ""  # the last token ends inside a multi-byte character: wait for the rest
        if len(after) <= len(before) and not final:
            return ""
        delta = after[len(before):]
        self._prefix, self._read = self._read, len(self._ids)
        return delta


class StopStringFilter:
    """Cut a text stream at the first occurrence of any stop string."""

    def __init__(self, stops: Sequence[str]):
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Add text; return what is safe to emit. After a stop string is seen, always returns ""."""
        if self.stopped:
            return ""
        if not self._stops:
            return delta
        text = self._held + delta
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = self._partial_suffix(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        """Text held back at the end of the stream (it never completed a stop string)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best


class _Done:
    """Sentinel: the producer finished (``error`` set if it raised)."""

    def __init__(self, error: BaseException = None):
        self.error = error


def call_in_thread(fn: Callable[[], T], name: str = "slm-call") -> T:
    """``fn()`` on a new thread that exits when it returns; its result or exception comes back here.

    For one-off compute on a model (a warm-up) from a thread that lives on: OpenMP runtimes
    (llama.cpp's and PyTorch's) keep a pool of spinning workers for every thread that ever ran a
    parallel region, until that thread exits. A second pool beside the engine worker's makes libgomp
    throttle its spinning on a machine with few cores: llama.cpp on 2 cores lost ~25 % of its
    decode speed in the node.
    """
    out: list = []

    def run() -> None:
        try:
            out.append((True, fn()))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            out.append((False, exc))

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    ok, value = out[0]
    if not ok:
        raise value
    return value


def iterate_in_thread(
    produce: Callable[[Callable[[T], None]], None],
    cancel: threading.Event,
    maxsize: int = 64,
    poll_s: float = 0.05,
    name: str = "slm-producer",
) -> Iterator[T]:
    """Run ``produce(emit)`` on a thread and yield every item it emits, in order.

    The queue between the threads is bounded (``maxsize``), so a slow consumer slows the producer
    instead of growing memory. ``emit`` drops items once ``cancel`` is set; the producer is expected to
    check ``cancel`` itself to stop. When the iterator ends, normally or early (break, exception),
    ``cancel`` is set and the thread joined. An exception in the producer is raised in the consumer.
    """
    items: "queue.Queue" = queue.Queue(maxsize=maxsize)

    def emit(item: T) -> None:
        while not cancel.is_set():
            try:
                items.put(item, timeout=poll_s)
                return
            except queue.Full:
                continue

    def run() -> None:
        error = None
        try:
            produce(emit)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, re-raised there
            error = exc
        # The sentinel must arrive even when the queue is full and nobody reads (cancelled).
        while True:
            try:
                items.put(_Done(error), timeout=poll_s)
                return
            except queue.Full:
                if cancel.is_set():
                    try:
                        items.get_nowait()
                    except queue.Empty:
                        pass

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = items.get(timeout=poll_s)
            except queue.Empty:
                if not thread.is_alive() and items.empty():
                    return
                continue
            if isinstance(item, _Done):
                if item.error is not None:
                    raise item.error
                return
            yield item
    finally:
        cancel.set()
        thread.join()

