"""Conversions between slm_ros core objects and ROS messages (the only place that knows both)."""

from __future__ import annotations

import uuid
from typing import Optional

from slm_ros.core.constraints import (JSON_SCHEMA, ROS_MESSAGE, ResponseFormat, Tool,
                                      parse_response_format)
from slm_ros.core.errors import RequestError
from slm_ros.core.types import Chunk, Request, SamplingOverrides, Stats
from slm_ros.msg import GenerateRequest, GenerationStats, SamplingConfig, TokenChunk, ToolCall
from slm_ros.ros.ros_schema import schema_text_for


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
        response_format=response_format_from_msg(msg.response_format),
        tools=tuple(tool_from_msg(t) for t in msg.tools),
        tool_choice=msg.tool_choice,
    )


def tool_from_msg(msg) -> Tool:
    """A core Tool; a ``ros_type`` becomes the arguments' JSON Schema (RequestError naming an
    unknown type)."""
    parameters = msg.parameters
    if not parameters.strip() and msg.ros_type.strip():
        parameters = schema_text_for(msg.ros_type)
    return Tool(msg.name, msg.description, parameters)


def response_format_from_msg(msg) -> Optional[ResponseFormat]:
    """The core ResponseFormat of a ``slm_ros/ResponseFormat`` (None for free text); a
    ``ros_message`` type becomes the JSON Schema of its ROS type here (RequestError naming an
    unknown type)."""
    fmt = parse_response_format(msg.type, msg.schema, msg.ros_type)
    if not fmt.constrained:
        return None
    if fmt.type == ROS_MESSAGE:
        if not fmt.ros_type:
            raise RequestError("response_format ros_message: ros_type is empty (e.g. "
                               "geometry_msgs/msg/Twist)")
        return ResponseFormat(JSON_SCHEMA, schema_text_for(fmt.ros_type), fmt.ros_type)
    return fmt


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
    msg.tool_calls = tool_calls_to_msg(chunk.tool_calls)
    return msg


def tool_calls_to_msg(calls) -> list:
    return [ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in calls]


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
