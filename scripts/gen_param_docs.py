#!/usr/bin/env python3
"""Generate README's parameter reference and board table from the code, and check them.

    .venv/bin/python scripts/gen_param_docs.py --write   # rewrite the generated regions of README.md
    .venv/bin/python scripts/gen_param_docs.py --check   # exit 1 (with a diff) if README is stale

Two regions of README.md are generated, each between ``<!-- BEGIN GENERATED: <name> ... -->`` and
``<!-- END GENERATED: <name> -->``:

* ``parameters``: every parameter the nodes declare, from their ParamSpec tables and the
  ParameterDescriptor each spec declares (type, default, range, read-only, description);
* ``boards``: which model runs how on which board, from the model cards (config/models), the board
  profiles (config/profiles) and the memory planner, fed with test/data/model_configs/*.json.

It imports the *installed* slm_ros (run scripts/dev-sync.sh or scripts/setup.sh after changing it).
test/test_readme_params.py and test/test_config_profiles.py fail when README and code disagree.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
NODE_MODULES = (("llm_node", "slm_ros.nodes.llm_node"), ("vision_node", "slm_ros.nodes.vision_node"),
                ("engine_builder_node", "slm_ros.nodes.engine_builder_node"))


def node_tables() -> Dict[str, Tuple]:
    """``{executable: ParamSpec table}`` of every node (imports the node modules: rclpy)."""
    import importlib
    return {name: importlib.import_module(module).PARAMETERS for name, module in NODE_MODULES}


def _type(spec) -> str:
    d = spec.default
    if isinstance(d, bool):
        return "bool"
    if isinstance(d, int):
        return "int"
    if isinstance(d, float):
        return "double"
    if isinstance(d, (list, tuple)):
        return "string[]"
    return "string"


def _default(spec) -> str:
    d = spec.default
    if isinstance(d, bool):
        return f"`{str(d).lower()}`"
    if isinstance(d, (list, tuple)):
        return "`[" + ", ".join(repr(v) for v in d) + "]`"
    if isinstance(d, str):
        return f"`{d}`" if d else '`""`'
    return f"`{d!r}`"


def _range(descriptor) -> str:
    def num(v):
        return f"{v:g}" if isinstance(v, float) else str(v)
    for rng in list(descriptor.integer_range) + list(descriptor.floating_point_range):
        return f"{num(rng.from_value)} … {num(rng.to_value)}"
    return ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(specs: Sequence) -> List[str]:
    lines = ["| parameter | type | default | range | description |", "|---|---|---|---|---|"]
    for spec in specs:
        d = spec.descriptor()
        note = " *(read-only: set at start)*" if d.read_only else ""
        lines.append(f"| `{spec.name}` | {_type(spec)} | {_cell(_default(spec))} | {_range(d)} | "
                     f"{_cell(d.description)}{note} |")
    return lines


def parameter_reference() -> str:
    """The ``parameters`` region: shared model-node parameters, then what differs per node."""
    tables = node_tables()
    llm = {s.name: s for s in tables["llm_node"]}
    vision = {s.name: s for s in tables["vision_node"]}
    shared = [s for s in tables["llm_node"] if vision.get(s.name) == s]
    out = ["### `llm_node` and `vision_node`", "",
           "Both model nodes declare these (`ros2 param describe /slm/llm <name>`):", ""]
    out += _table(shared)
    for node, own in (("llm_node", llm), ("vision_node", vision)):
        other = vision if node == "llm_node" else llm
        specs = [s for s in tables[node] if other.get(s.name) != s]
        out += ["", f"### `{node}` only (or with its own default)", ""] + _table(specs)
    out += ["", "### `engine_builder_node`", ""] + _table(tables["engine_builder_node"])
    return "\n".join(out)


def board_table(root: Path = ROOT) -> str:
    """The ``boards`` region: per model card, its deployment and planned memory on each board."""
    from slm_ros.build.device import GiB
    from slm_ros.ros.deployment import plan_memory_for, read_model_card, read_profile
    profiles = [read_profile(p) for p in sorted((root / "config" / "profiles").glob("*.yaml"))]
    # A remote profile has no board: its model runs on a server, nothing to plan on the robot.
    profiles = [p for p in profiles if not p.remote]
    order = ("orin-nano-8gb", "orin-nx-16gb", "agx-orin-64gb", "x86-cuda", "x86-intel", "cpu")
    profiles.sort(key=lambda p: order.index(p.name) if p.name in order else len(order))
    cards = [read_model_card(p) for p in sorted((root / "config" / "models").glob("*.yaml"))]
    cards.sort(key=lambda c: (c.modality != "text", c.title.lower()))
    head = "| model | " + " | ".join(f"`{p.name}`" for p in profiles) + " |"
    lines = [head, "|---" * (len(profiles) + 1) + "|"]
    for card in cards:
        config = json.loads((root / "test" / "data" / "model_configs" /
                             f"{card.name}.json").read_text(encoding="utf-8"))
        cells = []
        for prof in profiles:
            dep = card.on(prof.name)
            if dep is None or not dep.fits:
                cells.append("does not fit")
                continue
            plan = plan_memory_for(card, prof, config)
            default = "**" if card.name in (prof.default_model, prof.default_vision_model) else ""
            quant = "" if dep.quantization == "none" else f" {dep.quantization}"
            cells.append(f"{default}{dep.backend}{quant}{default}, {plan.total_bytes / GiB:.1f} GiB")
        name = f"`{card.name}`" + ("" if card.loadable else " (not loadable yet)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


GENERATORS = {"parameters": parameter_reference, "boards": board_table}
_REGION = re.compile(r"(<!-- BEGIN GENERATED: (\w+)[^>]*-->\n)(.*?)(<!-- END GENERATED: \2 -->)",
                     re.S)


def render(readme: str) -> str:
    """README text with every generated region replaced by fresh output."""
    seen = set()

    def replace(match):
        seen.add(match.group(2))
        return f"{match.group(1)}{GENERATORS[match.group(2)]()}\n{match.group(4)}"

    text = _REGION.sub(replace, readme)
    missing = set(GENERATORS) - seen
    if missing:
        raise SystemExit(f"gen_param_docs: README.md has no generated region(s) {sorted(missing)}")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite README.md")
    mode.add_argument("--check", action="store_true", help="exit 1 when README.md is stale")
    args = parser.parse_args(argv)
    current = README.read_text(encoding="utf-8")
    fresh = render(current)
    if args.write:
        if fresh != current:
            README.write_text(fresh, encoding="utf-8")
        print("README.md: generated regions up to date")
        return 0
    if fresh != current:
        sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), fresh.splitlines(True),
                                                   "README.md", "generated"))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
