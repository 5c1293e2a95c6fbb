"""The benchmarks' JSON reports: one way to write them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict


def write_report(report: Dict[str, Any], out: Path) -> None:
    """Write ``report`` as indented JSON to ``out`` (its directory created) and print it on stdout,
    which carries nothing else (progress goes to stderr)."""
    text = json.dumps(report, indent=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(text)
