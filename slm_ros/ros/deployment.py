"""Board profile + model card -> each node's parameter files, the way the launch files do it.

``config/profiles/<board>.yaml`` holds what depends on the hardware (backend, device, KV memory
fraction, the planner's memory preset), ``config/models/<model>.yaml`` what depends on the model
(checkpoint path, context limits, generation defaults); both are ordinary ROS parameter files whose
sections name the nodes (``/**/llm``, ``/**/vision``, ``/**/engine_builder``). Each also carries a
documented card section (``slm_ros_profile`` / ``slm_ros_model_card``): no node has that name, so
nodes never see it; the launch files, ``slm-ros up`` and the tests read it: a profile's default
models, a model's chat template, context length and, per board, the backend and quantization it
runs with there (or ``does-not-fit``, a pair the memory planner refuses).

A profile with ``remote: true`` (``config/profiles/remote.yaml``) runs no model on the robot: its
nodes use a backend that streams from a server (``openai``). It has no board memory, so nothing is
planned against it and model cards say nothing about it; it names the served models in its node
sections (``model``), and there is no engine to build: :func:`plan_node` marks the engine builder
as not started (:attr:`NodePlan.skip`) and overrides ``wait_for_builder`` to false.

:func:`plan_node` is the single place that turns (node, profile, model, extra file, overrides) into
a :class:`NodePlan`: the ordered parameter files, the command-line overrides and the remappings.
``launch/slm_node.launch.py`` and ``slm-ros up`` both use it, so the two start the same graph.
:func:`check_plan` validates a plan against the node's declared parameters and names file and key.

No ROS import at module level (the node parameter tables are imported when a node is checked).
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from slm_ros.core.errors import ConfigError
from slm_ros.ros.param_files import (ParamFile, ParamFileError, check_node_params, display_path,
                                     read_param_file)

PACKAGE = "slm_ros"
CARD_SECTION = "slm_ros_model_card"
PROFILE_SECTION = "slm_ros_profile"
DOES_NOT_FIT = "does-not-fit"


@dataclasses.dataclass(frozen=True)
class NodeKind:
    """An installed node executable: its default node name and where its parameter table lives."""

    executable: str
    name: str
    module: str
    class_name: str
    modality: str  # text, vision, or "" (the engine builder)

    def parameters(self) -> Tuple:
        """The node's ParamSpec table (imports the node module: rclpy)."""
        return importlib.import_module(self.module).PARAMETERS

    def node_class(self):
        """The node class (imports the node module: rclpy)."""
        return getattr(importlib.import_module(self.module), self.class_name)


NODES: Dict[str, NodeKind] = {k.executable: k for k in (
    NodeKind("llm_node", "llm", "slm_ros.nodes.llm_node", "LlmNode", "text"),
    NodeKind("vision_node", "vision", "slm_ros.nodes.vision_node", "VisionNode", "vision"),
    NodeKind("engine_builder_node", "engine_builder", "slm_ros.nodes.engine_builder_node",
             "EngineBuilderNode", ""),
)}


def node_kind(executable: str) -> NodeKind:
    try:
        return NODES[executable]
    except KeyError:
        raise ConfigError(f"unknown node {executable!r}; known: {', '.join(NODES)}") from None


# -- where the files are -------------------------------------------------------------------------


def share_dir() -> Path:
    """The installed ``share/slm_ros`` (ament index, else the environment prefix, which is where a
    pip install puts it when AMENT_PREFIX_PATH is not set)."""
    candidates = []
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
        try:
            candidates.append(Path(get_package_share_directory(PACKAGE)))
        except (PackageNotFoundError, OSError, ValueError):
            pass
    except ImportError:
        pass
    candidates.append(Path(sys.prefix) / "share" / PACKAGE)
    for path in candidates:
        if (path / "config").is_dir():
            return path
    raise ConfigError(f"cannot find the installed share/{PACKAGE}/config (looked in "
                      f"{', '.join(str(c) for c in candidates)}); run scripts/setup.sh or colcon "
                      f"build")


def _names(directory: Path) -> List[str]:
    return sorted(p.name[:-5] for p in directory.glob("*.yaml")) if directory.is_dir() else []


def profile_names(share: Optional[Path] = None) -> List[str]:
    return _names((share or share_dir()) / "config" / "profiles")


def model_names(share: Optional[Path] = None) -> List[str]:
    return _names((share or share_dir()) / "config" / "models")


def profile_path(name: str, share: Optional[Path] = None) -> Path:
    """``config/profiles/<name>.yaml``, or a YAML path given as is."""
    share = share or share_dir()
    if name.endswith((".yaml", ".yml")):
        return Path(name).expanduser()
    path = share / "config" / "profiles" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown profile {name!r}; known: {', '.join(profile_names(share))} "
                          f"(config/profiles/)")
    return path


def model_card_path(name: str, share: Optional[Path] = None) -> Optional[Path]:
    """``config/models/<name>.yaml`` when ``name`` is a model card (or a card's path), else None:
    then ``name`` is a model value for the node (``default``, a checkpoint directory, a .gguf)."""
    if name.endswith((".yaml", ".yml")):
        return Path(name).expanduser()
    if not name or "/" in name or name == "default":
        return None
    path = (share or share_dir()) / "config" / "models" / f"{name}.yaml"
    return path if path.is_file() else None


# -- cards ---------------------------------------------------------------------------------------


#: Backends whose model is always an engine-builder artifact (never the checkpoint itself).
BUILT_BACKENDS = ("tensorrt_llm", "onnxruntime_genai", "openvino")


@dataclasses.dataclass(frozen=True)
class Deployment:
    """How a model runs on one board: backend and quantization, or that it does not fit."""

    backend: str = ""
    quantization: str = "none"
    fits: bool = True

    @classmethod
    def parse(cls, text: str, where: str) -> "Deployment":
        words = str(text).split()
        if words == [DOES_NOT_FIT]:
            return cls(fits=False)
        if len(words) != 2:
            raise ConfigError(f"{where}: expected '<backend> <quantization>' or '{DOES_NOT_FIT}', "
                              f"got {text!r}")
        return cls(words[0], words[1])

    @property
    def needs_builder(self) -> bool:
        """TensorRT-LLM engines, ONNX Runtime GenAI and OpenVINO models, and quantized artifacts are
        made by the engine builder."""
        return self.fits and (self.backend in BUILT_BACKENDS or self.quantization != "none")


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """The ``slm_ros_model_card`` section of ``config/models/<name>.yaml``."""

    name: str
    path: Path
    title: str
    hf_repo: str
    modality: str
    chat_template: str
    context_length: int
    boards: Dict[str, Deployment]
    loadable: bool = True
    not_loadable_reason: str = ""

    def on(self, profile: str) -> Optional[Deployment]:
        return self.boards.get(profile)


@dataclasses.dataclass(frozen=True)
class Profile:
    """The ``slm_ros_profile`` section of ``config/profiles/<name>.yaml``."""

    name: str
    path: Path
    title: str
    default_model: str
    default_vision_model: str
    #: Memory the planner checks against: a preset of slm_ros.build.device (Jetson boards), or
    #: memory_gb + discrete_gpu for the others.
    device_profile: str = ""
    memory_gb: float = 0.0
    discrete_gpu: bool = False
    #: Generation runs on a server (backend ``openai``): no on-board model, no memory plan, no
    #: model-card verdicts, no engine builder; default_model/default_vision_model stay empty.
    remote: bool = False

    def device(self):
        """The planner's :class:`~slm_ros.build.device.DeviceProfile` for this board."""
        if self.remote:
            raise ConfigError(f"profile {self.name} runs its models on a server (remote: true): "
                              f"it has no on-board memory to plan against")
        from slm_ros.build import device as dev
        if self.device_profile:
            return dev.preset(self.device_profile)
        reserve = dev.DISCRETE_RESERVE_BYTES if self.discrete_gpu else dev.CPU_RESERVE_BYTES
        return dev.DeviceProfile(self.name, int(self.memory_gb * dev.GiB),
                                 shared=not self.discrete_gpu, reserve_bytes=reserve)


def _card_section(path: Path, section: str) -> Tuple[ParamFile, Dict[str, Any]]:
    pfile = read_param_file(path)
    values = pfile.sections.get(section)
    if values is None:
        raise ConfigError(f"{pfile.shown}: no '{section}' section")
    return pfile, values


def _field(values: Mapping[str, Any], key: str, where: str, kind=str, default: Any = None):
    value = values.get(key, default)
    wrong_bool = isinstance(value, bool) != (kind is bool)  # YAML true is an int to Python
    if value is None or not isinstance(value, kind) or wrong_bool:
        raise ConfigError(f"{where}: '{key}' must be {kind.__name__}, got {value!r}")
    return value


def read_model_card(path) -> ModelCard:
    path = Path(path)
    pfile, values = _card_section(path, CARD_SECTION)
    where = f"{pfile.shown}: {CARD_SECTION}"
    boards = {key.split(".", 1)[1]: Deployment.parse(value, f"{where}: {key}")
              for key, value in values.items() if key.startswith("boards.")}
    modality = _field(values, "modality", where)
    if modality not in ("text", "vision"):
        raise ConfigError(f"{where}: modality must be text or vision, got {modality!r}")
    return ModelCard(
        name=path.name[:-5] if path.name.endswith(".yaml") else path.stem, path=path,
        title=_field(values, "title", where), hf_repo=_field(values, "hf_repo", where),
        modality=modality, chat_template=_field(values, "chat_template", where),
        context_length=_field(values, "context_length", where, int), boards=boards,
        loadable=_field(values, "loadable", where, bool, True),
        not_loadable_reason=_field(values, "not_loadable_reason", where, str, ""))


def read_profile(path) -> Profile:
    path = Path(path)
    pfile, values = _card_section(path, PROFILE_SECTION)
    where = f"{pfile.shown}: {PROFILE_SECTION}"
    name = path.name[:-5] if path.name.endswith(".yaml") else path.stem
    title = _field(values, "title", where)
    if _field(values, "remote", where, bool, False):
        # Served model names belong in the node sections (`model`), where a params_file can
        # override them; a default_model would become a launch override that no file could change.
        # Board memory means nothing for a model on a server.
        local_only = sorted(set(values) & {"default_model", "default_vision_model",
                                           "device_profile", "memory_gb", "discrete_gpu"})
        if local_only:
            raise ConfigError(f"{where}: a remote profile (remote: true) runs no model on the "
                              f"robot: remove {', '.join(local_only)} (name the served models "
                              f"with `model` in the /**/llm and /**/vision sections)")
        return Profile(name=name, path=path, title=title, default_model="",
                       default_vision_model="", remote=True)
    return Profile(
        name=name, path=path, title=title,
        default_model=_field(values, "default_model", where),
        default_vision_model=_field(values, "default_vision_model", where),
        device_profile=_field(values, "device_profile", where, str, ""),
        memory_gb=float(values.get("memory_gb", 0.0)),
        discrete_gpu=_field(values, "discrete_gpu", where, bool, False))


# -- plans ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class NodePlan:
    """Everything a launcher needs to start one node."""

    executable: str
    name: str
    namespace: str
    param_files: List[str]
    overrides: Dict[str, Any]
    remappings: List[Tuple[str, str]]
    profile: Optional[Profile] = None
    card: Optional[ModelCard] = None
    deployment: Optional[Deployment] = None
    #: Why this node is not started ("" = it is): the engine builder under a remote profile.
    skip: str = ""

    @property
    def fqn(self) -> str:
        return f"{self.namespace.rstrip('/')}/{self.name}"

    def ros_arguments(self) -> List[str]:
        """``--ros-args`` for ``Node(cli_args=...)``: the parameter files in order, then the
        remappings (overrides are passed typed, as parameter_overrides)."""
        args = ["--ros-args"]
        for path in self.param_files:
            args += ["--params-file", path]
        for src, dst in self.remappings:
            args += ["-r", f"{src}:={dst}"]
        return args


def _absolute_namespace(namespace: str) -> str:
    namespace = (namespace or "/").strip()
    return namespace if namespace.startswith("/") else "/" + namespace


def plan_node(executable: str, *, namespace: str = "/slm", profile: str = "", model: str = "",
              backend: str = "", params_file: str = "", camera_topic: str = "",
              wait_for_builder: Optional[bool] = None,
              share: Optional[Path] = None) -> NodePlan:
    """The parameter files, overrides and remappings of one node (see the module docstring).

    Files, in order (later ones win): the board profile, the model card, ``params_file``. Overrides:
    the card's backend/quantization for this board, a ``model`` that is not a card, ``backend``,
    ``wait_for_builder``. An empty ``model`` with a profile means the profile's default model for
    the node's modality. Raises :class:`ConfigError` for an unknown profile/model, a model of the
    wrong modality or one no backend loads, or a pair the card says does not fit.

    Under a remote profile ``model`` is the served model's name, never looked up as a card; the
    engine builder's plan comes back with :attr:`NodePlan.skip` set (nothing to build), and
    ``wait_for_builder`` is overridden to false.
    """
    kind = node_kind(executable)
    share = share or share_dir()
    files: List[str] = []
    overrides: Dict[str, Any] = {}
    remappings: List[Tuple[str, str]] = []
    prof = None
    if profile:
        ppath = profile_path(profile, share)
        prof = read_profile(ppath)
        files.append(str(ppath))
    remote = prof is not None and prof.remote
    if remote and executable == "engine_builder_node":
        return NodePlan(executable, kind.name, _absolute_namespace(namespace), files, {}, [],
                        prof, skip=f"profile {prof.name} runs the models on a server (remote: "
                                   f"true): there is no engine to build on the robot")
    if not model and prof is not None:
        model = prof.default_vision_model if kind.modality == "vision" else prof.default_model
    if remote and model.endswith((".yaml", ".yml")):
        raise ConfigError(f"{model}: model cards describe checkpoints loaded on the robot; with "
                          f"profile {prof.name} (remote: true) `model` is the served model's "
                          f"name (GET /v1/models on the server)")
    card = deployment = None
    card_path = model_card_path(model, share) if model and not remote else None
    if card_path is not None:
        if not card_path.is_file():
            raise ConfigError(f"model card {display_path(str(card_path))} does not exist")
        card = read_model_card(card_path)
        wanted = kind.modality or "text"
        if card.modality != wanted:
            raise ConfigError(
                f"model {card.name} is a {card.modality} model; {executable} needs a {wanted} "
                f"model" + (" (the engine builder builds text models; a vision node loads its "
                            "checkpoint directly)" if executable == "engine_builder_node" else ""))
        if not card.loadable:
            raise ConfigError(f"model {card.name}: {card.not_loadable_reason}")
        files.append(str(card_path))
        if prof is not None:
            deployment = card.on(prof.name)
            if deployment is None:
                raise ConfigError(f"model card {card.name} says nothing about board {prof.name} "
                                  f"(add boards.{prof.name} to {display_path(str(card_path))})")
            if not deployment.fits:
                raise ConfigError(
                    f"{card.title} does not fit {prof.title} (the memory planner refuses it; see "
                    f"README 'Which model fits which board'); choose a smaller model or board")
            overrides["backend"] = deployment.backend
            if executable == "engine_builder_node":
                overrides["quantization"] = deployment.quantization
    elif model:
        overrides["model"] = model
    if params_file:
        files.append(str(Path(params_file).expanduser()))
    if backend:
        overrides["backend"] = backend
    if wait_for_builder is not None and executable != "engine_builder_node":
        # A model on a server has no artifact to wait for (slm.launch.py passes use_builder).
        overrides["wait_for_builder"] = bool(wait_for_builder) and not remote
    if camera_topic and executable == "vision_node":
        topic = camera_topic.rstrip("/")
        remappings = [("image", topic), ("image/compressed", f"{topic}/compressed")]
    return NodePlan(executable, kind.name, _absolute_namespace(namespace), files, overrides,
                    remappings, prof, card, deployment)


def builder_needed(plan: NodePlan) -> str:
    """Why this plan needs the engine builder but does not wait for it ("" = it does not): an
    LLM whose board runs it as a TensorRT-LLM engine or a quantized artifact."""
    dep = plan.deployment
    if plan.executable != "llm_node" or dep is None or not dep.needs_builder or \
            plan.overrides.get("wait_for_builder"):
        return ""
    return (f"{plan.card.title} on {plan.profile.title} runs as a {dep.backend} "
            f"{dep.quantization} artifact, which the engine builder makes")


def plan_memory_for(card: ModelCard, profile: Profile, config: Mapping[str, Any],
                    deployment: Optional[Deployment] = None):
    """The memory planner's verdict for a model card on a board, from the limits its files set.

    ``config`` is the model's config.json; ``deployment`` defaults to the card's for this board.
    TensorRT-LLM is planned at the engine builder's max_input_len/max_seq_len/max_batch_size;
    transformers at the node's max_context_tokens (else the model's context length), batch 1, in
    the node's dtype on its device.
    """
    from slm_ros.build.planner import plan_memory
    from slm_ros.ros.param_files import node_values
    if profile.remote:
        raise ConfigError(f"profile {profile.name} runs the models on a server (remote: true): "
                          f"there is no on-board memory plan for {card.name}")
    dep = deployment or card.on(profile.name)
    if dep is None or not dep.fits:
        raise ConfigError(f"{card.name} has no deployment for {profile.name} to plan")
    files = [read_param_file(profile.path), read_param_file(card.path)]
    node_name = NODES["vision_node" if card.modality == "vision" else "llm_node"].name
    node = {k: v[0] for k, v in node_values(files, f"/slm/{node_name}").items()}
    builder = {k: v[0] for k, v in node_values(files, "/slm/engine_builder").items()}
    if dep.backend == "tensorrt_llm":
        seq = int(builder.get("max_seq_len", 4096))
        prompt = int(builder.get("max_input_len", 2048))
        batch = int(builder.get("max_batch_size", 1))
    else:
        seq = int(node.get("max_context_tokens") or card.context_length)
        prompt, batch = min(seq, 2048), 1
    return plan_memory(config, profile.device(), backend=dep.backend, quantization=dep.quantization,
                       dtype=str(node.get("dtype", "auto")),
                       on_gpu=str(node.get("device", "auto")) != "cpu",
                       max_input_len=prompt, max_seq_len=seq, max_batch_size=batch,
                       name=card.title)


def check_plan(plan: NodePlan) -> None:
    """Raise :class:`ParamFileError` listing every file/key that does not fit the node's declared
    parameters (undeclared names in sections for this node, wrong types, out-of-range values)."""
    kind = node_kind(plan.executable)
    files = [read_param_file(path) for path in plan.param_files]
    others = {spec.name for other in NODES.values() if other is not kind
              for spec in other.parameters()}
    problems = check_node_params(files, plan.fqn, kind.parameters(), kind.executable,
                                 known_elsewhere=others, overrides=plan.overrides)
    if problems:
        raise ParamFileError(f"the parameters for {plan.fqn} do not match {kind.executable}:\n  "
                             + "\n  ".join(problems))
