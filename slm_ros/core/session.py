"""Chat sessions: per-session history and building a prompt that fits the context window."""

from __future__ import annotations

import dataclasses
import threading
from typing import Callable, Dict, List, Sequence, Tuple

from slm_ros.core.errors import RequestError

Message = Dict[str, str]


@dataclasses.dataclass(frozen=True)
class Turn:
    """One finished exchange of a session."""

    user: str
    assistant: str


class SessionStore:
    """History of every session, keyed by session id. Thread-safe.

    Only finished turns (finish reason stop or length) are stored; ``max_turns`` bounds memory per
    session, ``max_sessions`` bounds the number of sessions kept (least recently used dropped
    first).

    History is trimmed in blocks: when a session goes past ``max_turns``, only the newest
    ``max_turns // 2`` (at least 1) turns are kept. The history is the start of the next prompt;
    dropping one turn at a time would change that start on every request once the limit is reached,
    and a backend that reuses the KV cache of the prompt prefix it has seen (llama.cpp) would then
    evaluate the whole history again each turn. Trimmed in blocks, the prefix stays the same for
    ``max_turns // 2`` turns in a row (measured: bench/bench_conversation.py).
    """

    def __init__(self, max_turns: int = 8, max_sessions: int = 256):
        self._max_turns = max_turns
        self._max_sessions = max_sessions
        self._sessions: Dict[str, List[Turn]] = {}
        self._lock = threading.Lock()

    def history(self, session_id: str) -> List[Turn]:
        """A copy of the session's turns, oldest first (empty for an unknown session)."""
        with self._lock:
            return list(self._sessions.get(session_id, ()))

    def append(self, session_id: str, turn: Turn) -> None:
        """Record a finished turn."""
        if self._max_turns <= 0:
            return
        with self._lock:
            turns = self._sessions.pop(session_id, [])
            turns.append(turn)
            if len(turns) > self._max_turns:
                del turns[:-max(1, self._max_turns // 2)]
            self._sessions[session_id] = turns  # re-inserted: most recently used last
            while len(self._sessions) > self._max_sessions:
                self._sessions.pop(next(iter(self._sessions)))

    def reset(self, session_id: str) -> None:
        """Forget a session's history."""
        with self._lock:
            self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)


def build_messages(system_prompt: str, history: Sequence[Turn], prompt: str) -> List[Message]:
    """Chat messages in the order a chat template expects them."""
    messages: List[Message] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    for turn in history:
        messages.append({"role": "user", "content": turn.user})
        messages.append({"role": "assistant", "content": turn.assistant})
    messages.append({"role": "user", "content": prompt})
    return messages


def fit_prompt(
    template: Callable[[List[Message]], List[int]],
    system_prompt: str,
    history: Sequence[Turn],
    prompt: str,
    context_tokens: int,
    max_new_tokens: int,
) -> Tuple[List[int], int, int]:
    """Template the conversation so that it fits ``context_tokens``.

    History is dropped oldest turn first until prompt + ``max_new_tokens`` fit. The current prompt is
    never truncated: if it does not fit on its own (with room for at least one new token) a
    :class:`RequestError` says by how much. If it fits but leaves less than ``max_new_tokens`` of room,
    the room left is returned as the new budget.

    Returns ``(prompt_ids, turns_used, max_new_tokens)``.
    """
    turns = list(history)
    while True:
        ids = template(build_messages(system_prompt, turns, prompt))
        if len(ids) + max_new_tokens <= context_tokens or not turns:
            break
        turns = turns[1:]
    room = context_tokens - len(ids)
    if room < 1:
        raise RequestError(
            f"prompt is too long: {len(ids)} tokens with the chat template and system prompt, but the "
            f"context allows {context_tokens} (max_context_tokens) including at least one new token; "
            f"shorten the prompt by {len(ids) - context_tokens + 1} tokens or more")
    return ids, len(turns), min(max_new_tokens, room)
