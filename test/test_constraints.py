"""Constrained output (response_format) on the core engine: the embedded SmolLM2 on llama_cpp and a
tiny random-weight model on transformers give valid output every time; bad formats are refused
with an error naming the problem; a cut or cancelled output is reported as such (issue 13).

Assertions are invariants (the output parses and validates), never one CPU's wording."""

import json
import re
import threading
import time
import uuid

import jsonschema
import pytest

pytest.importorskip("llguidance", reason="llguidance (the grammar engine) is not installed")

from engine_helpers import Collector, running_engine  # noqa: E402
from slm_ros.backends.base import BackendConfig  # noqa: E402
from slm_ros.backends.registry import create_backend  # noqa: E402
from slm_ros.core.constraints import ResponseFormat, parse_response_format  # noqa: E402
from slm_ros.core.engine import EngineConfig  # noqa: E402
from slm_ros.core.errors import RequestError  # noqa: E402
from slm_ros.core.types import FinishReason, Request, SamplingOverrides, SamplingParams  # noqa: E402
from slm_ros.models import resolve_model  # noqa: E402

#: A robot command: enum, number bounds, required fields, no other properties.
COMMAND = {
    "type": "object",
    "properties": {
        "action": {"enum": ["move", "turn", "stop", "pick", "place"]},
        "distance_m": {"type": "number", "minimum": 0, "maximum": 5},
        "speed": {"type": "integer", "minimum": 1, "maximum": 3},
        "target": {"type": "string", "maxLength": 16},
    },
    "required": ["action", "distance_m", "speed", "target"],
    "additionalProperties": False,
}
#: Nested arrays: waypoints of a path.
PATH = {
    "type": "object",
    "properties": {
        "waypoints": {"type": "array", "minItems": 1, "maxItems": 3,
                      "items": {"type": "array", "minItems": 2, "maxItems": 2,
                                "items": {"type": "integer", "minimum": -9, "maximum": 9}}},
        "loop": {"type": "boolean"},
    },
    "required": ["waypoints", "loop"],
    "additionalProperties": False,
}
PROMPTS = [
    "Move forward two meters, slowly.", "Stop right now!", "Turn left towards the door.",
    "Pick up the red box.", "Place the cup on the table.", "Go to the kitchen quickly.",
]
GREEDY = SamplingParams(max_new_tokens=96, temperature=0.0)


def ask(engine, prompt: str, fmt: ResponseFormat = None, tools=(), choice: str = "",
        timeout: float = 120.0, **sampling):
    """One request in a fresh session: (text, final chunk, every chunk)."""
    sink = Collector(timeout=timeout)
    rid = engine.submit(Request(prompt=prompt, session_id=uuid.uuid4().hex, response_format=fmt,
                                tools=tools, tool_choice=choice,
                                sampling=SamplingOverrides(**sampling)), sink)
    final = sink.final(rid)
    return sink.text(rid), final, sink.chunks[rid]


@pytest.fixture(scope="module")
def smollm2():
    backend = create_backend("llama_cpp")
    backend.load(BackendConfig(model=resolve_model("default", prefer_gguf=True).path))
    with running_engine(backend, EngineConfig(defaults=GREEDY)) as engine:
        yield engine
    backend.close()


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    backend = create_backend("transformers")
    backend.load(BackendConfig(model=tiny_model_dir, device="cpu", dtype="float32"))
    with running_engine(backend, EngineConfig(defaults=GREEDY)) as engine:
        yield engine
    backend.close()


# ----------------------------------------------------------------- valid every time

@pytest.mark.parametrize("schema", [COMMAND, PATH], ids=["command", "nested-arrays"])
def test_schema_output_always_validates_on_smollm2(smollm2, schema):
    fmt = ResponseFormat("json_schema", json.dumps(schema))
    for prompt in PROMPTS:
        text, final, chunks = ask(smollm2, prompt + " Answer with a JSON command.", fmt)
        assert final.finish_reason is FinishReason.STOP, (prompt, text, final.error)
        jsonschema.validate(json.loads(text), schema)
        assert "".join(c.text for c in chunks) == text   # streamed as usual


def test_sampled_output_validates_too(smollm2):
    fmt = ResponseFormat("json_schema", json.dumps(COMMAND))
    for seed in (1, 2, 3):
        text, final, _ = ask(smollm2, "Do something useful.", fmt, temperature=1.2, seed=seed)
        assert final.finish_reason is FinishReason.STOP, (text, final.error)
        jsonschema.validate(json.loads(text), COMMAND)


@pytest.mark.parametrize("engine_name", ["smollm2", "tiny"])
def test_regex_grammar_and_json_object(request, engine_name):
    engine = request.getfixturevalue(engine_name)
    regex = ResponseFormat("regex", "(yes|no), [0-9]{1,2}")
    text, final, _ = ask(engine, "Is the door open?", regex)
    assert final.finish_reason is FinishReason.STOP and re.fullmatch(r"(yes|no), [0-9]{1,2}", text)
    gbnf = 'root ::= "go " dir " " num "m"\ndir ::= "left" | "right"\nnum ::= [1-9]'
    text, final, _ = ask(engine, "Where should I go?", ResponseFormat("grammar", gbnf))
    assert final.finish_reason is FinishReason.STOP, final.error
    assert re.fullmatch(r"go (left|right) [1-9]m", text), text
    text, final, _ = ask(engine, "Describe the room as JSON.", ResponseFormat("json_object"),
                         max_new_tokens=200)
    if final.finish_reason is FinishReason.STOP:
        assert isinstance(json.loads(text), dict)
    else:   # a random model may write one long string: cut, and said so
        assert "output cut at max_new_tokens" in final.error, final.error


def test_random_weights_still_give_valid_commands(tiny):
    """The strongest proof that the constraint, not the model, makes the output valid."""
    fmt = ResponseFormat("json_schema", json.dumps(COMMAND))
    for prompt in PROMPTS:
        text, final, _ = ask(tiny, prompt, fmt, max_new_tokens=200)
        assert final.finish_reason is FinishReason.STOP, (prompt, text, final.error)
        jsonschema.validate(json.loads(text), COMMAND)


# ----------------------------------------------------------------- cut, cancelled, bad formats

def test_output_cut_by_max_new_tokens_is_an_error_with_its_text(smollm2):
    fmt = ResponseFormat("json_schema", json.dumps(COMMAND))
    text, final, _ = ask(smollm2, "Move forward.", fmt, max_new_tokens=4)
    assert final.finish_reason is FinishReason.ERROR
    assert "output cut at max_new_tokens before the JSON was complete" in final.error
    assert text.startswith("{")   # the partial output is kept


def test_cancel_mid_json_gives_cancelled_with_partial_text(tiny):
    schema = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
    sink = Collector(timeout=60)
    rid = tiny.submit(Request(prompt="Tell a story.", session_id=uuid.uuid4().hex,
                              response_format=ResponseFormat("json_schema", json.dumps(schema)),
                              sampling=SamplingOverrides(max_new_tokens=2000)), sink)
    deadline = time.monotonic() + 30
    while len(sink.chunks.get(rid, ())) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    tiny.cancel(rid)
    final = sink.final(rid)
    assert final.finish_reason is FinishReason.CANCELLED
    assert sink.text(rid).startswith('{"story":')


@pytest.mark.parametrize("fmt, expected", [
    (ResponseFormat("json_schema", "{not json"), "schema is not valid JSON"),
    (ResponseFormat("json_schema", '{"type": "foo"}'), "invalid JSON Schema"),
    (ResponseFormat("json_schema", json.dumps({"type": "object", "dependentSchemas": {"a": {}}})),
     "dependentSchemas"),
    (ResponseFormat("json_schema", ""), "schema is empty"),
    (ResponseFormat("regex", "(unclosed"), "unclosed group"),
    (ResponseFormat("regex", ""), "schema must hold the pattern"),
    (ResponseFormat("grammar", 'root ::= ("a"'), "syntax error"),
    (ResponseFormat("grammar", 'root ::= missing'), "missing"),
    (ResponseFormat("ros_message", "", "geometry_msgs/msg/Twist"), "ROS node"),
], ids=["json", "schema", "unsupported-keyword", "empty", "regex", "empty-regex", "gbnf-syntax",
        "gbnf-undefined", "ros-without-node"])
def test_bad_formats_get_an_error_naming_the_problem(smollm2, fmt, expected):
    text, final, chunks = ask(smollm2, "Hello", fmt)
    assert final.finish_reason is FinishReason.ERROR and expected in final.error, final.error
    assert text == "" and len(chunks) == 1
    # ... and the engine keeps serving
    text, final, _ = ask(smollm2, "Say yes.", ResponseFormat("regex", "yes"))
    assert final.finish_reason is FinishReason.STOP and text == "yes"


def test_unknown_format_type_is_refused():
    with pytest.raises(RequestError, match="response_format.type 'xml' is not one of"):
        parse_response_format("xml", "")
    assert not parse_response_format("", "").constrained
    assert not parse_response_format("TEXT", "").constrained


def test_compiled_formats_are_cached_and_cheap():
    from slm_ros.core.constraints import compile_format
    fmt = ResponseFormat("json_schema", json.dumps(COMMAND))
    first = compile_format(fmt)
    t0 = time.perf_counter()
    for _ in range(100):
        assert compile_format(fmt) is first
    assert time.perf_counter() - t0 < 1.0   # generous: a cache hit is microseconds


# ----------------------------------------------------------------- tools

from slm_ros.core.constraints import CALL_OPEN, Tool  # noqa: E402

TOOLS = (
    Tool("navigate_to", "Drive the robot to a named place.",
         json.dumps({"type": "object", "additionalProperties": False, "required": ["place"],
                     "properties": {"place": {"enum": ["kitchen", "door", "dock"]}}})),
    Tool("set_speed", "Set the driving speed in m/s.",
         json.dumps({"type": "object", "additionalProperties": False, "required": ["speed"],
                     "properties": {"speed": {"type": "number", "minimum": 0, "maximum": 1}}})),
)
SCHEMAS = {t.name: json.loads(t.parameters) for t in TOOLS}


def call(engine, prompt: str, tools=TOOLS, choice: str = "", **sampling):
    text, final, _ = ask(engine, prompt, tools=tools, choice=choice, **sampling)
    return text, final


@pytest.mark.parametrize("engine_name", ["smollm2", "tiny"])
def test_required_tool_choice_gives_exactly_one_valid_call(request, engine_name):
    engine = request.getfixturevalue(engine_name)
    for prompt in ("Go to the kitchen.", "Slow down please.", "Dock now."):
        text, final = call(engine, prompt, choice="required", max_new_tokens=128)
        assert final.finish_reason is FinishReason.STOP, (text, final.error)
        assert len(final.tool_calls) == 1, final
        tool_call = final.tool_calls[0]
        assert tool_call.name in SCHEMAS and tool_call.id
        jsonschema.validate(json.loads(tool_call.arguments), SCHEMAS[tool_call.name])


def test_a_named_tool_choice_forces_that_tool(smollm2):
    text, final = call(smollm2, "Go to the kitchen.", choice="set_speed")
    assert [c.name for c in final.tool_calls] == ["set_speed"], (text, final.error)
    jsonschema.validate(json.loads(final.tool_calls[0].arguments), SCHEMAS["set_speed"])


@pytest.mark.parametrize("engine_name", ["smollm2", "tiny"])
def test_auto_answers_in_text_or_with_one_valid_call(request, engine_name):
    engine = request.getfixturevalue(engine_name)
    for prompt in ("Please drive to the door.", "What is your name?"):
        text, final = call(engine, prompt, max_new_tokens=96)
        if final.tool_calls:
            assert final.finish_reason is FinishReason.STOP and text.startswith(CALL_OPEN)
            tool_call = final.tool_calls[0]
            jsonschema.validate(json.loads(tool_call.arguments), SCHEMAS[tool_call.name])
        else:   # plain text: never a half-written call passed as an answer
            assert final.finish_reason in (FinishReason.STOP, FinishReason.LENGTH), final.error
            assert not text.startswith("<")


def test_tool_choice_none_ignores_the_tools(smollm2):
    text, final = call(smollm2, "Say hello.", choice="none", max_new_tokens=16)
    assert final.finish_reason in (FinishReason.STOP, FinishReason.LENGTH) and not final.tool_calls


@pytest.mark.parametrize("tools, choice, fmt, expected", [
    (TOOLS + (Tool("set_speed"),), "", None, "duplicate tool name 'set_speed'"),
    (TOOLS, "fly", None, "tool_choice 'fly' names no tool"),
    ((Tool("bad", "", "{"),), "", None, "schema is not valid JSON"),
    ((Tool(""),), "", None, "empty name"),
    (TOOLS, "required", ResponseFormat("json_object"), "cannot be combined"),
], ids=["duplicate", "unknown-choice", "bad-schema", "empty-name", "with-response-format"])
def test_bad_tool_requests_get_an_error_naming_the_problem(smollm2, tools, choice, fmt, expected):
    _, final, _ = ask(smollm2, "Go.", fmt, tools=tools, choice=choice, timeout=60)
    assert final.finish_reason is FinishReason.ERROR and expected in final.error, final.error


# ----------------------------------------------------------------- tools through the chat template

#: Two chat templates written for these tests, one per tool-call syntax slm_ros knows: the tagged
#: form (as Qwen2.5 / Hermes-style templates ask for it) and a bare JSON object with "parameters"
#: (as Llama 3.1 / 3.2 ask for it).
TAGGED_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call functions. Their JSON signatures:\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "To call one, reply with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>."
    "<|im_end|>\n{% endif %}"
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}"
    "<|im_end|>\n{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PARAMETERS_TEMPLATE = (
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n"
    "{% if tools and loop.last %}Functions you can call:\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "Respond in the format {\"name\": function name, \"parameters\": dictionary of arguments}.\n"
    "{% endif %}{{ message.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module", params=[("tagged", TAGGED_TEMPLATE),
                                        ("json_parameters", PARAMETERS_TEMPLATE)],
                ids=["tagged", "json_parameters"])
def templated(request, tiny_model_dir, tmp_path_factory):
    """The tiny random model with a chat template that renders tools: (syntax, backend, engine)."""
    import shutil
    from pathlib import Path
    syntax, template = request.param
    out = tmp_path_factory.mktemp(f"tiny-{syntax}")
    for path in Path(tiny_model_dir).iterdir():
        shutil.copy(path, out / path.name)
    (out / "chat_template.jinja").write_text(template)
    backend = create_backend("transformers")
    backend.load(BackendConfig(model=str(out), device="cpu", dtype="float32"))
    with running_engine(backend, EngineConfig(defaults=GREEDY)) as engine:
        yield syntax, backend, engine
    backend.close()


def test_the_embedded_models_template_renders_no_tools_so_the_generic_form_is_used(smollm2):
    from slm_ros.core.constraints import detect_tool_syntax
    assert smollm2._backend.tool_syntax() == "generic"
    assert detect_tool_syntax("a template without the probe") == "generic"


def test_a_template_that_renders_tools_gets_them_and_its_own_call_form(templated):
    from slm_ros.core.constraints import plan_tools
    syntax, backend, engine = templated
    assert backend.tool_syntax() == syntax
    plan = plan_tools(TOOLS, "", syntax)
    assert plan.prompt == "" and [t["function"]["name"] for t in plan.template_tools] == \
        ["navigate_to", "set_speed"]
    prompt = backend.decode(backend.apply_chat_template(
        [{"role": "user", "content": "Go."}], tools=plan.template_tools))
    assert "navigate_to" in prompt and "You can call these tools" not in prompt
    key = "parameters" if syntax == "json_parameters" else "arguments"
    for choice in ("required", ""):   # random weights: the grammar alone makes the call valid
        for prompt in ("Go to the kitchen.", "Slow down please."):
            text, final = call(engine, prompt, choice=choice, max_new_tokens=96)
            if not final.tool_calls:
                assert choice == "" and final.finish_reason is not FinishReason.ERROR, final.error
                assert not text.lstrip().startswith("{" if key == "parameters" else "<")
                continue
            assert final.finish_reason is FinishReason.STOP, (text, final.error)
            (tool_call,) = final.tool_calls
            jsonschema.validate(json.loads(tool_call.arguments), SCHEMAS[tool_call.name])
            body = text.strip()
            if choice == "" and syntax == "tagged":
                body = body[len(CALL_OPEN):-len("</tool_call>")]
            assert set(json.loads(body)) == {"name", key}
