"""Declared node parameters: one table per node, each entry with its description and range.

Nodes declare their table with :func:`declare_all` and read it back with :func:`values`; typed,
validated config objects are then built from those values by the node (errors name the parameter).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Sequence, Tuple

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType
from rclpy.exceptions import ParameterUninitializedException
from rclpy.node import Node
from rclpy.parameter import Parameter


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter: name, default, description and optional numeric range."""

    name: str
    default: Any
    description: str
    int_range: Optional[Tuple[int, int]] = None
    float_range: Optional[Tuple[float, float]] = None
    read_only: bool = False
    additional_constraints: str = ""

    def descriptor(self) -> ParameterDescriptor:
        d = ParameterDescriptor(name=self.name, description=self.description,
                                read_only=self.read_only,
                                additional_constraints=self.additional_constraints)
        if self.int_range is not None:
            d.integer_range = [IntegerRange(from_value=self.int_range[0],
                                            to_value=self.int_range[1], step=0)]
        if self.float_range is not None:
            d.floating_point_range = [FloatingPointRange(
                from_value=float(self.float_range[0]), to_value=float(self.float_range[1]), step=0.0)]
        if isinstance(self.default, (list, tuple)):
            d.type = ParameterType.PARAMETER_STRING_ARRAY
        return d


def declare_all(node: Node, specs: Sequence[ParamSpec]) -> None:
    """Declare every parameter of ``specs`` on ``node`` with its descriptor."""
    for spec in specs:
        if isinstance(spec.default, (list, tuple)) and not spec.default:
            # An empty list has no type of its own; declare it as a string array.
            node.declare_parameter(spec.name, Parameter.Type.STRING_ARRAY, spec.descriptor())
        else:
            node.declare_parameter(spec.name, spec.default, spec.descriptor())


def values(node: Node, specs: Sequence[ParamSpec]) -> Dict[str, Any]:
    """Current values of ``specs`` (an unset string array reads as an empty tuple)."""
    out: Dict[str, Any] = {}
    for spec in specs:
        try:
            value = node.get_parameter(spec.name).value
        except ParameterUninitializedException:  # declared by type only and never set
            value = None
        if isinstance(spec.default, (list, tuple)):
            value = tuple(value or ())
        out[spec.name] = value
    return out
