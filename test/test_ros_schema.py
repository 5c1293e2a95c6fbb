"""ROS interface types as JSON Schemas, and JSON values to and from their messages: every field
kind, both ways (slm_ros/ros/ros_schema.py, issue 13)."""

import json

import jsonschema
import pytest
from rosidl_parser import definition as d

from slm_ros.core.errors import RequestError
from slm_ros.ros import ros_schema
from slm_ros.ros.ros_schema import message_from_json, message_to_json, resolve_type, schema_for


def round_trip(type_name: str, value: dict) -> dict:
    """value -> schema check -> message -> JSON again; returns the result."""
    jsonschema.validate(value, schema_for(type_name))
    msg = message_from_json(type_name, json.dumps(value))
    back = message_to_json(msg)
    jsonschema.validate(back, schema_for(type_name))
    return back


def test_twist_schema_is_two_vectors_of_numbers():
    schema = schema_for("geometry_msgs/msg/Twist")
    assert schema["required"] == ["linear", "angular"] and not schema["additionalProperties"]
    vector = schema["properties"]["linear"]
    assert vector["required"] == ["x", "y", "z"]
    assert vector["properties"]["x"] == {"type": "number"}
    value = {"linear": {"x": 0.5, "y": 0.0, "z": 0.0}, "angular": {"x": 0.0, "y": 0.0, "z": -1.25}}
    assert round_trip("geometry_msgs/msg/Twist", value) == value


@pytest.mark.parametrize("type_name, value", [
    ("std_msgs/msg/Bool", {"data": True}),
    ("std_msgs/msg/Byte", {"data": 255}),
    ("std_msgs/msg/Char", {"data": 65}),
    ("std_msgs/msg/Int8", {"data": -128}),
    ("std_msgs/msg/UInt8", {"data": 255}),
    ("std_msgs/msg/Int16", {"data": -32768}),
    ("std_msgs/msg/UInt16", {"data": 65535}),
    ("std_msgs/msg/Int32", {"data": -2 ** 31}),
    ("std_msgs/msg/UInt32", {"data": 2 ** 32 - 1}),
    ("std_msgs/msg/Int64", {"data": -2 ** 63}),
    ("std_msgs/msg/UInt64", {"data": 2 ** 64 - 1}),
    ("std_msgs/msg/Float32", {"data": 1.5}),
    ("std_msgs/msg/Float64", {"data": -2.25}),
    ("std_msgs/msg/String", {"data": "héllo"}),
    ("builtin_interfaces/msg/Time", {"sec": 12, "nanosec": 345}),
    ("std_msgs/msg/Float64MultiArray",
     {"layout": {"dim": [{"label": "rows", "size": 2, "stride": 2}], "data_offset": 0},
      "data": [1.0, 2.0]}),
], ids=lambda v: v if isinstance(v, str) else "")
def test_every_basic_field_kind_round_trips(type_name, value):
    assert round_trip(type_name, value) == value


def test_fixed_arrays_nested_headers_and_unbounded_sequences_round_trip():
    value = message_to_json(resolve_type("sensor_msgs/msg/CameraInfo")())
    value["header"] = {"stamp": {"sec": 1, "nanosec": 2}, "frame_id": "camera"}
    value["k"] = [float(i) for i in range(9)]
    value["d"] = [0.1, 0.2]
    value["distortion_model"] = "plumb_bob"
    schema = schema_for("sensor_msgs/msg/CameraInfo")
    assert schema["properties"]["k"]["minItems"] == schema["properties"]["k"]["maxItems"] == 9
    assert "maxItems" not in schema["properties"]["d"]
    assert round_trip("sensor_msgs/msg/CameraInfo", value) == value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**value, "k": [0.0] * 8}, schema)


def test_integer_ranges_follow_the_width():
    props = {n: schema_for(f"std_msgs/msg/{n}")["properties"]["data"]
             for n in ("Int8", "UInt8", "Int64", "UInt64", "Float32")}
    assert (props["Int8"]["minimum"], props["Int8"]["maximum"]) == (-128, 127)
    assert (props["UInt8"]["minimum"], props["UInt8"]["maximum"]) == (0, 255)
    assert props["UInt64"]["maximum"] == 2 ** 64 - 1 and props["Int64"]["minimum"] == -2 ** 63
    assert props["Float32"]["type"] == "number" and props["Float32"]["maximum"] > 3e38


def test_bounded_strings_and_sequences_get_their_bounds():
    # rosidl's own definitions, as a message with `string<=8 name` and `int32[<=3] ids` has them
    assert ros_schema._type_schema(d.BoundedString(8), 0) == {"type": "string", "maxLength": 8}
    assert ros_schema._type_schema(d.BoundedSequence(d.BasicType("int32"), 3), 0) == {
        "type": "array", "maxItems": 3,
        "items": {"type": "integer", "minimum": -2 ** 31, "maximum": 2 ** 31 - 1}}


def test_action_goals_and_service_requests():
    goal = schema_for("slm_ros/action/Generate")
    assert "request" in goal["properties"]
    request = goal["properties"]["request"]
    assert "response_format" in request["properties"]   # nested message of this package
    assert schema_for("lifecycle_msgs/srv/ChangeState")["required"] == ["transition"]


def test_values_that_do_not_fit_name_the_field():
    with pytest.raises(ValueError, match=r"Int8.data: 300 is outside int8"):
        message_from_json("std_msgs/msg/Int8", {"data": 300})
    with pytest.raises(ValueError, match=r"Twist.linear.x: expected a finite number"):
        message_from_json("geometry_msgs/msg/Twist", {"linear": {"x": "fast"}})
    with pytest.raises(ValueError, match="unknown field"):
        message_from_json("std_msgs/msg/Bool", {"data": True, "extra": 1})


@pytest.mark.parametrize("name, expected", [
    ("geometry_msgs/msg/NoSuchType", "no such interface is installed"),
    ("no_such_pkg/msg/Thing", "no such interface is installed"),
    ("Twist", "not a ROS interface type name"),
    ("geometry_msgs/foo/Twist", "not a ROS interface type name"),
])
def test_unknown_types_are_clear_errors(name, expected):
    with pytest.raises(RequestError, match=expected):
        schema_for(name)
