"""A ROS interface type as a JSON Schema, and JSON values to and from its messages.

``response_format`` ``ros_message`` asks for output that *is* a ROS message: the type's own
introspection (rosidl's ``SLOT_TYPES``, what ``ros2 interface show`` prints) becomes a JSON Schema,
the engine constrains decoding to it, and the JSON result converts into the message.

Mapping: bool -> boolean; integers -> integer within the range of their width (int8 ... uint64,
byte/octet 0..255, char 0..255); float32/float64 -> number (float32 within +-3.4e38); string and
wstring -> string (bounded ones with maxLength); fixed arrays -> array with minItems = maxItems =
size; bounded sequences -> maxItems; unbounded -> no bound; nested types (builtin_interfaces/Time
included) -> objects. Every field is required and no other property is allowed. An action type
means its goal, a service type its request.
"""

from __future__ import annotations

import importlib
import json
import math
from typing import Any, Dict

from slm_ros.core.errors import RequestError

_INT_RANGES = {
    "int8": (-2 ** 7, 2 ** 7 - 1), "uint8": (0, 2 ** 8 - 1),
    "int16": (-2 ** 15, 2 ** 15 - 1), "uint16": (0, 2 ** 16 - 1),
    "int32": (-2 ** 31, 2 ** 31 - 1), "uint32": (0, 2 ** 32 - 1),
    "int64": (-2 ** 63, 2 ** 63 - 1), "uint64": (0, 2 ** 64 - 1),
    "octet": (0, 255), "char": (0, 255),
    # rosidl's non-explicit integer names
    "short": (-2 ** 15, 2 ** 15 - 1), "unsigned short": (0, 2 ** 16 - 1),
    "long": (-2 ** 31, 2 ** 31 - 1), "unsigned long": (0, 2 ** 32 - 1),
    "long long": (-2 ** 63, 2 ** 63 - 1), "unsigned long long": (0, 2 ** 64 - 1),
}
_FLOAT32_MAX = 3.4028234663852886e38
#: Nesting deeper than this is refused (no ROS interface in practice comes close).
_MAX_DEPTH = 32


def resolve_type(name: str):
    """The message class for ``pkg/msg/Name`` (``pkg/Name`` too), ``pkg/action/Name`` (its Goal)
    or ``pkg/srv/Name`` (its Request); RequestError naming the type when it is unknown or not
    installed."""
    parts = [p for p in (name or "").strip().split("/") if p]
    if len(parts) == 2:
        parts = [parts[0], "msg", parts[1]]
    if len(parts) != 3 or parts[1] not in ("msg", "action", "srv"):
        raise RequestError(f"ros_type {name!r} is not a ROS interface type name "
                           f"(package/msg/Name, package/action/Name or package/srv/Name)")
    package, kind, type_name = parts
    try:
        module = importlib.import_module(f"{package}.{kind}")
        cls = getattr(module, type_name)
    except (ImportError, AttributeError):
        raise RequestError(f"ros_type {name!r}: no such interface is installed here (package "
                           f"{package!r}, {kind} {type_name!r})") from None
    if kind == "action":
        return cls.Goal
    if kind == "srv":
        return cls.Request
    if not hasattr(cls, "SLOT_TYPES"):
        raise RequestError(f"ros_type {name!r} is not a message type")
    return cls


def _class_of(namespaced) -> Any:
    module = importlib.import_module(".".join(namespaced.namespaces))
    return getattr(module, namespaced.name)


def _type_schema(slot, depth: int) -> Dict[str, Any]:
    from rosidl_parser import definition as d
    if isinstance(slot, d.BasicType):
        t = slot.typename
        if t == "boolean":
            return {"type": "boolean"}
        if t in ("float", "double", "long double"):
            if t == "float":
                return {"type": "number", "minimum": -_FLOAT32_MAX, "maximum": _FLOAT32_MAX}
            return {"type": "number"}
        low, high = _INT_RANGES[t]
        return {"type": "integer", "minimum": low, "maximum": high}
    if isinstance(slot, d.AbstractGenericString):
        schema: Dict[str, Any] = {"type": "string"}
        if slot.has_maximum_size():
            schema["maxLength"] = int(slot.maximum_size)
        return schema
    if isinstance(slot, d.AbstractNestedType):
        schema = {"type": "array", "items": _type_schema(slot.value_type, depth)}
        if isinstance(slot, d.Array):
            schema["minItems"] = schema["maxItems"] = int(slot.size)
        elif isinstance(slot, d.BoundedSequence):
            schema["maxItems"] = int(slot.maximum_size)
        return schema
    if isinstance(slot, d.NamespacedType):
        return _message_schema(_class_of(slot), depth + 1)
    raise RequestError(f"ros_type: field type {type(slot).__name__} has no JSON form")


def _message_schema(cls, depth: int = 0) -> Dict[str, Any]:
    if depth > _MAX_DEPTH:
        raise RequestError(f"ros_type: nesting deeper than {_MAX_DEPTH} levels")
    names = list(cls.get_fields_and_field_types())
    properties = {name: _type_schema(slot, depth) for name, slot in zip(names, cls.SLOT_TYPES)}
    return {"type": "object", "properties": properties, "required": names,
            "additionalProperties": False}


def schema_for(name: str) -> Dict[str, Any]:
    """The JSON Schema of the ROS interface type ``name`` (see the module docstring)."""
    cls = resolve_type(name)
    schema = _message_schema(cls)
    schema["title"] = name.strip()
    return schema


def schema_text_for(name: str) -> str:
    return json.dumps(schema_for(name), separators=(",", ":"))


def message_from_json(name_or_class, value: Any):
    """The message of type ``name_or_class`` (a type name or a message class) holding ``value``
    (a dict of its fields, as the schema describes; JSON text is parsed first). ValueError names
    the field that does not fit."""
    cls = resolve_type(name_or_class) if isinstance(name_or_class, str) else name_or_class
    if isinstance(value, str):
        value = json.loads(value)
    return _fill(cls, value, cls.__name__)


def _fill(cls, value: Any, where: str):
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected an object, got {type(value).__name__}")
    msg = cls()
    fields = cls.get_fields_and_field_types()
    unknown = set(value) - set(fields)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    for (name, _), slot in zip(fields.items(), cls.SLOT_TYPES):
        if name in value:
            setattr(msg, name, _convert(slot, value[name], f"{where}.{name}"))
    return msg


def _convert(slot, value: Any, where: str):
    from rosidl_parser import definition as d
    if isinstance(slot, d.BasicType):
        t = slot.typename
        if t == "boolean":
            if not isinstance(value, bool):
                raise ValueError(f"{where}: expected a boolean")
            return value
        if t in ("float", "double", "long double"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not math.isfinite(value):
                raise ValueError(f"{where}: expected a finite number")
            return float(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer")
        low, high = _INT_RANGES[t]
        if not low <= value <= high:
            raise ValueError(f"{where}: {value} is outside {t} ({low}..{high})")
        if t == "octet":
            return bytes([value])
        if t == "char":
            return chr(value)
        return value
    if isinstance(slot, d.AbstractGenericString):
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string")
        return value
    if isinstance(slot, d.AbstractNestedType):
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected an array")
        return [_convert(slot.value_type, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(slot, d.NamespacedType):
        return _fill(_class_of(slot), value, where)
    raise ValueError(f"{where}: field type {type(slot).__name__} has no JSON form")


def message_to_json(msg) -> Dict[str, Any]:
    """The JSON value (a dict) of ``msg``: the inverse of :func:`message_from_json`."""
    out: Dict[str, Any] = {}
    for (name, _), slot in zip(msg.get_fields_and_field_types().items(), msg.SLOT_TYPES):
        out[name] = _to_json(slot, getattr(msg, name))
    return out


def _to_json(slot, value: Any) -> Any:
    from rosidl_parser import definition as d
    if isinstance(slot, d.BasicType):
        if slot.typename == "octet":
            return value[0] if isinstance(value, (bytes, bytearray)) else int(value)
        if slot.typename == "char":
            return ord(value) if isinstance(value, str) else int(value)
        if slot.typename == "boolean":
            return bool(value)
        if slot.typename in ("float", "double", "long double"):
            return float(value)
        return int(value)
    if isinstance(slot, d.AbstractGenericString):
        return str(value)
    if isinstance(slot, d.AbstractNestedType):
        return [_to_json(slot.value_type, v) for v in value]
    if isinstance(slot, d.NamespacedType):
        return message_to_json(value)
    raise ValueError(f"field type {type(slot).__name__} has no JSON form")
