"""Constrained output: a request's response format compiled to a grammar, enforced token by token,
and the finished text validated before the request is called a success. ROS-free.

Grammar engine: llguidance (PyPI ``llguidance``), shared by every local backend. At each decoding
step the request's :class:`TokenConstraint` computes which tokens keep the output valid (a bitmask
over the vocabulary, tens of microseconds) and the backend sets every other token's logit to -inf
before sampling; after sampling the token is fed to the matcher. So even a random-weight model emits
output that parses. Why llguidance: one abi3 wheel with no dependencies (x86-64 and aarch64, Python
3.10+, so JetPack 6 too; xgrammar pulls in torch, and triton on x86), no per-grammar precompilation
(a new schema costs microseconds, not a vocabulary-sized mask table), JSON Schema with a clear error
for the keywords it does not implement, regular expressions, and Lark grammars (GBNF is converted).

A :class:`ResponseFormat` says what the output must be:

* ``json_object`` - any JSON object; ``json_schema`` - JSON valid against ``schema`` (JSON Schema
  text); ``regex`` - text matching the pattern ``schema`` whole; ``grammar`` - text in the
  language of the GBNF grammar ``schema`` (llama.cpp's EBNF dialect, start symbol ``root``);
* ``ros_message`` - JSON of the ROS interface type ``ros_type``: the node turns the type into a JSON
  Schema (:mod:`slm_ros.ros.ros_schema`) before the engine sees it;
* ``""`` / ``text`` - free text (no constraint).

Every constrained result is checked when generation ends (:meth:`Constraint.problem`): JSON must
parse and validate against the schema (the ``jsonschema`` package), a regex must match the whole
text, a grammar's matcher must be in an accepting state. A request cut by ``max_new_tokens`` before
its output was complete ends with an error naming that, its text kept.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from typing import Any, Optional

from slm_ros.core.errors import RequestError

#: ``ResponseFormat.type`` values (``msg/ResponseFormat.msg`` has a constant for each).
TEXT, JSON_OBJECT, JSON_SCHEMA, REGEX, GRAMMAR, ROS_MESSAGE = (
    "text", "json_object", "json_schema", "regex", "grammar", "ros_message")
FORMAT_TYPES = ("", TEXT, JSON_OBJECT, JSON_SCHEMA, REGEX, GRAMMAR, ROS_MESSAGE)
#: Compiled constraints kept (per distinct format), least recently used dropped.
CACHE_SIZE = 128


@dataclasses.dataclass(frozen=True)
class ResponseFormat:
    """What a request's output must be (see the module docstring); empty = free text."""

    type: str = ""
    schema: str = ""
    ros_type: str = ""

    @property
    def constrained(self) -> bool:
        return self.type not in ("", TEXT)


@dataclasses.dataclass(frozen=True)
class Constraint:
    """A validated response format: the llguidance grammar that enforces it and what the finished
    text is checked against."""

    kind: str
    grammar: str
    schema: Optional[Any] = dataclasses.field(default=None, compare=False)
    pattern: str = ""
    #: The request's GBNF text (``grammar`` formats only): for grammar engines other than llguidance
    #: (TensorRT-LLM 1.x runs xgrammar, which reads GBNF-style EBNF).
    gbnf: str = ""

    @property
    def what(self) -> str:
        return {JSON_OBJECT: "the JSON", JSON_SCHEMA: "the JSON", REGEX: "the text matching the "
                "regex", GRAMMAR: "the text of the grammar"}.get(self.kind, "the output")

    def problem(self, text: str, complete: bool, cut: bool) -> str:
        """Why ``text`` (the whole output) is not a valid result, or "" when it is. ``complete``:
        the matcher accepted the output as finished; ``cut``: generation stopped at
        max_new_tokens (or the context)."""
        if cut and not complete:
            return (f"output cut at max_new_tokens before {self.what} was complete "
                    f"({len(text)} characters generated); raise max_new_tokens")
        if self.kind in (JSON_OBJECT, JSON_SCHEMA):
            try:
                value = json.loads(text)
            except ValueError as exc:
                return f"output is not valid JSON: {exc}"
            if self.kind == JSON_OBJECT and not isinstance(value, dict):
                return "output is JSON but not an object"
            if self.schema is not None:
                import jsonschema
                try:
                    jsonschema.validate(value, self.schema)
                except jsonschema.ValidationError as exc:
                    return (f"output does not validate against the schema at {_path(exc)}: "
                            f"{exc.message}")
            return ""
        if self.kind == REGEX:
            try:
                matched = re.fullmatch(self.pattern, text) is not None
            except re.error:   # a pattern in the grammar engine's dialect only
                matched = complete
            return "" if matched else "output does not match the regex"
        return "" if complete else "output is not a complete sentence of the grammar"


def parse_response_format(type_: str, schema: str, ros_type: str = "") -> ResponseFormat:
    """A ResponseFormat from wire fields; RequestError naming a bad type."""
    kind = (type_ or "").strip().lower()
    if kind not in FORMAT_TYPES:
        raise RequestError(f"response_format.type {type_!r} is not one of "
                           f"{', '.join(t for t in FORMAT_TYPES if t)}")
    return ResponseFormat(kind, schema or "", (ros_type or "").strip())


@functools.lru_cache(maxsize=CACHE_SIZE)
def compile_format(fmt: ResponseFormat) -> Optional[Constraint]:
    """The :class:`Constraint` for ``fmt`` (None for free text), cached per format; RequestError
    naming the problem for a format that cannot be enforced."""
    import llguidance
    matcher = llguidance.LLMatcher
    if not fmt.constrained:
        return None
    if fmt.type == ROS_MESSAGE:
        raise RequestError("response_format ros_message: the ROS type must be turned into a JSON "
                           "Schema by the ROS node (slm_ros.ros.ros_schema) before generation")
    if fmt.type in (JSON_OBJECT, JSON_SCHEMA):
        if fmt.type == JSON_OBJECT and not fmt.schema.strip():
            schema: Any = {"type": "object"}
        else:
            schema = _load_schema(fmt.schema)
        grammar = _checked(matcher, lambda: matcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False}), "JSON Schema")
        return Constraint(fmt.type, grammar, schema=schema)
    if not fmt.schema:
        raise RequestError(f"response_format {fmt.type}: schema must hold the "
                           f"{'pattern' if fmt.type == REGEX else 'grammar'} (it is empty)")
    if fmt.type == REGEX:
        grammar = _checked(matcher, lambda: matcher.grammar_from_regex(fmt.schema), "regex")
        return Constraint(REGEX, grammar, pattern=fmt.schema)
    from llguidance.gbnf_to_lark import gbnf_to_lark
    try:
        lark = gbnf_to_lark(fmt.schema)
    except Exception as exc:  # noqa: BLE001 - GbnfToLarkError and friends carry line/column
        raise RequestError(f"response_format grammar: syntax error: {exc}") from None
    grammar = _checked(matcher, lambda: matcher.grammar_from_lark(lark), "grammar")
    return Constraint(GRAMMAR, grammar, gbnf=fmt.schema)


def _load_schema(text: str) -> Any:
    if not text.strip():
        raise RequestError("response_format json_schema: schema is empty (a JSON Schema text)")
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise RequestError(f"response_format json_schema: schema is not valid JSON: {exc}") \
            from None
    if not isinstance(schema, (dict, bool)):
        raise RequestError("response_format json_schema: schema must be a JSON object")
    import jsonschema
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise RequestError(f"response_format json_schema: invalid JSON Schema at {_path(exc)}: "
                           f"{exc.message}") from None
    return schema


def _path(exc) -> str:
    """Where in the document a jsonschema error is: ``a/0/b``, or ``(root)``."""
    return "/".join(str(p) for p in exc.absolute_path) or "(root)"


def _checked(matcher, build, what: str) -> str:
    try:
        grammar = build()
    except Exception as exc:  # noqa: BLE001 - llguidance raises ValueError and RuntimeError
        raise RequestError(f"response_format {what}: {exc}") from None
    error = matcher.validate_grammar(grammar)
    if error:
        raise RequestError(f"response_format {what} cannot be enforced: {error.strip()}")
    return grammar


class TokenConstraint:
    """One request's constraint state over a backend's vocabulary: ``mask(logits)`` before each
    sampling step, ``accept(token)`` after it (both on the generating thread)."""

    def __init__(self, constraint: Constraint, tokenizer, vocab_size: int) -> None:
        import llguidance
        import numpy as np
        self.constraint = constraint
        self._matcher = llguidance.LLMatcher(tokenizer, constraint.grammar)
        if self._matcher.is_error():
            raise RequestError(f"response_format cannot be enforced: {self._matcher.get_error()}")
        self._bits = np.empty((vocab_size + 31) // 32, dtype=np.int32)
        self._vocab = vocab_size
        self.rejected = ""

    def allowed(self):
        """Boolean array over the vocabulary: the tokens that keep the output valid."""
        import numpy as np
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        return np.unpackbits(self._bits.view(np.uint8), bitorder="little")[:self._vocab] \
            .view(bool)

    def mask(self, logits) -> None:
        """Set the logits of every token that would break the output to -inf (in place; a 1-D
        numpy array over the vocabulary or longer). ~0.05-0.3 ms for 49k tokens."""
        import numpy as np
        allowed = self.allowed()
        n = min(len(allowed), logits.shape[-1])
        np.putmask(logits[..., :n], ~allowed[:n], float("-inf"))
        if logits.shape[-1] > n:
            logits[..., n:] = float("-inf")

    def accept(self, token: int) -> bool:
        """Feed the sampled token; False (reason in ``rejected``) if the grammar refused it."""
        if not self._matcher.consume_token(int(token)):
            self.rejected = self._matcher.get_error() or f"token {token} refused"
            return False
        return True

    @property
    def done(self) -> bool:
        """The output is complete and nothing may follow (generation should stop)."""
        return self._matcher.is_stopped()

    @property
    def complete(self) -> bool:
        """What was generated so far is a whole valid output."""
        return self._matcher.is_accepting()


# -- tools ---------------------------------------------------------------------------------------

#: ``tool_choice`` values besides a tool's name.
TOOL_AUTO, TOOL_NONE, TOOL_REQUIRED = "auto", "none", "required"
#: The generic tool-call form of ``auto`` (described in the system prompt): the call's JSON between
#: these tags; an answer that does not start with the opening tag is plain text.
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"

#: How a model calls tools (:func:`detect_tool_syntax`). ``generic``: the chat template does not
#: render tools, so slm_ros describes them in the system prompt and asks for the tagged form.
#: ``tagged``: the template renders the tools and asks for ``<tool_call>{"name": ..., "arguments":
#: ...}</tool_call>`` (Qwen2.5, Hermes-style templates). ``json_parameters``: the template renders
#: them and asks for a bare ``{"name": ..., "parameters": ...}`` (Llama 3.1 / 3.2).
SYNTAX_GENERIC, SYNTAX_TAGGED, SYNTAX_JSON_PARAMETERS = "generic", "tagged", "json_parameters"
#: A tool rendered through a chat template to see whether, and how, it shows tools.
PROBE_TOOL_NAME = "slm_ros_probe_tool"


def detect_tool_syntax(rendered: str) -> str:
    """The tool-call syntax a chat template teaches, from its rendering of a conversation with the
    tool :data:`PROBE_TOOL_NAME` (see :func:`probe_tools`): ``generic`` when the probe does not
    appear (the template ignores tools) or the call form is not one slm_ros knows."""
    if PROBE_TOOL_NAME not in rendered:
        return SYNTAX_GENERIC
    if CALL_OPEN in rendered:
        return SYNTAX_TAGGED
    if re.search(r'\{\s*"name"\s*:[^{}]*"parameters"\s*:', rendered):
        return SYNTAX_JSON_PARAMETERS
    return SYNTAX_GENERIC


@dataclasses.dataclass(frozen=True)
class Tool:
    """A tool the model may call: ``parameters`` is the JSON Schema of its arguments (an object;
    empty = any object)."""

    name: str
    description: str = ""
    parameters: str = ""

    def function(self) -> dict:
        """The tool as an OpenAI-style function tool (what chat templates' ``tools=`` and the
        OpenAI API take)."""
        parameters = json.loads(self.parameters) if self.parameters.strip() else {"type": "object"}
        function = {"name": self.name, "parameters": parameters}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


def probe_tools() -> list:
    """The tools list a chat template is rendered with by :func:`detect_tool_syntax`'s callers."""
    return [Tool(PROBE_TOOL_NAME, "Probe.", '{"type": "object", "properties": {}}').function()]


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One call the model made: ``arguments`` is JSON text valid against the tool's schema."""

    id: str
    name: str
    arguments: str


@dataclasses.dataclass(frozen=True)
class ToolPlan:
    """How a request's tools run: the constraint on the output, the text added to the system
    prompt so the model knows what it may call, and how calls are read back."""

    mode: str                      # "required" (output is exactly one call) or "auto"
    constraint: Constraint
    prompt: str                    # added to the system prompt ("" when the template renders them)
    schemas: Any = dataclasses.field(compare=False, default=None)   # tool name -> schema
    syntax: str = SYNTAX_GENERIC
    #: The tools as OpenAI-style functions for the chat template (empty for ``generic``).
    template_tools: tuple = ()

    @property
    def arguments_key(self) -> str:
        return "parameters" if self.syntax == SYNTAX_JSON_PARAMETERS else "arguments"

    def calls(self, text: str, request_id: str) -> tuple:
        """The tool calls in the finished output ``text`` (empty for a plain answer in auto);
        RequestError when a call does not validate."""
        body = text
        if self.mode == TOOL_AUTO:
            stripped = text.strip()
            if self.syntax == SYNTAX_JSON_PARAMETERS:
                if not stripped.startswith("{"):
                    return ()
                body = stripped
            else:
                if not stripped.startswith(CALL_OPEN):
                    return ()
                body = stripped[len(CALL_OPEN):]
                if body.endswith(CALL_CLOSE):
                    body = body[:-len(CALL_CLOSE)]
        try:
            value = json.loads(body)
        except ValueError as exc:
            raise RequestError(f"tool call is not valid JSON: {exc}") from None
        if not isinstance(value, dict) or value.get("name") not in self.schemas:
            raise RequestError(f"tool call names no listed tool: {str(value)[:200]}")
        import jsonschema
        arguments = value.get(self.arguments_key, {})
        try:
            jsonschema.validate(arguments, self.schemas[value["name"]])
        except jsonschema.ValidationError as exc:
            raise RequestError(f"tool call arguments of {value['name']!r} do not validate: "
                               f"{exc.message}") from None
        return (ToolCall(f"call_{request_id[:12]}_0", value["name"],
                         json.dumps(arguments, separators=(",", ":"))),)


    def server_calls(self, raw, request_id: str, choice: str) -> tuple:
        """Validate the tool calls a remote server returned (``raw``: (id, name, arguments JSON
        text) each) against this plan and ``choice``; RequestError naming what is wrong (a server
        may ignore tool_choice or invent a tool). Ids are kept when unique, else made unique."""
        import jsonschema
        if not raw:
            if self.mode == TOOL_REQUIRED:
                raise RequestError(f"tool_choice {choice or TOOL_REQUIRED!r} asked for a tool call "
                                   f"and the server answered without one (some servers, e.g. "
                                   f"Ollama, ignore tool_choice)")
            return ()
        if self.mode == TOOL_REQUIRED and len(raw) != 1:
            raise RequestError(f"tool_choice {choice or TOOL_REQUIRED!r} asked for one tool call and "
                               f"the server returned {len(raw)}")
        calls, ids = [], set()
        for i, (call_id, name, arguments) in enumerate(raw):
            allowed = [choice] if choice not in ("", TOOL_AUTO, TOOL_REQUIRED) else self.schemas
            if name not in allowed:
                raise RequestError(f"the server called {name!r}, which is not "
                                   f"{'the chosen tool' if len(allowed) == 1 else 'a listed tool'} "
                                   f"({', '.join(allowed)})")
            try:
                value = json.loads(arguments or "{}")
            except ValueError as exc:
                raise RequestError(f"tool call {name!r}: arguments are not valid JSON: {exc}") \
                    from None
            try:
                jsonschema.validate(value, self.schemas[name])
            except jsonschema.ValidationError as exc:
                raise RequestError(f"tool call arguments of {name!r} do not validate: "
                                   f"{exc.message}") from None
            if not call_id or call_id in ids:
                call_id = f"call_{request_id[:12]}_{i}"
            ids.add(call_id)
            calls.append(ToolCall(call_id, name, json.dumps(value, separators=(",", ":"))))
        return tuple(calls)


def plan_tools(tools, choice: str, syntax: str = SYNTAX_GENERIC) -> Optional[ToolPlan]:
    """The :class:`ToolPlan` for ``tools`` and ``tool_choice`` (None: no tools apply) in the
    model's tool-call ``syntax`` (:func:`detect_tool_syntax`); RequestError for duplicate names,
    a choice naming no tool, or a bad parameters schema."""
    choice = (choice or "").strip()
    if not tools or choice == TOOL_NONE:
        if choice not in ("", TOOL_AUTO, TOOL_NONE, TOOL_REQUIRED):
            raise RequestError(f"tool_choice {choice!r} names no tool (no tools were given)")
        return None
    schemas = {}
    lines = []
    for tool in tools:
        name = (tool.name or "").strip()
        if not name:
            raise RequestError("a tool has an empty name")
        if name in schemas:
            raise RequestError(f"duplicate tool name {name!r}")
        if tool.parameters.strip():
            schema = _load_schema(tool.parameters)
        else:
            schema = {"type": "object"}
        schemas[name] = schema
        lines.append(f"- {name}: {tool.description.strip() or '(no description)'} Arguments: "
                     f"{json.dumps(schema, separators=(',', ':'))}")
    if choice in ("", TOOL_AUTO):
        mode, allowed = TOOL_AUTO, list(schemas)
    elif choice == TOOL_REQUIRED:
        mode, allowed = TOOL_REQUIRED, list(schemas)
    elif choice in schemas:
        mode, allowed = TOOL_REQUIRED, [choice]
    else:
        raise RequestError(f"tool_choice {choice!r} names no tool (tools: "
                           f"{', '.join(schemas)}; or auto, none, required)")
    key = "parameters" if syntax == SYNTAX_JSON_PARAMETERS else "arguments"
    call_schema = {"anyOf": [{
        "type": "object", "additionalProperties": False, "required": ["name", key],
        "properties": {"name": {"const": name}, key: schemas[name]}} for name in allowed]}
    listing = "\n".join(lines)
    rendered = syntax != SYNTAX_GENERIC
    template_tools = tuple(tool.function() for tool in tools) if rendered else ()
    if mode == TOOL_REQUIRED:
        constraint = compile_format(ResponseFormat(JSON_SCHEMA, json.dumps(call_schema)))
        prompt = "" if rendered else (
            f"You can call these tools:\n{listing}\nAnswer with one tool call only, as JSON: "
            f'{{"name": <tool name>, "arguments": {{...}}}}.')
        return ToolPlan(mode, constraint, prompt, schemas, syntax, template_tools)
    constraint = _auto_constraint(json.dumps(call_schema), syntax)
    prompt = "" if rendered else (
        f"You can call these tools:\n{listing}\nTo call one, answer with only "
        f'{CALL_OPEN}{{"name": <tool name>, "arguments": {{...}}}}{CALL_CLOSE}. '
        f"Otherwise answer normally.")
    return ToolPlan(mode, constraint, prompt, schemas, syntax, template_tools)


@functools.lru_cache(maxsize=CACHE_SIZE)
def _auto_constraint(call_schema: str, syntax: str = SYNTAX_GENERIC) -> Constraint:
    """Either plain text or exactly one call: tagged (text must not start with ``<``; a newline
    may follow the opening tag and precede the closing one, as Qwen2.5 writes them), or for
    ``json_parameters`` a bare JSON object (text must not start with ``{``)."""
    import llguidance
    if syntax == SYNTAX_JSON_PARAMETERS:
        lark = (f'start: answer | call\n'
                f'call: %json {call_schema}\n'
                f'answer: ANSWER\n'
                f'ANSWER: /[^{{\\s][\\s\\S]*/\n')
    else:
        lark = (f'start: answer | call\n'
                f'call: "{CALL_OPEN}" NL? body NL? "{CALL_CLOSE}"\n'
                f'body: %json {call_schema}\n'
                f'NL: "\\n"\n'
                f'answer: ANSWER\n'
                f'ANSWER: /[^<][\\s\\S]*/\n')
    matcher = llguidance.LLMatcher
    grammar = _checked(matcher, lambda: matcher.grammar_from_lark(lark), "tools")
    return Constraint(GRAMMAR, grammar)
