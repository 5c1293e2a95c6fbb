"""STAND-IN for the ``tensorrt_llm`` package, generated at test time from the recorded API surface.

This is NOT TensorRT-LLM and runs no model. TensorRT-LLM cannot be installed on the machines that run
these tests (it needs an NVIDIA GPU; on Jetson it is the v0.12.0-jetson wheel), so the tests exercise
slm_ros's adapter against this stand-in instead:

* :func:`surface` turns ``test/data/tensorrt_llm_api.json`` (the names and keyword lists read from
  TensorRT-LLM's sources, per API line) into importable entries. The AST test
  (``test_trtllm_api_surface.py``) checks the adapter's calls against them.
* :func:`build_package` generates module objects from that surface: every constructor, function and
  method accepts exactly the recorded keywords and raises TypeError on any other, enum-like classes
  have exactly the recorded members, result objects have only the recorded attributes.
* Behaviour follows the documented semantics of each line: 0.12 ``generate_async(..., streaming=True)``
  yields the request after each token with a cumulative ``token_ids``, a ``text_diff`` that advances on
  every read, no ``finish_reason``, and ``cancel()`` raising NotImplementedError while the request runs
  on to its ``max_new_tokens``; 1.x adds ``token_ids_diff``, ``finish_reason`` and ``abort()``.
  "Engines" are directories with a ``config.json`` in TensorRT-LLM's layout and a placeholder
  ``rank0.engine``; generated tokens are a deterministic function of the prompt
  (:func:`stand_in_tokens`).

:func:`install` puts the package into ``sys.modules`` through pytest's ``monkeypatch`` (undone after the
test); it is never on the import path otherwise. Every generated module has ``__stand_in__ = True``.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import queue
import re
import threading
import time
import types
from pathlib import Path
from typing import Any, Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple

DATA = Path(__file__).resolve().parent / "data" / "tensorrt_llm_api.json"
#: The guided-decoding / logits post-processor additions (a copy of the shared reference
#: ``tensorrt_llm_guided_api.json``): read for the names and fields the constrained-output path uses.
GUIDED_DATA = Path(__file__).resolve().parent / "data" / "tensorrt_llm_guided_api.json"

#: slm_ros API line -> section of the JSON record.
SECTIONS = {"0.12": "0.12.0-jetson", "1.x": "1.x"}

#: ``__version__`` of the 1.x stand-in: the 1.x record has no version (0.12's is recorded).
VERSION_1X = "1.0.0"

#: Names the record lists without their fields, and which the adapter needs. Hand-recorded, with
#: provenance in test/data/TENSORRT_LLM_API.md; kept as small as possible.
SUPPLEMENT: Dict[str, Tuple[str, ...]] = {
    "KvCacheConfig": ("free_gpu_memory_fraction",),
}

#: JSON keys per line the surface deliberately does not turn into importable entries.
UNMAPPED = {
    "0.12": {"multimodal": "examples/multimodal scripts, not part of the installed package in 0.12"},
    "1.x": {"multimodal": "only names recorded (no argument lists)"},
}

#: Attribute every line's package has: the adapter reads it before it knows the line.
COMMON_PACKAGE_ATTRS = ("__version__",)

STAND_IN_NOTE = "tensorrt_llm stand-in (test/trtllm_standin.py), generated from the recorded API"


# -- the record ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Signature:
    """Accepted keywords of a callable; the first ``positional`` may also be passed by position."""

    params: Tuple[str, ...] = ()
    positional: int = 0
    defaults: Tuple[Tuple[str, Any], ...] = ()

    def default(self, name: str) -> Any:
        return dict(self.defaults).get(name)


@dataclasses.dataclass
class Entry:
    """One importable name. ``kind``: module, class, enum, function, name (recorded without fields:
    may be imported, not called), forbidden (recorded as not to be used: ``reason``)."""

    path: str
    kind: str
    source: str
    init: Optional[Signature] = None
    methods: Dict[str, Signature] = dataclasses.field(default_factory=dict)
    attrs: FrozenSet[str] = frozenset()
    values: Dict[str, Tuple[str, ...]] = dataclasses.field(default_factory=dict)
    notes: Dict[str, str] = dataclasses.field(default_factory=dict)
    reason: str = ""


@dataclasses.dataclass
class Surface:
    """The recorded API of one line: importable ``entries`` by dotted path, instance ``handles``
    (LLM, RequestOutput, CompletionOutput, Engine, Arch, ArchModel) and module attribute patterns."""

    line: str
    version: str
    entries: Dict[str, Entry]
    handles: Dict[str, Entry]
    patterns: Dict[str, Tuple[str, str]]  # module path -> (regex of attribute names, handle name)
    used_keys: FrozenSet[str]


class _Tracking(dict):
    """A dict that remembers which keys were read (to prove every recorded key is mapped)."""

    def __init__(self, data: dict) -> None:
        super().__init__(data)
        self.read: set = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def load_record(path: Path = DATA) -> dict:
    """The JSON record."""
    return json.loads(path.read_text(encoding="utf-8"))


def guided_additions(line: str) -> Dict[str, Any]:
    """What the guided record adds to ``line``'s surface (1.x: the LLM's ``guided_decoding_backend``
    keyword and its values, ``GuidedDecodingParams`` fields and the guides the engine path must not
    get; 0.12: the post-processor keyword, already in the main record, and the callback arity)."""
    record = load_record(GUIDED_DATA)
    if line == "0.12":
        section = record["0.12.0-jetson"]
        assert section["guided_decoding"]["available"] is False
        callback = section["logits post-processor callable (0.12)"]["signature"]
        return {"llm_keywords": ("logits_post_processor_map",), "callback": callback}
    section = record["1.x"]
    decl = section["BaseLlmArgs.guided_decoding_backend"]["decl"]
    backends = tuple(re.findall(r"'([a-z]+)'", decl.split("=", 1)[0]))
    trt_path = section["BaseLlmArgs.guided_decoding_backend"]["trt_engine_path"]
    fields = tuple(_NAME.match(f).group(1)
                   for f in section["tensorrt_llm.llmapi.GuidedDecodingParams"]["fields"])
    findings = " ".join(section["engine-path build/runtime requirements"]["findings"])
    return {"llm_keywords": ("guided_decoding_backend",), "backends": backends,
            "engine_backends": tuple(b for b in backends if f"== '{b}'" in trt_path),
            "guided_fields": fields,
            "engine_forbidden": ("structural_tag",) if "STRUCTURAL_TAG branch" in findings else ()}


_NAME = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)")


def _default_of(item: str) -> Tuple[bool, Any]:
    match = re.search(r"\(=([^)]*)\)", item)
    if not match:
        return False, None
    text = match.group(1).strip()
    try:
        return True, ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return True, text


def signature(items: Iterable[str], keyword_only: bool = False) -> Signature:
    """Parse a recorded parameter list: ``name``, ``name(=default)``, ``name(note)``, ``*`` (keyword-only
    from here), ``**kw`` / ``**kw(a, b, ...)`` (extra keywords listed in parentheses), ``...``."""
    params: List[str] = []
    defaults: List[Tuple[str, Any]] = []
    positional: Optional[int] = 0 if keyword_only else None
    for raw in items:
        item = raw.strip()
        if item in ("", "..."):
            continue
        if item == "*":
            positional = len(params) if positional is None else positional
            continue
        if item.startswith("**"):
            positional = len(params) if positional is None else positional
            inner = re.search(r"\((.*)\)", item)
            if inner:
                params.extend(n.strip() for n in inner.group(1).split(",")
                              if n.strip() and n.strip() != "...")
            continue
        match = _NAME.match(item)
        if not match:
            raise ValueError(f"cannot parse recorded parameter {raw!r}")
        params.append(match.group(1))
        has, value = _default_of(item)
        if has:
            defaults.append((match.group(1), value))
    return Signature(tuple(params), len(params) if positional is None else positional, tuple(defaults))


def _method_specs(items: Iterable[str]) -> Tuple[Dict[str, Signature], Dict[str, str]]:
    """``result(timeout)``, ``aresult()``, ``__iter__/__next__``, ``cancel() -> NotImplementedError``."""
    methods: Dict[str, Signature] = {}
    notes: Dict[str, str] = {}
    for raw in items:
        head, _, note = raw.partition("->")
        head = head.strip()
        params = re.search(r"\((.*)\)", head)
        names = re.sub(r"\(.*\)", "", head).split("/")
        sig = signature([p for p in (params.group(1).split(",") if params else []) if p.strip()])
        for name in names:
            methods[name.strip()] = sig
            if note.strip():
                notes[name.strip()] = note.strip()
    return methods, notes


def _attr_specs(items: Iterable[str]) -> Tuple[FrozenSet[str], Dict[str, Tuple[str, ...]],
                                               Dict[str, str]]:
    """``name``, ``name (NOTE)``, ``name('a'|'b')``."""
    attrs, values, notes = set(), {}, {}
    for raw in items:
        match = _NAME.match(raw)
        if not match:
            raise ValueError(f"cannot parse recorded attribute {raw!r}")
        name = match.group(1)
        attrs.add(name)
        rest = raw[match.end():].strip()
        if rest.startswith("(") and "'" in rest:
            values[name] = tuple(re.findall(r"'([^']*)'", rest))
        elif rest:
            notes[name] = rest.strip("() ")
    return frozenset(attrs), values, notes


def _llm_entry(path: str, key: str, spec: dict) -> Entry:
    kw_key = next(k for k in spec if k.startswith("kw("))
    init = signature(list(spec["init"]) + list(spec[kw_key]))
    methods: Dict[str, Signature] = {}
    attrs = set()
    for name, value in spec["methods"].items():
        if value == "property":
            attrs.add(name)
        elif name == "__enter__/__exit__":
            methods["__enter__"] = Signature()
            methods["__exit__"] = Signature(("exc_type", "exc_value", "traceback"), 3)
        else:
            methods[name] = signature(value)
    return Entry(path, "class", key, init=init, methods=methods, attrs=frozenset(attrs))


def _config_entry(path: str, key: str, fields: Sequence[str]) -> Entry:
    sig = signature(fields, keyword_only=True)
    return Entry(path, "class", key, init=sig, attrs=frozenset(sig.params))


def _result_entries(key: str, spec: dict) -> Tuple[Entry, Entry]:
    methods, notes = _method_specs(spec["methods"])
    request = Entry("RequestOutput", "class", key, methods=methods,
                    attrs=frozenset(spec["attrs"]), notes=notes)
    attrs, values, cnotes = _attr_specs(spec["CompletionOutput"])
    completion = Entry("CompletionOutput", "class", key + " CompletionOutput", attrs=attrs,
                       values=values, notes=cnotes)
    return request, completion


def _alias(entry: Entry, path: str) -> Entry:
    return dataclasses.replace(entry, path=path)


def _surface_012(rec: _Tracking) -> Tuple[Dict[str, Entry], Dict[str, Entry], Dict[str, Tuple]]:
    e: Dict[str, Entry] = {}
    llm = _llm_entry("tensorrt_llm.LLM", "tensorrt_llm.LLM", rec["tensorrt_llm.LLM"])
    sampling = _config_entry("tensorrt_llm.hlapi.SamplingParams", "tensorrt_llm.hlapi.SamplingParams",
                             rec["tensorrt_llm.hlapi.SamplingParams"]["fields"])
    request, completion = _result_entries("RequestOutput/GenerationResult",
                                          rec["RequestOutput/GenerationResult"])
    build_config = _config_entry("tensorrt_llm.builder.BuildConfig", "tensorrt_llm.builder.BuildConfig",
                                 rec["tensorrt_llm.builder.BuildConfig"]["fields"])
    quant_config = _config_entry("tensorrt_llm.models.modeling_utils.QuantConfig",
                                 "tensorrt_llm.models.modeling_utils.QuantConfig",
                                 rec["tensorrt_llm.models.modeling_utils.QuantConfig"])
    quant_algo = Entry("tensorrt_llm.quantization.QuantAlgo", "enum",
                       "tensorrt_llm.quantization.QuantAlgo",
                       attrs=frozenset(rec["tensorrt_llm.quantization.QuantAlgo"]))
    kv = _config_entry("tensorrt_llm.hlapi.KvCacheConfig", "SUPPLEMENT", SUPPLEMENT["KvCacheConfig"])
    engine_spec = rec["tensorrt_llm.builder.Engine"]
    engine = Entry("tensorrt_llm.builder.Engine", "class", "tensorrt_llm.builder.Engine",
                   methods={name: signature(params) for name, params in engine_spec.items()})
    pretrained_spec = rec["tensorrt_llm.models.PretrainedModel"]
    pretrained_methods = {name: signature(params) for name, params in pretrained_spec.items()}
    pretrained = Entry("tensorrt_llm.models.PretrainedModel", "class",
                       "tensorrt_llm.models.PretrainedModel", methods=pretrained_methods)
    arch_key = "tensorrt_llm.models.<Arch>ForCausalLM"
    arch = Entry(arch_key, "class", arch_key + ".{from_hugging_face,quantize} + PretrainedModel",
                 methods={"from_hugging_face": signature(rec[arch_key + ".from_hugging_face"]),
                          "quantize": signature(rec[arch_key + ".quantize"]),
                          **pretrained_methods})
    plugin = _config_entry("tensorrt_llm.plugin.PluginConfig", "tensorrt_llm.plugin.PluginConfig",
                           rec["tensorrt_llm.plugin.PluginConfig"]["props"])
    runner_key = "tensorrt_llm.runtime.ModelRunnerCpp.from_dir (jetson branch)"
    runner = Entry("tensorrt_llm.runtime.ModelRunnerCpp", "class", runner_key,
                   methods={"from_dir": signature(rec[runner_key]),
                            "generate": signature(rec["tensorrt_llm.runtime.ModelRunnerCpp.generate"])})
    functions = {
        "tensorrt_llm.builder.build": "tensorrt_llm.builder.build",
        "tensorrt_llm.builder.get_engine_version": "tensorrt_llm.builder.get_engine_version",
        "tensorrt_llm.runtime.decode_words_list": "tensorrt_llm.runtime.decode_words_list",
    }
    for path, key in functions.items():
        e[path] = Entry(path, "function", key, init=signature(rec[key]))

    hlapi_names = rec["tensorrt_llm.hlapi"]
    hlapi_defs = {"LLM": llm, "SamplingParams": sampling, "KvCacheConfig": kv,
                  "BuildConfig": build_config, "QuantConfig": quant_config, "QuantAlgo": quant_algo,
                  "RequestOutput": request}
    for name in hlapi_names:
        path = f"tensorrt_llm.hlapi.{name}"
        e[path] = _alias(hlapi_defs[name], path) if name in hlapi_defs else Entry(
            path, "name", "tensorrt_llm.hlapi")
    for entry in (llm, build_config, quant_config, quant_algo, engine, pretrained, plugin, runner):
        e[entry.path] = entry
    e["tensorrt_llm.models.modeling_utils.PretrainedModel"] = _alias(
        pretrained, "tensorrt_llm.models.modeling_utils.PretrainedModel")
    modules = {
        "tensorrt_llm": ("__version__", "LLM", "hlapi", "builder", "models", "plugin", "quantization",
                         "runtime"),
        "tensorrt_llm.hlapi": tuple(hlapi_names),
        "tensorrt_llm.builder": ("BuildConfig", "build", "Engine", "get_engine_version"),
        "tensorrt_llm.models": ("PretrainedModel", "modeling_utils"),
        "tensorrt_llm.models.modeling_utils": ("QuantConfig", "PretrainedModel"),
        "tensorrt_llm.quantization": ("QuantAlgo",),
        "tensorrt_llm.plugin": ("PluginConfig",),
        "tensorrt_llm.runtime": ("ModelRunnerCpp", "decode_words_list"),
    }
    for path, names in modules.items():
        e[path] = Entry(path, "module", "(module of recorded names)", attrs=frozenset(names))
    rec["tensorrt_llm.__version__"]  # noqa: B018 - read as the stand-in's version (see surface())
    handles = {"LLM": llm, "RequestOutput": request, "CompletionOutput": completion,
               "Engine": engine, "Arch": arch, "ArchModel": dataclasses.replace(arch, path="ArchModel")}
    patterns = {"tensorrt_llm.models": (r"[A-Za-z0-9]+ForCausalLM", "Arch")}
    return e, handles, patterns


def _surface_1x(rec: _Tracking, rec012: dict) -> Tuple[Dict[str, Entry], Dict[str, Entry],
                                                      Dict[str, Tuple]]:
    e: Dict[str, Entry] = {}
    llm_key = "tensorrt_llm._tensorrt_engine.LLM"
    llm = _llm_entry(llm_key, llm_key, rec[llm_key])
    guided = guided_additions("1.x")
    llm.init = dataclasses.replace(llm.init, params=llm.init.params + guided["llm_keywords"])
    e["tensorrt_llm.LLM"] = Entry("tensorrt_llm.LLM", "forbidden", "tensorrt_llm.LLM",
                                  reason=str(rec["tensorrt_llm.LLM"]))
    sampling = _config_entry("tensorrt_llm.sampling_params.SamplingParams",
                             "tensorrt_llm.sampling_params.SamplingParams",
                             rec["tensorrt_llm.sampling_params.SamplingParams"])
    request, completion = _result_entries("RequestOutput/GenerationResult",
                                          rec["RequestOutput/GenerationResult"])
    bc_key = "tensorrt_llm.builder.BuildConfig (>=0.15 defaults)"
    build_config = _config_entry("tensorrt_llm.builder.BuildConfig", bc_key, rec[bc_key])
    # The 1.x section records QuantAlgo as additions to 0.12's members and QuantConfig not at all
    # (tensorrt_llm.llmapi exports it): both inherit 0.12's record (TENSORRT_LLM_API.md).
    qa_key = "tensorrt_llm.quantization.QuantAlgo (adds)"
    quant_algo = Entry("tensorrt_llm.quantization.QuantAlgo", "enum",
                       "0.12 tensorrt_llm.quantization.QuantAlgo + 1.x " + qa_key,
                       attrs=frozenset(rec012["tensorrt_llm.quantization.QuantAlgo"])
                       | frozenset(rec[qa_key]))
    quant_config = _config_entry("tensorrt_llm.llmapi.QuantConfig",
                                 "0.12 tensorrt_llm.models.modeling_utils.QuantConfig",
                                 rec012["tensorrt_llm.models.modeling_utils.QuantConfig"])
    kv = _config_entry("tensorrt_llm.llmapi.KvCacheConfig", "SUPPLEMENT", SUPPLEMENT["KvCacheConfig"])
    runner_key = "tensorrt_llm.runtime.ModelRunnerCpp.from_dir"
    runner = Entry("tensorrt_llm.runtime.ModelRunnerCpp", "class", runner_key,
                   methods={"from_dir": signature(rec[runner_key])})
    llmapi_names = rec["tensorrt_llm.llmapi"]
    guided_params = _config_entry("tensorrt_llm.llmapi.GuidedDecodingParams",
                                  "guided record 1.x tensorrt_llm.llmapi.GuidedDecodingParams",
                                  guided["guided_fields"])
    llmapi_defs = {"SamplingParams": sampling, "KvCacheConfig": kv, "BuildConfig": build_config,
                   "QuantConfig": quant_config, "QuantAlgo": quant_algo, "RequestOutput": request,
                   "CompletionOutput": completion, "GuidedDecodingParams": guided_params}
    for name in llmapi_names:
        path = f"tensorrt_llm.llmapi.{name}"
        e[path] = _alias(llmapi_defs[name], path) if name in llmapi_defs else Entry(
            path, "name", "tensorrt_llm.llmapi")
    e[llm_key] = llm
    for entry in (sampling, build_config, quant_algo, runner):
        e[entry.path] = entry
    modules = {
        "tensorrt_llm": COMMON_PACKAGE_ATTRS + ("LLM", "_tensorrt_engine", "llmapi", "sampling_params",
                                                "builder", "quantization", "runtime"),
        "tensorrt_llm._tensorrt_engine": ("LLM",),
        "tensorrt_llm.llmapi": tuple(llmapi_names),
        "tensorrt_llm.sampling_params": ("SamplingParams",),
        "tensorrt_llm.builder": ("BuildConfig",),
        "tensorrt_llm.quantization": ("QuantAlgo",),
        "tensorrt_llm.runtime": ("ModelRunnerCpp",),
    }
    for path, names in modules.items():
        e[path] = Entry(path, "module", "(module of recorded names)", attrs=frozenset(names))
    handles = {"LLM": llm, "RequestOutput": request, "CompletionOutput": completion}
    return e, handles, {}


def surface(line: str, record: Optional[dict] = None) -> Surface:
    """The recorded API surface of ``line`` (``"0.12"`` or ``"1.x"``)."""
    record = record if record is not None else load_record()
    section = _Tracking(record[SECTIONS[line]])
    if line == "0.12":
        entries, handles, patterns = _surface_012(section)
        version = str(record[SECTIONS["0.12"]]["tensorrt_llm.__version__"])
    else:
        entries, handles, patterns = _surface_1x(section, record[SECTIONS["0.12"]])
        version = VERSION_1X
    return Surface(line, version, entries, handles, patterns, frozenset(section.read))


# -- the generated package ---------------------------------------------------------------------------


def bind(qualname: str, sig: Signature, args: Sequence[Any], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Check a call against a recorded signature like Python would; return the arguments by name."""
    if len(args) > sig.positional:
        raise TypeError(f"{qualname}() takes at most {sig.positional} positional arguments "
                        f"({len(args)} given) [{STAND_IN_NOTE}]")
    bound = dict(zip(sig.params, args))
    for name, value in kwargs.items():
        if name not in sig.params:
            raise TypeError(f"{qualname}() got an unexpected keyword argument {name!r} "
                            f"[{STAND_IN_NOTE}]")
        if name in bound:
            raise TypeError(f"{qualname}() got multiple values for argument {name!r}")
        bound[name] = value
    return bound


class StandInState:
    """What the stand-in was asked to do, and knobs for how it behaves (one per installed package)."""

    def __init__(self, line: str) -> None:
        self.line = line
        #: (name, arguments by keyword) of every constructor / function / method called.
        self.calls: List[Tuple[str, Dict[str, Any]]] = []
        #: Finish with an end-of-sequence after this many tokens (None: run to the token limit).
        self.eos_after: Optional[int] = None
        #: Seconds per generated token (the background "GPU" thread sleeps this long).
        self.step_delay_s = 0.002
        #: Every request generate_async made.
        self.requests: List["_RequestBase"] = []
        self.lock = threading.Lock()

    def record(self, name: str, arguments: Dict[str, Any]) -> None:
        with self.lock:
            self.calls.append((name, dict(arguments)))

    def calls_to(self, name: str) -> List[Dict[str, Any]]:
        """Arguments of every call to ``name`` (e.g. ``"KvCacheConfig"``, ``"LLM.generate_async"``)."""
        with self.lock:
            return [args for called, args in self.calls if called == name]


def stand_in_tokens(prompt_ids: Sequence[int], count: int, vocab_size: int,
                    avoid: Iterable[int] = ()) -> List[int]:
    """The ids the stand-in "generates" for a prompt: deterministic, never an id in ``avoid``, never
    below 100 (special tokens), so they decode to visible text."""
    avoid = set(avoid)
    span = max(vocab_size - 100, 1)
    x = sum(int(t) for t in prompt_ids) % span
    out = []
    for i in range(count):
        x = (x * 31 + 7 + i) % span
        token = 100 + x
        while token in avoid:
            token = 100 + (token - 99) % span
        out.append(token)
    return out


def _config_class(entry: Entry, state: StandInState, name: str) -> type:
    """A class accepting exactly the recorded fields (keyword-only), with recorded defaults."""
    sig = entry.init

    def __init__(self, *args, **kwargs):
        bound = bind(name, sig, args, kwargs)
        state.record(name, bound)
        for field in sig.params:
            setattr(self, field, bound.get(field, sig.default(field)))

    def __repr__(self):
        shown = ", ".join(f"{f}={getattr(self, f)!r}" for f in sig.params
                          if getattr(self, f) is not None)
        return f"{name}({shown})"

    return type(name, (), {"__init__": __init__, "__repr__": __repr__, "__stand_in__": True,
                           "__doc__": f"Stand-in {name}: fields {', '.join(sig.params)} "
                                      f"({entry.source})."})


def _one_guide(cls: type) -> type:
    """GuidedDecodingParams validates that at most one guide is set (ValueError otherwise)."""
    def __init__(self, *args, **kwargs):
        cls.__init__(self, *args, **kwargs)
        count = sum(bool(getattr(self, f)) for f in guided_additions("1.x")["guided_fields"])
        if count > 1:
            raise ValueError(f"Only one guide can be used for a request, but got {count}.")
    return type(cls.__name__, (cls,), {"__init__": __init__})


def _enum_class(entry: Entry, name: str) -> type:
    members = {member: member for member in sorted(entry.attrs)}
    return type(name, (), {**members, "__stand_in__": True,
                           "__doc__": f"Stand-in {name}: members as recorded ({entry.source})."})


def _name_only_class(entry: Entry, name: str) -> type:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError(f"{STAND_IN_NOTE}: only the name {entry.path} is recorded, not its "
                                  f"fields")
    return type(name, (), {"__init__": __init__, "__stand_in__": True})


def _forbidden_class(entry: Entry, name: str) -> type:
    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{STAND_IN_NOTE}: {entry.path} is recorded as: {entry.reason}")
    return type(name, (), {"__init__": __init__, "__stand_in__": True})


def _unemulated_callable(entry: Entry, qualname: str, sig: Signature, state: StandInState):
    def call(*args, **kwargs):
        state.record(qualname, bind(qualname, sig, args, kwargs))
        raise NotImplementedError(f"{STAND_IN_NOTE}: {qualname} is recorded but not emulated")
    return call


def _unemulated_class(entry: Entry, name: str, state: StandInState) -> type:
    """Recorded methods that check their arguments, then say they are not emulated."""
    methods = {method: staticmethod(_unemulated_callable(entry, f"{name}.{method}", sig, state))
               for method, sig in entry.methods.items()}
    return type(name, (), {**methods, "__stand_in__": True})


# Engines and checkpoints on disk ---------------------------------------------------------------------

ENGINE_FILE = "rank0.engine"


def _hf_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text(encoding="utf-8"))


def _resolve_dtype(dtype: Optional[str], hf: dict) -> str:
    if dtype and dtype != "auto":
        return dtype
    native = hf.get("torch_dtype") or hf.get("dtype") or "float16"
    return "float16" if native == "float32" else native


def _write_engine(engine_dir: Path, pretrained: dict, build: dict, version: str) -> None:
    engine_dir.mkdir(parents=True, exist_ok=True)
    (engine_dir / "config.json").write_text(json.dumps({
        "version": version, "pretrained_config": pretrained, "build_config": build,
        "stand_in": f"written by the {STAND_IN_NOTE}: not a TensorRT engine"}, indent=2))
    (engine_dir / ENGINE_FILE).write_bytes(b"tensorrt_llm stand-in engine: not a TensorRT plan\n")


def _build_settings(build_config: Any, hf: dict) -> dict:
    """The engine's build_config as the stand-in's ``build`` derives it (checks like the real one)."""
    settings = {f: getattr(build_config, f, None) for f in
                ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "max_beam_width")}
    if settings["max_seq_len"] is None:
        settings["max_seq_len"] = int(hf.get("max_position_embeddings") or 2048)
    if settings["max_input_len"] > settings["max_seq_len"]:
        raise ValueError("max_input_len should not be larger than max_seq_len")
    return settings


# Runtime ---------------------------------------------------------------------------------------------


class _CompletionBase:
    """Fields common to both lines' CompletionOutput (only recorded names are defined)."""

    def __init__(self, skip_text: bool) -> None:
        self.index = 0
        self.token_ids: List[int] = []
        self.cumulative_logprob = None
        self.logprobs: List[float] = []
        self.generation_logits = None
        self._skip_text = skip_text

    @property
    def text(self) -> str:
        return "" if self._skip_text else "".join(f"<{t}>" for t in self.token_ids)

    @property
    def length(self) -> int:
        return len(self.token_ids)


class _Completion012(_CompletionBase):
    """0.12 CompletionOutput: cumulative token_ids; text_diff advances on every read; no
    finish_reason."""

    def __init__(self, skip_text: bool) -> None:
        super().__init__(skip_text)
        self._last_text_len = 0

    @property
    def text_diff(self) -> str:
        text = self.text
        diff, self._last_text_len = text[self._last_text_len:], len(text)
        return diff


class _Completion1x(_CompletionBase):
    """1.x CompletionOutput: token_ids_diff and finish_reason."""

    def __init__(self, skip_text: bool) -> None:
        super().__init__(skip_text)
        self.prompt_logprobs: List[float] = []
        self.finish_reason: Optional[str] = None
        self.stop_reason = None
        self._diff_from = 0
        self._text_from = 0

    @property
    def token_ids_diff(self) -> List[int]:
        return self.token_ids[self._diff_from:]

    @property
    def text_diff(self) -> str:
        return self.text[self._text_from:]

    @property
    def logprobs_diff(self) -> List[float]:
        return []


class _RequestBase:
    """A streaming request: a background thread plays the GPU, the consumer iterates the request."""

    completion_class = _CompletionBase

    def __init__(self, request_id: int, prompt_ids: List[int], tokens: List[int], finish: str,
                 state: StandInState, skip_text: bool, choose=None) -> None:
        self.request_id = request_id
        self.prompt = None
        self.prompt_token_ids = list(prompt_ids)
        self.outputs = [self.completion_class(skip_text)]
        self.context_logits = None
        self.finished = False
        self.generated = 0       # tokens the background thread produced (read by tests)
        self.done = threading.Event()
        self._state = state
        self._steps: "queue.Queue" = queue.Queue()
        self._abort = threading.Event()
        target, args = (self._run, (tokens, finish)) if choose is None else \
            (self._run_stepwise, (choose, len(tokens)))
        self._thread = threading.Thread(target=target, args=args, daemon=True,
                                        name=f"trtllm-standin-request-{request_id}")
        self._thread.start()

    def _run(self, tokens: List[int], finish: str) -> None:
        try:
            for i, token in enumerate(tokens):
                if self._abort.is_set():
                    self._steps.put(([], "cancelled"))
                    return
                time.sleep(self._state.step_delay_s)
                self.generated += 1
                last = i == len(tokens) - 1 and finish == "length"
                self._steps.put(([token], "length" if last else None))
            if finish == "stop":
                # End-of-sequence: a final response with no new token (end_id is not returned).
                self._steps.put(([], "stop"))
        finally:
            self.done.set()

    def _run_stepwise(self, choose, limit: int) -> None:
        """Constrained generation: ``choose(generated)`` picks each token from logits the request's
        post-processor / guide masked (None = end-of-sequence)."""
        generated: List[int] = []
        try:
            for i in range(limit):
                if self._abort.is_set():
                    self._steps.put(([], "cancelled"))
                    return
                time.sleep(self._state.step_delay_s)
                token = choose(generated)
                if token is None:
                    self._steps.put(([], "stop"))
                    return
                generated.append(token)
                self.generated += 1
                self._steps.put(([token], "length" if i == limit - 1 else None))
        except Exception as exc:  # noqa: BLE001 - reaches the reader like the library's errors
            self._steps.put((exc, "error"))
        finally:
            self.done.set()

    def _step(self) -> None:
        new, reason = self._steps.get(timeout=30)
        if reason == "error":
            self.finished = True
            raise RuntimeError(f"Encountered an error in forwardAsync function: {new} "
                               f"[{STAND_IN_NOTE}]")
        self._advance(new, reason)

    def _advance(self, new: List[int], reason: Optional[str]) -> None:
        self.outputs[0].token_ids.extend(new)
        if reason is not None:
            self.finished = True

    def __iter__(self):
        return self

    def __next__(self):
        if self.finished:
            raise StopIteration
        self._step()
        return self

    def result(self, timeout: Optional[float] = None):
        while not self.finished:
            self._step()
        return self


class _Request012(_RequestBase):
    """0.12 RequestOutput: no finish_reason, cancel() not implemented."""

    completion_class = _Completion012

    def __aiter__(self):
        raise NotImplementedError(f"{STAND_IN_NOTE}: async iteration is not emulated")

    def cancel(self):
        raise NotImplementedError("cancel() is not implemented in TensorRT-LLM 0.12 [stand-in]")


class _Request1x(_RequestBase):
    """1.x RequestOutput: token_ids_diff, finish_reason, abort()."""

    completion_class = _Completion1x

    def __init__(self, *args, **kwargs) -> None:
        self.disaggregated_params = None
        super().__init__(*args, **kwargs)

    def _advance(self, new: List[int], reason: Optional[str]) -> None:
        completion = self.outputs[0]
        completion._diff_from = len(completion.token_ids)
        completion._text_from = len(completion.text)
        super()._advance(new, reason)
        if reason is not None:
            completion.finish_reason = reason

    def abort(self) -> None:
        self._state.record("RequestOutput.abort", {})
        self._abort.set()

    def aborted(self) -> bool:
        return self._abort.is_set()


def _llm_class(entry: Entry, line: str, version: str, state: StandInState) -> type:
    """The LLM of ``line``: opens stand-in engine directories, or "builds" one from a Hugging Face
    checkpoint (both lines' LLM API build when given one), and streams stand-in tokens."""
    init_sig = entry.init
    methods = entry.methods
    prompt_param = methods["generate_async"].params[0]  # 0.12: prompt, 1.x: inputs
    max_field = "max_new_tokens" if line == "0.12" else "max_tokens"
    request_class = _Request012 if line == "0.12" else _Request1x

    class LLM:
        __stand_in__ = True
        __doc__ = f"Stand-in LLM for TensorRT-LLM {line} ({entry.source})."

        def __init__(self, *args, **kwargs):
            bound = bind("LLM", init_sig, args, kwargs)
            state.record("LLM", bound)
            model = Path(str(bound["model"]))
            self._skip_text = bool(bound.get("skip_tokenizer_init"))
            self._closed = False
            self._next_id = 1
            self._processors = dict(bound.get("logits_post_processor_map") or {})
            self._guided = bound.get("guided_decoding_backend")
            self._grammar_tokenizer = None
            if self._guided is not None:
                guided = guided_additions("1.x")
                if self._guided not in guided["backends"]:
                    raise ValueError(f"guided_decoding_backend: input should be one of "
                                     f"{guided['backends']} [{STAND_IN_NOTE}]")
                if self._guided not in guided["engine_backends"]:
                    raise ValueError(f"Unsupported guided decoding backend {self._guided}")
                if self._skip_text:
                    raise RuntimeError("guided decoding needs the tokenizer: skip_tokenizer_init "
                                       f"must be False [{STAND_IN_NOTE}, inferred]")
                self._grammar_tokenizer = _emulated_xgrammar_tokenizer(model)
            if (model / ENGINE_FILE).is_file():
                config = json.loads((model / "config.json").read_text(encoding="utf-8"))
                if config.get("version") != version:
                    raise RuntimeError(f"engine version {config.get('version')} != {version} "
                                       f"[{STAND_IN_NOTE}]")
                self._pretrained, self._build = config["pretrained_config"], config["build_config"]
            elif (model / "config.json").is_file():
                hf = _hf_config(model)
                quant = bound.get("quant_config")
                algo = getattr(quant, "quant_algo", None)
                if algo in ("W4A16_AWQ", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "FP8", "W4A8_AWQ"):
                    raise RuntimeError(f"{algo} calibrates: the LLM API would download cnn_dailymail "
                                       f"here [{STAND_IN_NOTE}]")
                self._pretrained = {"architecture": hf["architectures"][0],
                                    "dtype": _resolve_dtype(bound.get("dtype"), hf),
                                    "vocab_size": hf.get("vocab_size", 32000),
                                    "quantization": {"quant_algo": algo}}
                self._build = _build_settings(bound.get("build_config"), hf)
            else:
                raise ValueError(f"{model} is neither an engine nor a checkpoint [{STAND_IN_NOTE}]")

        def generate_async(self, *args, **kwargs):
            bound = bind("LLM.generate_async", methods["generate_async"], args, kwargs)
            state.record("LLM.generate_async", bound)
            if self._closed:
                raise RuntimeError("the LLM was shut down")
            prompt = bound[prompt_param]
            if not (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
                raise TypeError(f"with skip_tokenizer_init the prompt must be token ids, got "
                                f"{type(prompt).__name__}")
            params = bound.get("sampling_params")
            if params is None or params.end_id is None:
                raise ValueError("sampling_params with end_id are required without a tokenizer")
            if not bound.get("streaming"):
                raise NotImplementedError(f"{STAND_IN_NOTE}: only streaming is emulated")
            limit = getattr(params, max_field)
            if len(prompt) > self._build["max_input_len"]:
                raise ValueError(f"prompt length {len(prompt)} exceeds max_input_len")
            if len(prompt) + limit > self._build["max_seq_len"]:
                raise ValueError(f"The sum of prompt length ({len(prompt)}) and {max_field} ({limit}) "
                                 f"should not exceed max_seq_len ({self._build['max_seq_len']})")
            avoid = {params.end_id, params.pad_id, *(params.stop_token_ids or [])}
            count, finish = limit, "length"
            if state.eos_after is not None and state.eos_after < limit:
                count, finish = state.eos_after, "stop"
            tokens = stand_in_tokens(prompt, count, int(self._pretrained["vocab_size"]), avoid)
            choose = self._constrained_choice(params, prompt, self._next_id, avoid)
            if choose is not None:
                tokens = [0] * limit   # constrained: generated step by step, up to the limit
            request = request_class(self._next_id, prompt, tokens, finish, state, self._skip_text,
                                    choose)
            self._next_id += 1
            with state.lock:
                state.requests.append(request)
            return request

        def _constrained_choice(self, params, prompt, req_id, ends):
            """The per-step token picker of a constrained request (None: not constrained):
            random logits, masked by the named post-processor (0.12) or the guide (1.x), argmax."""
            vocab = int(self._pretrained["vocab_size"])
            if line == "0.12":
                name = params.logits_post_processor_name
                if name is None:
                    return None
                if name not in self._processors:
                    raise ValueError(f"no logits post-processor named {name!r} [{STAND_IN_NOTE}]")
                processor = self._processors[name]

                def constrain(logits, generated):
                    processor(req_id, logits, [list(prompt) + generated], None, None)
            else:
                guide = params.guided_decoding
                if guide is None or not any(getattr(guide, f) for f in
                                            guided_additions("1.x")["guided_fields"]):
                    return None
                if self._guided is None:
                    raise RuntimeError("Request is specified with GuidedDecodingParams, but "
                                       "GuidedDecoder is not setup. [stand-in]")
                for field in guided_additions("1.x")["engine_forbidden"]:
                    if getattr(guide, field):
                        raise RuntimeError(f"{field} guides are not built on the engine path "
                                           f"[{STAND_IN_NOTE}]")
                matcher = _emulated_xgrammar_matcher(self._grammar_tokenizer, guide)

                def constrain(logits, generated):
                    if generated:
                        matcher.consume_token(generated[-1])
                    allowed = _matcher_allowed(matcher, vocab)
                    logits[0, 0, :len(allowed)][~_torch().from_numpy(allowed)] = float("-inf")

            def choose(generated):
                torch = _torch()
                rng = torch.Generator().manual_seed(sum(prompt) + 7919 * len(generated))
                logits = torch.randn((1, 1, vocab), generator=rng)
                constrain(logits, generated)
                token = int(torch.argmax(logits[0, 0]))
                if logits[0, 0, token] == float("-inf"):
                    raise RuntimeError("every token was masked")
                return None if token in ends else token
            return choose

        def save(self, *args, **kwargs):
            bound = bind("LLM.save", methods["save"], args, kwargs)
            state.record("LLM.save", bound)
            _write_engine(Path(bound["engine_dir"]), self._pretrained, self._build, version)

        def _shutdown(self):
            self._closed = True
            state.record("LLM.shutdown", {})

        def __enter__(self):
            return self

        def __exit__(self, exc_type, exc_value, traceback):
            self._shutdown()
            return False

    if "shutdown" in methods:
        def shutdown(self, *args, **kwargs):
            bind("LLM.shutdown", methods["shutdown"], args, kwargs)
            self._shutdown()
        LLM.shutdown = shutdown
    if "tokenizer" in entry.attrs:
        LLM.tokenizer = property(lambda self: None)
    return LLM


def _torch():
    import torch
    return torch


def _emulated_xgrammar_tokenizer(engine_dir: Path):
    """The stand-in's stand-in for xgrammar: llguidance over the tokenizer beside the engine."""
    import llguidance.hf
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(engine_dir))
    return llguidance.hf.from_tokenizer(tokenizer, eos_token=tokenizer.eos_token_id)


def _emulated_xgrammar_matcher(grammar_tokenizer, guide):
    """A matcher for a GuidedDecodingParams (its one guide), like xgrammar compiles it."""
    import llguidance
    from llguidance.gbnf_to_lark import gbnf_to_lark
    matcher = llguidance.LLMatcher
    if guide.json_object:
        grammar = matcher.grammar_from_json_schema({"type": "object"})
    elif guide.json is not None:
        schema = json.loads(guide.json) if isinstance(guide.json, str) else guide.json
        grammar = matcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    elif guide.regex is not None:
        grammar = matcher.grammar_from_regex(guide.regex)
    else:
        grammar = matcher.grammar_from_lark(gbnf_to_lark(guide.grammar))
    compiled = llguidance.LLMatcher(grammar_tokenizer, grammar)
    if compiled.is_error():
        raise RuntimeError(f"xgrammar could not compile the guide: {compiled.get_error()}")
    return compiled


def _matcher_allowed(matcher, vocab: int):
    import numpy as np
    bits = np.zeros((vocab + 31) // 32, dtype=np.int32)
    matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
    return np.unpackbits(bits.view(np.uint8), bitorder="little")[:vocab].view(bool).copy()


# Building (0.12 classes API) ---------------------------------------------------------------------


class _StandInModel:
    """What ``<Arch>.from_hugging_face`` / ``from_checkpoint`` return: a converted model's config."""

    def __init__(self, config: dict) -> None:
        self._config = config


def _arch_class(name: str, arch: Entry, state: StandInState) -> type:
    calibrated = ("W4A16_AWQ", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "FP8", "W4A8_AWQ")

    def pretrained_config(hf_dir: Path, dtype: Optional[str], quant: Any) -> dict:
        hf = _hf_config(hf_dir)
        return {"architecture": hf["architectures"][0], "dtype": _resolve_dtype(dtype, hf),
                "vocab_size": hf.get("vocab_size", 32000), "trt_class": name,
                "max_position_embeddings": hf.get("max_position_embeddings"),
                "quantization": {"quant_algo": getattr(quant, "quant_algo", None),
                                 "group_size": getattr(quant, "group_size", None),
                                 "smoothquant_val": getattr(quant, "smoothquant_val", None)}}

    def from_hugging_face(cls, *args, **kwargs):
        bound = bind(f"{name}.from_hugging_face", arch.methods["from_hugging_face"], args, kwargs)
        state.record("Arch.from_hugging_face", {**bound, "class": name})
        quant = bound.get("quant_config")
        if getattr(quant, "quant_algo", None) in calibrated:
            raise ValueError(f"{quant.quant_algo} needs calibration: use quantize() [{STAND_IN_NOTE}]")
        return _StandInModel(pretrained_config(Path(bound["hf_model_or_dir"]), bound.get("dtype"),
                                               quant))

    def quantize(cls, *args, **kwargs):
        bound = bind(f"{name}.quantize", arch.methods["quantize"], args, kwargs)
        state.record("Arch.quantize", {**bound, "class": name})
        calib = str(bound.get("calib_dataset") or "cnn_dailymail")
        downloads = ("cnn_dailymail", "pileval", "scienceqa")
        if not Path(calib).is_dir() or any(m in calib for m in downloads):
            raise RuntimeError(f"would download calibration dataset {calib!r} [{STAND_IN_NOTE}]")
        samples = 0
        for path in Path(calib).glob("train*.json*"):
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    json.loads(line)["text"]  # the loader reads the 'text' column
                    samples += 1
        if not samples:
            raise ValueError(f"no 'text' samples in the train split of {calib} [{STAND_IN_NOTE}]")
        out = Path(bound["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        config = pretrained_config(Path(bound["hf_model_dir"]), bound.get("dtype"),
                                   bound.get("quant_config"))
        config["calibration_samples"] = samples
        (out / "config.json").write_text(json.dumps(config))
        (out / "rank0.safetensors").write_bytes(b"stand-in checkpoint\n")

    def from_checkpoint(cls, *args, **kwargs):
        bound = bind(f"{name}.from_checkpoint", arch.methods["from_checkpoint"], args, kwargs)
        state.record("Arch.from_checkpoint", {**bound, "class": name})
        return _StandInModel(json.loads((Path(bound["ckpt_dir"]) / "config.json").read_text()))

    def save_checkpoint(self, *args, **kwargs):
        bind(f"{name}.save_checkpoint", arch.methods["save_checkpoint"], args, kwargs)
        raise NotImplementedError(f"{STAND_IN_NOTE}: save_checkpoint is not emulated")

    return type(name, (_StandInModel,), {
        "from_hugging_face": classmethod(from_hugging_face), "quantize": classmethod(quantize),
        "from_checkpoint": classmethod(from_checkpoint), "save_checkpoint": save_checkpoint,
        "__init__": lambda self, config=None: _StandInModel.__init__(self, config or {}),
        "__stand_in__": True, "__doc__": f"Stand-in {name} ({arch.source})."})


def _engine_class(entry: Entry, version: str, state: StandInState) -> type:
    class Engine:
        __stand_in__ = True

        def __init__(self, pretrained: dict, build: dict) -> None:
            self._pretrained, self._build = pretrained, build

        def save(self, *args, **kwargs):
            bound = bind("Engine.save", entry.methods["save"], args, kwargs)
            state.record("Engine.save", bound)
            _write_engine(Path(bound["engine_dir"]), self._pretrained, self._build, version)

        @classmethod
        def from_dir(cls, *args, **kwargs):
            bound = bind("Engine.from_dir", entry.methods["from_dir"], args, kwargs)
            config = json.loads((Path(bound["engine_dir"]) / "config.json").read_text())
            return cls(config["pretrained_config"], config["build_config"])

    return Engine


def _build_function(entry: Entry, engine_class: type, state: StandInState):
    def build(*args, **kwargs):
        bound = bind("build", entry.init, args, kwargs)
        state.record("build", bound)
        model, build_config = bound["model"], bound["build_config"]
        pretrained = dict(model._config)
        hf_like = {"max_position_embeddings": pretrained.get("max_position_embeddings")}
        return engine_class(pretrained, _build_settings(build_config, hf_like))
    return build


def _get_engine_version(entry: Entry):
    def get_engine_version(*args, **kwargs):
        bound = bind("get_engine_version", entry.init, args, kwargs)
        return json.loads((Path(bound["engine_dir"]) / "config.json").read_text()).get("version")
    return get_engine_version


def build_package(line: str) -> Dict[str, types.ModuleType]:
    """Generate the stand-in ``tensorrt_llm`` package of ``line``: module name -> module."""
    surf = surface(line)
    state = StandInState(line)
    version = surf.version
    objects: Dict[str, Any] = {}
    engine_class = None
    if "tensorrt_llm.builder.Engine" in surf.entries:
        engine_class = _engine_class(surf.entries["tensorrt_llm.builder.Engine"], version, state)
    llm_class = _llm_class(surf.handles["LLM"], line, version, state)
    for path, entry in surf.entries.items():
        short = path.rsplit(".", 1)[-1]
        if entry.kind == "module":
            continue
        if short == "LLM" and entry.kind == "class":
            objects[path] = llm_class
        elif entry.kind == "forbidden":
            objects[path] = _forbidden_class(entry, short)
        elif entry.kind == "name":
            objects[path] = _name_only_class(entry, short)
        elif entry.kind == "enum":
            objects[path] = _enum_class(entry, short)
        elif path.endswith(".RequestOutput"):
            objects[path] = _Request012 if line == "0.12" else _Request1x
        elif path.endswith(".CompletionOutput"):
            objects[path] = _Completion1x
        elif path == "tensorrt_llm.builder.Engine":
            objects[path] = engine_class
        elif path == "tensorrt_llm.builder.build":
            objects[path] = _build_function(entry, engine_class, state)
        elif path == "tensorrt_llm.builder.get_engine_version":
            objects[path] = _get_engine_version(entry)
        elif entry.kind == "function":
            objects[path] = _unemulated_callable(entry, short, entry.init, state)
        elif entry.methods and entry.init is None:  # PretrainedModel, ModelRunnerCpp
            objects[path] = _unemulated_class(entry, short, state)
        else:
            objects[path] = _config_class(entry, state, short)
            if short == "GuidedDecodingParams":
                objects[path] = _one_guide(objects[path])
    # Same definition under two paths (hlapi.QuantConfig / models.modeling_utils.QuantConfig) must be
    # the same class, as in the real package.
    canonical: Dict[Tuple[str, str], Any] = {}
    for path, entry in surf.entries.items():
        if entry.kind in ("class", "enum") and path in objects:
            key = (entry.source, path.rsplit(".", 1)[-1])
            objects[path] = canonical.setdefault(key, objects[path])

    modules: Dict[str, types.ModuleType] = {}
    for path, entry in surf.entries.items():
        if entry.kind != "module":
            continue
        module = types.ModuleType(path, f"STAND-IN {path} for TensorRT-LLM {line}: {STAND_IN_NOTE}.")
        module.__stand_in__ = True
        module.__path__ = []  # a package, so submodules resolve through sys.modules
        modules[path] = module
    for path, module in modules.items():
        for name in surf.entries[path].attrs:
            child = f"{path}.{name}"
            if child in modules:
                setattr(module, name, modules[child])
            elif child in objects:
                setattr(module, name, objects[child])
    root = modules["tensorrt_llm"]
    root.__version__ = version
    root.__stand_in_state__ = state
    root.__stand_in_line__ = line
    for path, (pattern, handle) in surf.patterns.items():
        arch_entry = surf.handles[handle]
        cache: Dict[str, type] = {}

        def module_getattr(attr, _pattern=pattern, _entry=arch_entry, _cache=cache):
            if re.fullmatch(_pattern, attr):
                return _cache.setdefault(attr, _arch_class(attr, _entry, state))
            raise AttributeError(attr)

        modules[path].__getattr__ = module_getattr
    return modules


def install(line: str, monkeypatch) -> types.ModuleType:
    """Put the stand-in package of ``line`` into ``sys.modules`` for one test (monkeypatch undoes it);
    returns the root module (``__stand_in_state__`` holds the calls and knobs)."""
    import sys
    for name in list(sys.modules):
        if name == "tensorrt_llm" or name.startswith("tensorrt_llm."):
            monkeypatch.delitem(sys.modules, name)
    modules = build_package(line)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return modules["tensorrt_llm"]
