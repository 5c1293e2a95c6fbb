"""Constrained output through the LLM node (real rclpy and DDS across processes, the embedded
SmolLM2 on llama_cpp): a ROS message type as the response format gives JSON that converts into
that message; a JSON Schema through the action; bad formats get error results and the node keeps
serving (issue 13)."""

import json
import uuid

import jsonschema
import pytest

pytest.importorskip("llguidance", reason="llguidance (the grammar engine) is not installed")
pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")

from ros_helpers import LlmClient, NodeProcess, wait_future  # noqa: E402
from slm_ros.action import Generate  # noqa: E402
from slm_ros.msg import ResponseFormat  # noqa: E402
from slm_ros.ros.ros_schema import message_from_json  # noqa: E402

LLM = dict(backend="llama_cpp", model="default", default_max_new_tokens=128,
           max_context_tokens=1024)
COMMAND = {"type": "object", "additionalProperties": False, "required": ["action", "speed"],
           "properties": {"action": {"enum": ["forward", "back", "stop"]},
                          "speed": {"type": "number", "minimum": 0, "maximum": 1}}}


@pytest.fixture(scope="module")
def node_and_client(tmp_path_factory):
    from domain_coordinator import domain_id as reserve
    with reserve() as did:
        tmp = tmp_path_factory.mktemp("constraints")
        node = NodeProcess(did, tmp / "llm.log", **LLM)
        client = None
        try:
            assert node.wait_for_log("active: serving", 120), node.log()
            client = LlmClient(did)
            client.wait_ready()
            yield node, client
        finally:
            if client is not None:
                client.close()
            assert node.stop() == 0, node.log()


def ask(client, prompt: str, **fmt):
    rid = f"c-{uuid.uuid4().hex[:8]}"
    client.request(prompt, rid, session_id=rid, response_format=ResponseFormat(**fmt))
    return client.wait_final(rid, 120), "".join(c.text for c in client.chunks[rid])


def test_ros_message_type_gives_that_message(node_and_client):
    _, client = node_and_client
    for prompt in ("Drive forward slowly.", "Turn left on the spot.", "Back up a little."):
        final, text = ask(client, prompt, type=ResponseFormat.TYPE_ROS_MESSAGE,
                          ros_type="geometry_msgs/msg/Twist")
        assert final.finish_reason == "stop", (final.error, text)
        twist = message_from_json("geometry_msgs/msg/Twist", text)
        assert type(twist).__name__ == "Twist"


def test_json_schema_through_the_action(node_and_client):
    _, client = node_and_client
    goal = Generate.Goal()
    goal.request.prompt = "Go forward at half speed."
    goal.request.response_format.type = ResponseFormat.TYPE_JSON_SCHEMA
    goal.request.response_format.schema = json.dumps(COMMAND)
    handle = wait_future(client.action.send_goal_async(goal))
    result = wait_future(handle.get_result_async(), timeout=120).result
    assert result.finish_reason == "stop", result.error
    jsonschema.validate(json.loads(result.text), COMMAND)


@pytest.mark.parametrize("fmt, expected", [
    (dict(type="ros_message", ros_type="geometry_msgs/msg/NoSuch"), "no such interface"),
    (dict(type="ros_message"), "ros_type is empty"),
    (dict(type="yaml"), "response_format.type 'yaml' is not one of"),
    (dict(type="json_schema", schema="{"), "schema is not valid JSON"),
])
def test_bad_formats_get_error_results_and_the_node_keeps_serving(node_and_client, fmt, expected):
    _, client = node_and_client
    final, text = ask(client, "Hello", **fmt)
    assert final.finish_reason == "error" and expected in final.error, final.error
    final, text = ask(client, "Say yes.", type="regex", schema="yes")
    assert final.finish_reason == "stop" and text == "yes"


def test_tool_calls_come_back_on_the_final_chunk_and_the_result(node_and_client):
    from slm_ros.msg import Tool
    _, client = node_and_client
    tools = [Tool(name="drive", description="Send a velocity command.",
                  ros_type="geometry_msgs/msg/Twist"),
             Tool(name="dock", description="Go back to the charger.",
                  parameters='{"type": "object", "properties": {}, "additionalProperties": false}')]
    rid = f"t-{uuid.uuid4().hex[:8]}"
    client.request("Drive forward slowly.", rid, session_id=rid, tools=tools,
                   tool_choice="required")
    final = client.wait_final(rid, 120)
    assert final.finish_reason == "stop", final.error
    assert len(final.tool_calls) == 1 and final.tool_calls[0].name in ("drive", "dock")
    tool_call = final.tool_calls[0]
    if tool_call.name == "drive":
        message_from_json("geometry_msgs/msg/Twist", tool_call.arguments)
    # through the action: the result carries the call too
    goal = Generate.Goal()
    goal.request.prompt = "Go charge."
    goal.request.tools = tools
    goal.request.tool_choice = "dock"
    handle = wait_future(client.action.send_goal_async(goal))
    result = wait_future(handle.get_result_async(), timeout=120).result
    assert result.finish_reason == "stop", result.error
    assert [c.name for c in result.tool_calls] == ["dock"]
    assert json.loads(result.tool_calls[0].arguments) == {}
