"""Conversions between slm_ros core objects and ROS messages (the only place that knows both)."""

from __future__ import annotations

import uuid

from slm_ros.core.types import Chunk, Request, SamplingOverrides, Stats
from slm_ros.msg import GenerateRequest, GenerationStats, SamplingConfig, TokenChunk


def sampling_from_msg(msg: SamplingConfig) -> SamplingOverrides:
    """Raises :class:`~slm_ros.core.errors.RequestError` naming the invalid field."""
    return SamplingOverrides(
        max_new_tokens=int(msg.max_new_tokens),
        temperature=float(msg.temperature),
        top_p=float(msg.top_p),
        top_k=int(msg.top_k),
        repetition_penalty=float(msg.repetition_penalty),
        seed=int(msg.seed),
        stop=tuple(msg.stop),
    )


def request_from_msg(msg: GenerateRequest) -> Request:
    """A core request; an empty request_id is replaced by a new UUID here, so the caller knows it.

    Raises :class:`~slm_ros.core.errors.RequestError` for invalid sampling fields.
    """
    return Request(
        prompt=msg.prompt,
        request_id=msg.request_id or uuid.uuid4().hex,
        session_id=msg.session_id,
        system_prompt=msg.system_prompt,
        reset_session=bool(msg.reset_session),
        sampling=sampling_from_msg(msg.sampling),
    )


def request_from_prompt(text: str) -> Request:
    """A request from the plain ``prompt`` topic: default session, node default sampling."""
    return Request(prompt=text, request_id=uuid.uuid4().hex)


def stats_to_msg(stats: Stats) -> GenerationStats:
    return GenerationStats(
        prompt_tokens=stats.prompt_tokens,
        completion_tokens=stats.completion_tokens,
        time_to_first_token_ms=float(stats.time_to_first_token_ms),
        tokens_per_second=float(stats.tokens_per_second),
        total_ms=float(stats.total_ms),
        queue_ms=float(stats.queue_ms),
    )


def chunk_to_msg(chunk: Chunk, stamp) -> TokenChunk:
    """``stamp`` is a builtin_interfaces/Time (the node clock at publication)."""
    msg = TokenChunk()
    msg.header.stamp = stamp
    msg.request_id = chunk.request_id
    msg.session_id = chunk.session_id
    msg.seq = chunk.seq
    msg.text = chunk.text
    msg.token_ids = [int(t) for t in chunk.token_ids]
    msg.is_final = chunk.is_final
    msg.finish_reason = chunk.finish_reason.value if chunk.finish_reason else ""
    msg.error = chunk.error
    if chunk.stats is not None:
        msg.stats = stats_to_msg(chunk.stats)
    return msg


#: builtin_interfaces/Time.sec is an int32.
_SEC_MIN, _SEC_MAX = -(1 << 31), (1 << 31) - 1


def stamp_ns(stamp) -> int:
    """A ``builtin_interfaces/Time`` as integer nanoseconds (Python ints: no overflow, also for a
    nanosec field beyond 10^9 that a careless publisher sent)."""
    return int(stamp.sec) * 10**9 + int(stamp.nanosec)


def stamp_from_ns(ns: int):
    """``(sec, nanosec)`` for a ``builtin_interfaces/Time``: saturated to what an int32 ``sec``
    holds, so a stamp at the end of time never fails (or wraps) on the way back out."""
    sec, nanosec = divmod(int(ns), 10**9)
    if sec > _SEC_MAX:
        return _SEC_MAX, 10**9 - 1
    if sec < _SEC_MIN:
        return _SEC_MIN, 0
    return sec, nanosec
