"""Every TensorRT-LLM name, attribute and keyword slm_ros uses is in the recorded API of its line.

TensorRT-LLM cannot be imported here, so a misspelt keyword in the adapter would only fail on a Jetson.
This test reads ``slm_ros/backends/trtllm_adapter.py`` with ``ast`` and checks, per API line, each use
against ``test/data/tensorrt_llm_api.json`` (parsed by ``trtllm_standin.surface``), following the
convention documented at the top of the adapter:

* code in class ``_Api012`` is checked against the 0.12.0-jetson record, code in ``_Api1x`` against the
  1.x record; TensorRT-LLM names come from ``from tensorrt_llm.<module> import <Name>`` there;
* objects are recognised by their variable names (``llm``, ``request``, ``completion``, ``engine``,
  ``model``, ``arch``); any other attribute receiver there except ``self`` and ``job`` is an error;
* constructors and calls: keywords must be recorded, positional arguments only where the record
  allows them, no ``*args`` / ``**kwargs``; attributes and enum members must be recorded;
* outside those classes the adapter imports only ``tensorrt_llm`` itself and reads only
  ``__version__``; nothing else in slm_ros imports tensorrt_llm at all.
"""

import ast
import json
import re
from pathlib import Path
from typing import Dict, List, Optional

import pytest

import trtllm_standin
from slm_ros.backends import trtllm_adapter

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "slm_ros"
ADAPTER = PKG / "backends" / "trtllm_adapter.py"
SHARED_RECORD = Path("/work/shared/reference/tensorrt_llm_api.json")

LINE_CLASSES = {"_Api012": "0.12", "_Api1x": "1.x"}
#: Variable name -> the recorded object it holds (the adapter's naming convention).
HANDLE_NAMES = {"llm": "LLM", "request": "RequestOutput", "completion": "CompletionOutput",
                "engine": "Engine", "model": "ArchModel", "arch": "Arch"}
#: Attribute receivers in the per-line classes that are slm_ros's own objects.
PLAIN_NAMES = {"self", "job"}
#: Recorded, but wrong to use on that line.
HAZARDS = {"0.12": {"text_diff": "advances on every read in 0.12; use the cumulative token_ids",
                    "cancel": "raises NotImplementedError in 0.12; stop reading instead"}}
IMPORT_FUNCTIONS = {"import_module", "__import__", "find_spec"}

_PLAIN = object()


class LineChecker:
    """Check one per-line class against one line's surface; collect violations as strings."""

    def __init__(self, cls: ast.ClassDef, surface: trtllm_standin.Surface) -> None:
        self.cls, self.surface = cls, surface
        self.symbols: Dict[str, trtllm_standin.Entry] = {}
        self.violations: List[str] = []
        self._call_funcs = set()

    def fail(self, node: ast.AST, message: str) -> None:
        self.violations.append(f"{self.cls.name} line {getattr(node, 'lineno', '?')}: {message}")

    def run(self) -> List[str]:
        for node in ast.walk(self.cls):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "tensorrt_llm":
                        self.fail(node, f"`import {alias.name}`: use `from <module> import <Name>`")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tensorrt_llm"):
                for alias in node.names:
                    path = f"{node.module}.{alias.name}"
                    entry = self.surface.entries.get(path)
                    if entry is None:
                        self.fail(node, f"{path} is not recorded for {self.surface.line}")
                    else:
                        self.symbols[alias.asname or alias.name] = entry
        for node in ast.walk(self.cls):
            if isinstance(node, ast.Call):
                self._call(node)
            elif isinstance(node, ast.For) and isinstance(node.iter, ast.Call):
                self._iteration(node)
        for node in ast.walk(self.cls):
            if isinstance(node, ast.Attribute) and id(node) not in self._call_funcs:
                self._attribute(node)
        return self.violations

    # -- resolution ----------------------------------------------------------------------------

    def resolve(self, node: ast.AST):
        """The recorded entry an expression denotes, _PLAIN for slm_ros objects, None if unknown."""
        if isinstance(node, ast.Name):
            if node.id in self.symbols:
                return self.symbols[node.id]
            if node.id in HANDLE_NAMES:
                handle = self.surface.handles.get(HANDLE_NAMES[node.id])
                if handle is None:
                    self.fail(node, f"`{node.id}` ({HANDLE_NAMES[node.id]}) has no record for "
                                    f"{self.surface.line}")
                    return _PLAIN
                return handle
            if node.id in PLAIN_NAMES:
                return _PLAIN
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id == "self":
            return _PLAIN
        return None

    def _check_signature(self, node: ast.Call, sig: Optional[trtllm_standin.Signature],
                         what: str) -> None:
        if sig is None:
            self.fail(node, f"{what}: no signature recorded for {self.surface.line}, cannot be called")
            return
        if any(isinstance(a, ast.Starred) for a in node.args):
            self.fail(node, f"{what}: *args into TensorRT-LLM cannot be checked")
        if len(node.args) > sig.positional:
            self.fail(node, f"{what}: {len(node.args)} positional arguments, the record allows "
                            f"{sig.positional}")
        for keyword in node.keywords:
            if keyword.arg is None:
                self.fail(node, f"{what}: **kwargs into TensorRT-LLM cannot be checked")
            elif keyword.arg not in sig.params:
                self.fail(node, f"{what}: keyword {keyword.arg!r} is not recorded for "
                                f"{self.surface.line}")

    # -- checks --------------------------------------------------------------------------------

    def _call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id in self.symbols:
            entry = self.symbols[func.id]
            if entry.kind == "forbidden":
                self.fail(node, f"{entry.path} must not be used on {self.surface.line}: {entry.reason}")
            elif entry.kind in ("class", "function"):
                self._check_signature(node, entry.init, entry.path)
            else:
                self.fail(node, f"{entry.path} ({entry.kind}) is not callable per the record")
        elif isinstance(func, ast.Name) and func.id == "getattr" and node.args:
            target = self.resolve(node.args[0])
            if isinstance(target, trtllm_standin.Entry):
                name = node.args[1] if len(node.args) > 1 else None
                if isinstance(name, ast.Constant):
                    self._member(node, target, str(name.value))
                elif target.path not in self.surface.patterns:
                    self.fail(node, f"getattr({target.path}, <dynamic>): only modules with a "
                                    f"recorded name pattern allow that")
        elif isinstance(func, ast.Attribute):
            target = self.resolve(func.value)
            if isinstance(target, trtllm_standin.Entry):
                self._call_funcs.add(id(func))
                self._hazard(func, func.attr)
                if func.attr in target.methods:
                    self._check_signature(node, target.methods[func.attr],
                                          f"{target.path}.{func.attr}")
                else:
                    self.fail(node, f"{target.path}.{func.attr}() is not a recorded method for "
                                    f"{self.surface.line}")
            elif target is None:
                self._call_funcs.add(id(func))
                self.fail(node, f"call on `{ast.unparse(func.value)}`: not a recognised "
                                f"TensorRT-LLM object nor self/job (naming convention)")
            else:
                self._call_funcs.add(id(func))

    def _iteration(self, node: ast.For) -> None:
        func = node.iter.func
        if isinstance(func, ast.Attribute) and func.attr == "generate_async":
            request = self.surface.handles["RequestOutput"]
            if "__iter__" not in request.methods:
                self.fail(node, f"iterating a RequestOutput: __iter__ not recorded for "
                                f"{self.surface.line}")

    def _member(self, node: ast.AST, entry: trtllm_standin.Entry, attr: str) -> None:
        if attr in entry.attrs or attr in entry.methods:
            return
        pattern = self.surface.patterns.get(entry.path)
        if pattern and re.fullmatch(pattern[0], attr):
            return
        self.fail(node, f"{entry.path}.{attr} is not recorded for {self.surface.line}")

    def _hazard(self, node: ast.AST, attr: str) -> None:
        reason = HAZARDS.get(self.surface.line, {}).get(attr)
        if reason:
            self.fail(node, f".{attr}: {reason}")

    def _attribute(self, node: ast.Attribute) -> None:
        if not isinstance(node.ctx, ast.Load):
            target = self.resolve(node.value)
            if isinstance(target, trtllm_standin.Entry):
                self.fail(node, f"assigning {target.path}.{node.attr}: not allowed")
            return
        target = self.resolve(node.value)
        if isinstance(target, trtllm_standin.Entry):
            self._hazard(node, node.attr)
            if target.kind in ("forbidden", "name"):
                self.fail(node, f"{target.path}.{node.attr}: only the name is recorded")
            else:
                self._member(node, target, node.attr)
        elif target is None:
            self.fail(node, f"`{ast.unparse(node)}`: `{ast.unparse(node.value)}` is not a recognised "
                            f"TensorRT-LLM object nor self/job (naming convention)")


def check_source(source: str, filename: str = "<source>") -> Dict[str, List[str]]:
    """Violations per line class in ``source`` (module-level code is checked separately)."""
    tree = ast.parse(source, filename)
    found = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in LINE_CLASSES:
            line = LINE_CLASSES[node.name]
            found[node.name] = LineChecker(node, trtllm_standin.surface(line)).run()
    return found


def adapter_tree() -> ast.Module:
    return ast.parse(ADAPTER.read_text(), str(ADAPTER))


# -- the record --------------------------------------------------------------------------------------


def test_record_is_the_shared_reference():
    if not SHARED_RECORD.exists():
        pytest.skip(f"{SHARED_RECORD} is not on this machine")
    assert json.loads(SHARED_RECORD.read_text()) == trtllm_standin.load_record(), (
        "test/data/tensorrt_llm_api.json differs from the shared reference: refresh the copy "
        "(see test/data/TENSORRT_LLM_API.md)")


@pytest.mark.parametrize("line", ["0.12", "1.x"])
def test_every_recorded_key_is_mapped(line):
    record = trtllm_standin.load_record()[trtllm_standin.SECTIONS[line]]
    surface = trtllm_standin.surface(line)
    missing = set(record) - surface.used_keys - set(trtllm_standin.UNMAPPED[line])
    assert not missing, f"recorded keys the surface ignores: {sorted(missing)}"


# -- the adapter -------------------------------------------------------------------------------------


def test_adapter_has_one_class_per_line():
    names = {n.name for n in adapter_tree().body if isinstance(n, ast.ClassDef)}
    assert set(LINE_CLASSES) <= names
    assert trtllm_adapter._API_CLASSES == {"0.12": trtllm_adapter._Api012,
                                           "1.x": trtllm_adapter._Api1x}


@pytest.mark.parametrize("cls", sorted(LINE_CLASSES))
def test_line_code_uses_only_recorded_api(cls):
    violations = check_source(ADAPTER.read_text(), str(ADAPTER))[cls]
    assert not violations, "\n".join(violations)


def _names_used(cls: ast.ClassDef) -> set:
    """Attribute names and keyword names used in a class (docstrings and comments excluded)."""
    used = set()
    for node in ast.walk(cls):
        if isinstance(node, ast.Attribute):
            used.add(node.attr)
        elif isinstance(node, ast.keyword) and node.arg:
            used.add(node.arg)
    return used


def test_line_classes_follow_each_lines_cancel_semantics():
    used = {n.name: _names_used(n) for n in adapter_tree().body
            if isinstance(n, ast.ClassDef) and n.name in LINE_CLASSES}
    assert {"abort", "token_ids_diff", "finish_reason", "max_tokens", "shutdown"} <= used["_Api1x"]
    assert {"token_ids", "max_new_tokens", "random_seed", "__exit__"} <= used["_Api012"]
    forbidden_012 = {"abort", "cancel", "text_diff", "finish_reason", "token_ids_diff", "max_tokens",
                     "shutdown"}
    assert not used["_Api012"] & forbidden_012


def test_module_level_code_touches_only_the_version():
    tree = adapter_tree()
    line_nodes = {id(n) for c in tree.body if isinstance(c, ast.ClassDef) and c.name in LINE_CLASSES
                  for n in ast.walk(c)}
    imports, problems = [], []
    functions = {id(n): f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                 for n in ast.walk(f)}
    for node in ast.walk(tree):
        if id(node) in line_nodes:
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""])
            for name in names:
                if name.split(".")[0] == "tensorrt_llm":
                    imports.append((functions.get(id(node)), ast.unparse(node)))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id == "tensorrt_llm" and node.attr not in \
                    trtllm_standin.COMMON_PACKAGE_ATTRS:
                problems.append(ast.unparse(node))
            if node.value.id in HANDLE_NAMES:
                problems.append(ast.unparse(node))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                and node.value.attr == "_llm":
            problems.append(ast.unparse(node))
    assert imports == [("_import_tensorrt_llm", "import tensorrt_llm")]
    assert not problems, f"TensorRT-LLM objects used outside the per-line classes: {problems}"


def test_quantization_and_architecture_tables_match_the_record():
    for line in ("0.12", "1.x"):
        members = trtllm_standin.surface(line).entries["tensorrt_llm.quantization.QuantAlgo"].attrs
        algos = {q.quant_algo for q in trtllm_adapter.QUANTIZATIONS.values()} - {None}
        assert algos <= members, (line, algos - members)
    pattern = trtllm_standin.surface("0.12").patterns["tensorrt_llm.models"][0]
    assert all(re.fullmatch(pattern, name) for name in trtllm_adapter.TRT_ARCHITECTURES.values())
    # Each line's build maps every quantization the table offers.
    wanted = {q.quant_algo for q in trtllm_adapter.QUANTIZATIONS.values()}
    for node in adapter_tree().body:
        if isinstance(node, ast.ClassDef) and node.name in LINE_CLASSES:
            tables = [n.value for n in ast.walk(node) if isinstance(n, ast.Assign)
                      and any(isinstance(t, ast.Name) and t.id == "algos" for t in n.targets)]
            assert len(tables) == 1, node.name
            assert {k.value for k in tables[0].keys} == wanted, node.name


def test_nothing_but_the_adapter_imports_tensorrt_llm():
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        if path == ADAPTER:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called in IMPORT_FUNCTIONS and isinstance(node.args[0].value, str):
                    names = [node.args[0].value]
            for name in names:
                if name == "tensorrt_llm" or name.startswith("tensorrt_llm."):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert not offenders, offenders
    assert len(list(PKG.rglob("*.py"))) > 10


# -- the checker has teeth ---------------------------------------------------------------------------

BROKEN = '''
class _Api012:
    def f(self, llm, job):
        from tensorrt_llm.hlapi import LLM, SamplingParams, Nope
        import tensorrt_llm.hlapi
        SamplingParams(max_tokens=1)
        LLM("a", "b", "c", "d", "e", "f", "g", "h")
        for request in llm.generate_async([1], sampling_params=None, streaming=True, timeout=3):
            request.abort()
            completion = request.outputs[0]
            completion.finish_reason
            completion.text_diff
        something.token_ids
        LLM(model="x", **job.extra)
        engine.save(job.out, rank=0)

class _Api1x:
    def f(self, llm):
        from tensorrt_llm import LLM
        from tensorrt_llm.llmapi import QuantAlgo, CalibConfig
        LLM(model="x")
        QuantAlgo.NOPE
        CalibConfig(calib_dataset="d")
        engine.save("x")
'''


def test_the_checker_finds_each_kind_of_mistake():
    found = check_source(BROKEN)
    text012, text1x = "\n".join(found["_Api012"]), "\n".join(found["_Api1x"])
    for needle in ("tensorrt_llm.hlapi.Nope is not recorded", "`import tensorrt_llm.hlapi`",
                   "keyword 'max_tokens'", "8 positional arguments", "keyword 'timeout'",
                   "RequestOutput.abort() is not a recorded method", "finish_reason is not recorded",
                   ".text_diff: advances on every read", "`something` is not a recognised",
                   "**kwargs", "keyword 'rank'"):
        assert needle in text012, needle
    for needle in ("tensorrt_llm.LLM must not be used on 1.x", "QuantAlgo.NOPE is not recorded",
                   "tensorrt_llm.llmapi.CalibConfig (name) is not callable",
                   "`engine` (Engine) has no record for 1.x"):
        assert needle in text1x, needle
