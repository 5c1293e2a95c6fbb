"""README's parameter reference is generated from the nodes (scripts/gen_param_docs.py) and must be
what the nodes really declare: the generated region equals the generator's output, and the
generator's tables equal the parameters and ParameterDescriptors of real node instances."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import gen_param_docs  # noqa: E402


def test_readme_parameter_reference_is_up_to_date():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert gen_param_docs.render(readme) == readme, \
        "README.md is stale: run .venv/bin/python scripts/gen_param_docs.py --write"
    region = readme.split("<!-- BEGIN GENERATED: parameters", 1)[1]
    for table in gen_param_docs.node_tables().values():
        for spec in table:
            assert f"| `{spec.name}` |" in region


#: Parameters rclpy declares on every node itself (Jazzy adds the second).
_ROS_OWN = {"use_sim_time", "start_type_description_service"}


def test_generator_tables_are_what_the_nodes_declare(domain_id, tmp_path):
    import rclpy
    from rcl_interfaces.msg import ParameterType
    from rclpy.parameter import Parameter

    from slm_ros.nodes.engine_builder_node import EngineBuilderNode
    from slm_ros.nodes.llm_node import LlmNode
    from slm_ros.nodes.vision_node import VisionNode

    tables = gen_param_docs.node_tables()
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain_id)
    nodes = []
    try:
        # The builder's cache_dir is read-only and used at construction: keep it out of ~/.cache.
        builder_overrides = [Parameter("cache_dir", value=str(tmp_path / "cache")),
                             Parameter("build_on_start", value=False)]
        for executable, cls, kwargs in (
                ("llm_node", LlmNode, {}), ("vision_node", VisionNode, {}),
                ("engine_builder_node", EngineBuilderNode,
                 {"parameter_overrides": builder_overrides})):
            node = cls(context=context, namespace="/docs", **kwargs)
            nodes.append(node)
            declared = set(node.list_parameters([], 0).names) - _ROS_OWN
            table = {spec.name: spec for spec in tables[executable]}
            assert declared == set(table), f"{executable}: README vs declared differ"
            for descriptor in node.describe_parameters(sorted(declared)):
                name = descriptor.name
                spec = table[name]
                expected = spec.descriptor()
                assert descriptor.description == expected.description, name
                assert descriptor.read_only == expected.read_only, name
                assert list(descriptor.integer_range) == list(expected.integer_range), name
                assert list(descriptor.floating_point_range) == \
                    list(expected.floating_point_range), name
                if executable == "engine_builder_node" and name in ("cache_dir",
                                                                     "build_on_start"):
                    continue  # overridden above
                default = spec.default
                if isinstance(default, (list, tuple)) and not default:
                    # An empty list has no type: declared as a string array without a value.
                    assert descriptor.type == ParameterType.PARAMETER_STRING_ARRAY, name
                    continue
                value = node.get_parameter(name).value
                if isinstance(default, (list, tuple)):
                    assert list(value) == list(default), name
                else:
                    assert value == default, name
    finally:
        for node in nodes:
            node.destroy_node()
        rclpy.try_shutdown(context=context)


@pytest.mark.parametrize("flag, code", [("--check", 0)])
def test_the_generator_script_checks_readme(flag, code):
    import subprocess
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_param_docs.py"), flag],
                         capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == code, out.stdout[-3000:] + out.stderr[-3000:]
