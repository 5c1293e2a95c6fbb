"""ROS parameter YAML files: which sections reach a node, and do they set only what it declares.

rcl reads a parameter file as ``<node pattern>: {ros__parameters: {...}}`` sections. A pattern is a
fully qualified node name (``/slm/llm``), a bare name (``llm``, which rcl reads as ``/llm``: root
namespace only), or has wildcards: ``*`` matches one name token, ``/**`` any number of namespace
levels (``/**/llm`` is node ``llm`` in any namespace). Nested maps become dotted parameter names.

What rclpy does with a bad file is unhelpful: a value for a parameter the node never declares is
dropped without a word, and a value of the wrong type stops the node with a traceback that names
neither the file nor the node. :func:`check_node_params` finds both before a node starts and names
the file and key (``config/profiles/x.yaml: key 'foo' is not a parameter of llm_node``).

No ROS import here: the checks work from the nodes' :class:`~slm_ros.ros.params.ParamSpec` tables,
read duck-typed (``name``, ``default``, ``int_range``, ``float_range``).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import yaml

from slm_ros.core.errors import ConfigError

ROS_PARAMETERS = "ros__parameters"


class ParamFileError(ConfigError):
    """A parameter file cannot be read, or sets what its node does not declare (the message names
    the file and the key)."""


def display_path(path: str) -> str:
    """How a file is named in messages: ``config/...`` for this package's installed files, relative
    to the working directory when below it, else as given."""
    text = str(path)
    marker = "/share/slm_ros/"
    idx = text.rfind(marker)
    if idx >= 0:
        return text[idx + len(marker):]
    try:
        return str(Path(text).resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return text


@dataclasses.dataclass(frozen=True)
class ParamFile:
    """One parameter file: its sections by node pattern, each a flat ``{name: value}`` dict."""

    path: str
    sections: Dict[str, Dict[str, Any]]

    @property
    def shown(self) -> str:
        return display_path(self.path)


def _flatten(values: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def read_param_file(path) -> ParamFile:
    """Parse a ROS parameter file; :class:`ParamFileError` (naming the file) when it cannot be read
    or is not ``<pattern>: {ros__parameters: {...}}`` sections."""
    shown = display_path(str(path))
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ParamFileError(f"{shown}: cannot read parameter file: {exc.strerror or exc}") \
            from None
    except yaml.YAMLError as exc:
        raise ParamFileError(f"{shown}: not valid YAML: {exc}") from None
    if not isinstance(data, Mapping) or not data:
        raise ParamFileError(f"{shown}: expected '<node>: {{{ROS_PARAMETERS}: {{...}}}}' sections")
    sections: Dict[str, Dict[str, Any]] = {}
    for pattern, body in data.items():
        if not isinstance(body, Mapping) or set(body) != {ROS_PARAMETERS} or \
                not isinstance(body[ROS_PARAMETERS], Mapping):
            raise ParamFileError(f"{shown}: section {pattern!r} must hold exactly one "
                                 f"'{ROS_PARAMETERS}' map (that is what rcl reads)")
        sections[str(pattern)] = _flatten(body[ROS_PARAMETERS])
    return ParamFile(str(path), sections)


def _pattern_regex(pattern: str) -> "re.Pattern[str]":
    text = pattern if pattern.startswith("/") else "/" + pattern
    parts = []
    for token in text.split("/")[1:]:
        if token == "**":
            parts.append(r"(?:/[^/]+)*")
        else:
            parts.append("/" + "[^/]+".join(re.escape(p) for p in token.split("*")))
    return re.compile("".join(parts) + r"\Z")


def pattern_matches(pattern: str, node_fqn: str) -> bool:
    """Whether rcl applies a section with this pattern to the node ``node_fqn`` (``/slm/llm``)."""
    return bool(_pattern_regex(pattern).match(node_fqn))


def names_node(pattern: str, node_name: str) -> bool:
    """Whether the pattern names this node explicitly (its last token is the node's name), as
    opposed to a wildcard section (``/**``) meant for several nodes."""
    return pattern.rstrip("/").split("/")[-1] == node_name


def node_values(files: Sequence[ParamFile],
                node_fqn: str) -> Dict[str, Tuple[Any, ParamFile, str]]:
    """``{name: (value, file, pattern)}`` that reach the node, with rcl's precedence (Jazzy,
    measured): rcl merges all files into one table of patterns, kept in the order each pattern
    first appears, a later file overwriting values under a pattern it repeats; then the matching
    patterns apply in that order, the last one winning. (Humble lets a section with the exact node
    name win over wildcard ones; this package's files use wildcard patterns only, and launch
    overrides come last under the exact name, so both agree for them.)"""
    merged: Dict[str, Dict[str, Tuple[Any, ParamFile]]] = {}
    for pfile in files:
        for pattern, section in pfile.sections.items():
            target = merged.setdefault(pattern, {})
            for key, value in section.items():
                target[key] = (value, pfile)
    values: Dict[str, Tuple[Any, ParamFile, str]] = {}
    for pattern, section in merged.items():
        if pattern_matches(pattern, node_fqn):
            for key, (value, pfile) in section.items():
                values[key] = (value, pfile, pattern)
    return values


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a double"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


def check_value(spec, value: Any) -> Optional[str]:
    """Why ``value`` is not acceptable for the parameter ``spec`` (type, as rclpy enforces it, and
    range), or None. A YAML ``3600`` for a double parameter is refused as rclpy refuses it."""
    default = spec.default
    if isinstance(default, bool):
        ok = isinstance(value, bool)
        expected = "a boolean (true/false)"
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
        expected = "an integer"
    elif isinstance(default, float):
        ok = isinstance(value, float)
        expected = "a double" + (f" (write {value}.0)" if isinstance(value, int) and
                                 not isinstance(value, bool) else "")
    elif isinstance(default, str):
        ok = isinstance(value, str)
        expected = "a string" + (" (quote it)" if value is not None and not ok else "")
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        expected = "a list of strings"
    else:  # pragma: no cover - every ParamSpec default is one of the above
        return None
    if not ok:
        return f"must be {expected}, got {value!r} ({_type_name(value)})"
    rng = spec.int_range if isinstance(default, int) and not isinstance(default, bool) else \
        spec.float_range if isinstance(default, float) else None
    if rng is not None and not rng[0] <= value <= rng[1]:
        return f"must be within [{rng[0]}, {rng[1]}], got {value!r}"
    return None


def check_node_params(files: Sequence[ParamFile], node_fqn: str, specs: Sequence,
                      node_label: str, known_elsewhere: Iterable[str] = (),
                      overrides: Optional[Mapping[str, Any]] = None) -> List[str]:
    """Problems of the values that reach one node, each naming the file and key; empty when none.

    A section that names the node must set only its parameters. A wildcard section (``/**``) is
    shared with other nodes, as in a launch file: its keys must be parameters of this node or of one
    of ``known_elsewhere`` (the other nodes' parameter names); keys this node does not declare are
    left to the others. ``overrides`` (values given on a command line) must all be declared.
    """
    table = {spec.name: spec for spec in specs}
    others = set(known_elsewhere)
    node_name = node_fqn.rsplit("/", 1)[-1]
    problems: List[str] = []
    for pfile in files:
        for pattern, values in pfile.sections.items():
            if not pattern_matches(pattern, node_fqn):
                continue
            specific = names_node(pattern, node_name)
            for key, value in values.items():
                spec = table.get(key)
                if spec is None:
                    if specific or key not in others:
                        problems.append(f"{pfile.shown}: key {key!r} is not a parameter of "
                                        f"{node_label}{_suggest(key, table)}")
                    continue
                why = check_value(spec, value)
                if why:
                    problems.append(f"{pfile.shown}: key {key!r} of {node_label} {why}")
    for key, value in (overrides or {}).items():
        spec = table.get(key)
        if spec is None:
            problems.append(f"override {key}={value!r}: not a parameter of {node_label}")
        else:
            why = check_value(spec, value)
            if why:
                problems.append(f"override {key}: {node_label} parameter {why}")
    return problems


def _suggest(key: str, table: Mapping[str, Any]) -> str:
    import difflib
    close = difflib.get_close_matches(key, list(table), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""
