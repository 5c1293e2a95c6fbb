"""Launch files: checked without launch/launch_ros (not installable here), and the same graph run for
real by `slm-ros up`.

Static half: every launch file is Python 3.10 that compiles; every name it imports from launch /
launch_ros and every call it makes to one matches the constructor signatures recorded from their
sources (test/data/launch_api.json, with provenance); every argument has a default and a
description and is used; every include points at an existing launch file with arguments it declares;
every node executable is installed. Parameter files are checked by running the planning function the
base launch file calls (slm_ros.ros.deployment) for every node, profile and model card, against the
nodes' declared parameters.

Live half: `slm-ros up --builder --vision` (engine builder, LLM node waiting for it, vision node) in
one process over real DDS: it serves, its /diagnostics statuses appear, and its graph matches the
README's interface table.
"""

import ast
import json
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from slm_ros.cli import installed_executable, node_executable
from slm_ros.core.errors import ConfigError
from slm_ros.ros import deployment
from slm_ros.ros.param_files import ParamFileError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LAUNCH = ROOT / "launch"
API = json.loads((HERE / "data" / "launch_api.json").read_text())
LAUNCH_FILES = sorted(LAUNCH.glob("*.launch.py"))
# Where the package is installed: the ament index (colcon overlay, robot), else this environment.
SHARE = deployment.share_dir()


# -- a small static model of a launch file ---------------------------------------------------------


class LaunchFile:
    """What one launch file imports, declares, uses and calls (from its AST)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.source = path.read_text(encoding="utf-8")
        self.tree = ast.parse(self.source, str(path), feature_version=(3, 10))
        self.imports = {}   # local name -> "module.Name"
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.split(".")[0] in ("launch", "launch_ros"):
                for alias in node.names:
                    self.imports[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] not in ("launch", "launch_ros"), \
                        f"{path.name}: import names from launch modules explicitly"
        self.functions = {n.name: n for n in ast.walk(self.tree) if isinstance(n, ast.FunctionDef)}

    def calls(self, qualified: str):
        """Every call of the launch name ``qualified`` (e.g. launch.actions.GroupAction)."""
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                    self.imports.get(node.func.id) == qualified:
                yield node

    def arguments(self):
        """``{name: {default, description, choices}}`` of every DeclareLaunchArgument."""
        out = {}
        for call in self.calls("launch.actions.DeclareLaunchArgument"):
            name = ast.literal_eval(call.args[0])
            kw = {k.arg: k.value for k in call.keywords}
            out[name] = {key: ast.literal_eval(kw[key]) if key in kw else None
                         for key in ("default_value", "description", "choices")}
        return out

    def configurations(self):
        """Names read with LaunchConfiguration('<literal>')."""
        return {ast.literal_eval(c.args[0])
                for c in self.calls("launch.substitutions.LaunchConfiguration")}

    def _source_of_include(self, include: ast.Call):
        first = include.args[0]
        if isinstance(first, ast.Call) and isinstance(first.func, ast.Name) and \
                first.func.id in self.functions:  # a helper returning the source
            sources = [n for n in ast.walk(self.functions[first.func.id])
                       if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                       and self.imports.get(n.func.id) ==
                       "launch.launch_description_sources.PythonLaunchDescriptionSource"]
            assert len(sources) == 1, f"{self.path.name}: {first.func.id} must build one source"
            return sources[0]
        return first

    def includes(self):
        """``[(target file name, {launch argument: literal or None})]`` of every include."""
        out = []
        for include in self.calls("launch.actions.IncludeLaunchDescription"):
            source = self._source_of_include(include)
            assert self.imports.get(getattr(source.func, "id", "")) == \
                "launch.launch_description_sources.PythonLaunchDescriptionSource", \
                f"{self.path.name}: include a PythonLaunchDescriptionSource"
            parts = _path_join_parts(self, source.args[0])
            assert parts[:2] == ["<share:slm_ros>", "launch"], parts
            kw = {k.arg: k.value for k in include.keywords}
            args = {}
            items = kw.get("launch_arguments")
            if items is not None:
                assert isinstance(items, ast.Call) and isinstance(items.func, ast.Attribute) and \
                    items.func.attr == "items" and isinstance(items.func.value, ast.Dict), \
                    f"{self.path.name}: launch_arguments as a {{...}}.items() literal"
                for key, value in zip(items.func.value.keys, items.func.value.values):
                    args[ast.literal_eval(key)] = value.value if isinstance(value, ast.Constant) \
                        else None
            out.append(("/".join(parts[2:]), args))
        return out


def _path_join_parts(lf: LaunchFile, node):
    """Literal parts of PathJoinSubstitution([FindPackageShare('slm_ros'), 'a', 'b'])."""
    assert isinstance(node, ast.Call) and lf.imports.get(node.func.id) == \
        "launch.substitutions.PathJoinSubstitution", f"{lf.path.name}: use PathJoinSubstitution"
    parts = []
    for element in node.args[0].elts:
        if isinstance(element, ast.Call) and lf.imports.get(element.func.id) == \
                "launch_ros.substitutions.FindPackageShare":
            parts.append(f"<share:{ast.literal_eval(element.args[0])}>")
        else:
            parts.append(ast.literal_eval(element))
    return parts


def _accepted(qualified: str):
    """Keywords a launch class accepts: its own and those of the bases its **kwargs reach."""
    names, spec = set(), API["classes"][qualified]
    while spec is not None:
        names |= set(spec["positional"]) | set(spec["keyword_only"])
        spec = API["classes"].get(spec["kwargs_to"]) if spec["kwargs_to"] else None
    return names


# -- static checks -----------------------------------------------------------------------------------


def test_the_api_table_has_provenance():
    for name, spec in API["classes"].items():
        src = spec["source"]
        assert src["repo"] and src["path"].endswith(".py") and re.fullmatch(r"[0-9a-f]{40}",
                                                                           src["commit"]), name
        assert name.rsplit(".", 1)[1] in API["exports"].get(name.rsplit(".", 1)[0], ()) or \
            name in ("launch.Action",), name


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_file_uses_the_documented_api(path):
    lf = LaunchFile(path)
    compile(lf.source, str(path), "exec")
    assert "generate_launch_description" in lf.functions
    for local, qualified in lf.imports.items():
        module, name = qualified.rsplit(".", 1)
        assert name in API["exports"].get(module, ()), f"{path.name}: {qualified} is not recorded"
    # What it imports from this package (at launch time) exists in the installed package.
    import importlib
    for node in ast.walk(lf.tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("slm_ros"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{path.name}: {node.module}.{alias.name}"
    for node in ast.walk(lf.tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in lf.imports:
            qualified = lf.imports[func.id]
            spec = API["classes"][qualified]
            where = f"{path.name}:{node.lineno} {func.id}"
            assert len(node.args) <= len(spec["positional"]), f"{where}: too many positionals"
            assert all(k.arg is not None for k in node.keywords), f"{where}: no **splat"
            given = set(spec["positional"][:len(node.args)]) | {k.arg for k in node.keywords}
            unknown = {k.arg for k in node.keywords} - _accepted(qualified)
            assert not unknown, f"{where}: unknown keyword(s) {unknown}"
            assert set(spec["required"]) <= given, f"{where}: missing {spec['required']}"
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Call) and \
                isinstance(func.value.func, ast.Name) and func.value.func.id in lf.imports:
            qualified = lf.imports[func.value.func.id]
            methods = API["classes"][qualified].get("methods", {})
            assert func.attr in methods, f"{path.name}:{node.lineno} {qualified}.{func.attr}"
            assert len(node.args) == len(methods[func.attr])


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_every_argument_is_described_defaulted_and_used(path):
    lf = LaunchFile(path)
    args = lf.arguments()
    assert args, f"{path.name} declares no arguments"
    for name, arg in args.items():
        assert isinstance(arg["default_value"], str), f"{path.name}: {name} has no default"
        assert isinstance(arg["description"], str) and len(arg["description"]) > 20, \
            f"{path.name}: {name} is not described"
        if arg["choices"] is not None:
            assert arg["default_value"] in arg["choices"]
    used = lf.configurations()
    assert used <= set(args), f"{path.name}: reads undeclared {used - set(args)}"
    assert set(args) <= used, f"{path.name}: declares unused {set(args) - used}"


def _base():
    return LaunchFile(LAUNCH / "slm_node.launch.py")


def test_node_executables_are_installed_and_known():
    base = _base()
    choices = base.arguments()["node"]["choices"]
    assert set(choices) == set(deployment.NODES)
    for name in choices:
        node_executable(name)   # exits naming where it looked when not installed
    for call in base.calls("launch_ros.actions.Node"):
        kw = {k.arg: k.value for k in call.keywords}
        assert ast.literal_eval(kw["package"]) == "slm_ros"
    # Executables given literally anywhere are installed too.
    for path in LAUNCH_FILES:
        for call in LaunchFile(path).calls("launch_ros.actions.Node"):
            exe = {k.arg: k.value for k in call.keywords}["executable"]
            if isinstance(exe, ast.Constant):
                node_executable(exe.value)


@pytest.mark.parametrize("path", [p for p in LAUNCH_FILES if p.name != "slm_node.launch.py"],
                         ids=lambda p: p.name)
def test_includes_point_at_installed_files_with_declared_arguments(path):
    lf = LaunchFile(path)
    includes = lf.includes()
    assert includes, f"{path.name} should include the base launch file"
    base_args = _base().arguments()
    for target, args in includes:
        assert (LAUNCH / target).is_file() and (SHARE / "launch" / target).is_file(), target
        declared = LaunchFile(LAUNCH / target).arguments()
        assert set(args) <= set(declared), f"{path.name}: {set(args) - set(declared)}"
        if target == "slm_node.launch.py":
            assert args.get("node") in base_args["node"]["choices"]
        # The installed copy is this one (a stale install would launch something else).
        assert (SHARE / "launch" / target).read_text() == (LAUNCH / target).read_text()
    assert (SHARE / "launch" / path.name).read_text() == path.read_text()


def test_slm_launch_scopes_each_node_and_gates_builder_and_vision():
    lf = LaunchFile(LAUNCH / "slm.launch.py")
    groups = list(lf.calls("launch.actions.GroupAction"))
    nodes = []
    for group in groups:
        inner = [c for c in ast.walk(group) if isinstance(c, ast.Call)
                 and lf.imports.get(getattr(c.func, "id", "")) ==
                 "launch.actions.IncludeLaunchDescription"]
        assert len(inner) == 1
        condition = {k.arg: k.value for k in group.keywords}.get("condition")
        gate = None
        if condition is not None:
            assert lf.imports[condition.func.id] == "launch.conditions.IfCondition"
            gate = ast.literal_eval(_resolve(lf, condition.args[0]).args[0])
        nodes.append((dict(_include_args(lf, inner[0]))["node"], gate))
    assert nodes == [("engine_builder_node", "use_builder"), ("llm_node", None),
                     ("vision_node", "with_vision")]


def _resolve(lf, node):
    """A local name of generate_launch_description replaced by the expression assigned to it."""
    if isinstance(node, ast.Name):
        for stmt in ast.walk(lf.functions["generate_launch_description"]):
            if isinstance(stmt, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == node.id for t in stmt.targets):
                return stmt.value
    return node


def _include_args(lf, include):
    items = {k.arg: k.value for k in include.keywords}["launch_arguments"]
    for key, value in zip(items.func.value.keys, items.func.value.values):
        yield ast.literal_eval(key), (value.value if isinstance(value, ast.Constant) else None)


# -- parameter files, through the function the base launch file calls --------------------------------


def _cards():
    return [deployment.read_model_card(p) for p in sorted((ROOT / "config/models").glob("*.yaml"))]


def _profiles():
    return [deployment.read_profile(p) for p in sorted((ROOT / "config/profiles").glob("*.yaml"))]


def test_every_node_profile_and_model_card_gives_valid_parameters():
    checked = 0
    for profile in [None] + _profiles():
        for card in [None] + _cards():
            for executable in deployment.NODES:
                kwargs = dict(profile=profile.name if profile else "",
                              model=card.name if card else "", share=ROOT)
                if profile is not None and profile.remote:
                    # Generation on a server: no builder, and a model is the served model's
                    # name (a card's name is passed through as one, never looked up).
                    plan = deployment.plan_node(executable, wait_for_builder=True, **kwargs)
                    if executable == "engine_builder_node":
                        assert plan.skip and plan.card is None
                        continue
                    assert not plan.skip and plan.card is None and plan.deployment is None
                    assert plan.param_files == [str(profile.path)]
                    assert plan.overrides == dict({"model": card.name} if card else {},
                                                  wait_for_builder=False)
                    deployment.check_plan(plan)
                    checked += 1
                    continue
                wanted = "vision" if executable == "vision_node" else "text"
                deploy = card.on(profile.name) if card and profile else None
                if card and (card.modality != wanted or not card.loadable or
                             (deploy is not None and not deploy.fits)):
                    with pytest.raises(ConfigError):
                        deployment.plan_node(executable, **kwargs)
                    continue
                plan = deployment.plan_node(executable, **kwargs)
                for path in plan.param_files:
                    assert Path(path).is_file(), path
                deployment.check_plan(plan)
                checked += 1
    assert checked > 50


def test_config_files_only_set_declared_parameters():
    from slm_ros.ros.param_files import check_node_params, read_param_file
    tables = {name: kind.parameters() for name, kind in deployment.NODES.items()}
    for name, executable in (("llm.yaml", "llm_node"), ("vision.yaml", "vision_node"),
                             ("engine_builder.yaml", "engine_builder_node")):
        pfile = read_param_file(ROOT / "config" / name)
        kind = deployment.NODES[executable]
        assert check_node_params([pfile], f"/slm/{kind.name}", tables[executable],
                                 executable) == []
    node_names = {kind.name for kind in deployment.NODES.values()}
    for path in list((ROOT / "config/models").glob("*.yaml")) + \
            list((ROOT / "config/profiles").glob("*.yaml")):
        for section in read_param_file(path).sections:
            target = section.rsplit("/", 1)[-1]
            assert target in node_names or section in (deployment.CARD_SECTION,
                                                       deployment.PROFILE_SECTION), \
                f"{path.name}: section {section!r} reaches no slm_ros node"


def test_a_wrong_key_or_type_is_refused_naming_file_and_key(tmp_path):
    bad = tmp_path / "x.yaml"
    bad.write_text("/**/llm:\n  ros__parameters:\n    foo: 1\n    builder_timeout_s: 60\n"
                   "/**/engine_builder:\n  ros__parameters:\n    max_queue: 3\n")
    plan = deployment.plan_node("llm_node", params_file=str(bad), share=ROOT)
    with pytest.raises(ParamFileError) as info:
        deployment.check_plan(plan)
    text = str(info.value)
    assert "x.yaml: key 'foo' is not a parameter of llm_node" in text
    assert "x.yaml: key 'builder_timeout_s' of llm_node must be a double (write 60.0)" in text
    assert "max_queue" not in text  # a section for another node is that node's business
    with pytest.raises(ParamFileError, match="key 'max_queue' is not a parameter of "
                                             "engine_builder_node"):
        deployment.check_plan(deployment.plan_node("engine_builder_node", params_file=str(bad),
                                                   share=ROOT))
    # The same through `slm-ros up`, as a user meets it: exit 2, the file and key named.
    out = subprocess.run([installed_executable("bin/slm-ros"), "up", "--check",
                          "--profile", str(bad)], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, env=dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST"))
    assert out.returncode == 2, out.stderr
    assert "no 'slm_ros_profile' section" in out.stderr
    out = subprocess.run([installed_executable("bin/slm-ros"), "up", "--check",
                          "--params-file", str(bad)], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, env=dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST"))
    assert out.returncode == 2 and "x.yaml: key 'foo' is not a parameter of llm_node" in out.stderr


def test_deployments_that_need_the_builder_or_do_not_fit_are_refused_with_the_reason():
    from slm_ros.ros.graph import plan_graph
    with pytest.raises(ConfigError, match="engine builder makes: add --builder"):
        plan_graph(profile="orin-nano-8gb", share=ROOT)  # TinyLlama as a TensorRT-LLM engine
    plans = plan_graph(profile="orin-nano-8gb", builder=True, vision=True, share=ROOT)
    assert [p.executable for p in plans] == ["engine_builder_node", "llm_node", "vision_node"]
    assert plans[0].overrides == {"backend": "tensorrt_llm", "quantization": "w4a16"}
    assert plans[1].overrides["wait_for_builder"] is True
    with pytest.raises(ConfigError, match="does not fit Jetson Orin Nano 8 GB"):
        plan_graph(profile="orin-nano-8gb", model="llama-3.2-3b-instruct", share=ROOT)
    with pytest.raises(ConfigError, match="trust_remote_code"):
        plan_graph(profile="agx-orin-64gb", vision=True, vision_model="phi-3.5-vision-instruct",
                   share=ROOT)
    with pytest.raises(ConfigError, match="needs --vision-model"):
        plan_graph(vision=True, share=ROOT)
    # A remote profile: no builder (asked for explicitly: refused), the nodes stream from the
    # server named in the profile; their models come from its node sections, not overrides, so a
    # params_file can change them.
    with pytest.raises(ConfigError, match="there is no engine to build on the robot: drop "
                                          "--builder"):
        plan_graph(profile="remote", builder=True, share=ROOT)
    plans = plan_graph(profile="remote", vision=True, share=ROOT)
    assert [(p.executable, p.overrides) for p in plans] == [("llm_node", {}), ("vision_node", {})]
    with pytest.raises(ConfigError, match="`model` is the served model's name"):
        plan_graph(profile="remote", model=str(ROOT / "config/models/tinyllama-1.1b-chat.yaml"),
                   share=ROOT)
    remapped = plan_graph(vision=True, vision_model="/m/vlm", camera_topic="/cam/image_raw/",
                          share=ROOT)[-1]
    assert remapped.remappings == [("image", "/cam/image_raw"),
                                   ("image/compressed", "/cam/image_raw/compressed")]
    assert remapped.overrides == {"model": "/m/vlm"}


# -- the graph, running ------------------------------------------------------------------------------


def _readme_interfaces(namespace: str):
    """``{(node, kind, absolute name, type)}`` from README's interface reference table."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Interface reference", 1)[1].split("\n## ", 1)[0]
    rows = set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not cells[0].startswith("`"):
            continue
        nodes = re.findall(r"`([^`]+)`", cells[0])
        name, kind, type_ = cells[1].strip("`"), cells[2], cells[3].strip("`")
        for node in nodes:
            full = name.replace("<node>", node)
            full = full if full.startswith("/") else f"{namespace}/{full}"
            rows.add((node, kind, full, type_))
    return rows


_STANDARD = ("/rosout", "/parameter_events")
_PARAMETER_SERVICES = ("describe_parameters", "get_parameter_types", "get_parameters",
                       "list_parameters", "set_parameters", "set_parameters_atomically",
                       "get_type_description")


def _graph_interfaces(client_node, namespace: str, names):
    from rclpy.action import get_action_server_names_and_types_by_node
    rows = set()
    for node in names:
        queries = (("publisher", client_node.get_publisher_names_and_types_by_node),
                   ("subscription", client_node.get_subscriber_names_and_types_by_node),
                   ("service", client_node.get_service_names_and_types_by_node))
        for kind, query in queries:
            for name, types in query(node, namespace):
                if name in _STANDARD or "/_action/" in name or \
                        name.rsplit("/", 1)[-1] in _PARAMETER_SERVICES:
                    continue
                rows.add((node, kind, name, types[0]))
        for name, types in get_action_server_names_and_types_by_node(client_node, node, namespace):
            rows.add((node, "action server", name, types[0]))
    return rows


def test_slm_ros_up_runs_builder_llm_and_vision_from_the_yaml_files(tiny_model_dir, tmp_path,
                                                                     domain_id):
    from diagnostic_msgs.msg import DiagnosticArray

    from ros_helpers import LlmClient, _die_with_parent, wait_future
    from slm_ros.ros import qos
    from slm_ros.ros.diagnostics import OK, level_of, values_of
    from vlm_fixtures import build_tiny_llava

    vlm = build_tiny_llava(tmp_path / "vlm")
    params = tmp_path / "test.yaml"
    params.write_text(
        "/**:\n  ros__parameters:\n    dtype: float32\n"
        "/**/engine_builder:\n  ros__parameters:\n"
        f"    cache_dir: {tmp_path / 'cache'}\n    max_input_len: 256\n    max_seq_len: 512\n"
        "/**/llm:\n  ros__parameters:\n    default_max_new_tokens: 8\n"
        "    default_repetition_penalty: 1.0\n    builder_timeout_s: 120.0\n")
    namespace = "/up"
    cmd = [installed_executable("bin/slm-ros"), "up", "--namespace", namespace,
           "--model", tiny_model_dir, "--builder", "--vision", "--vision-model", vlm,
           "--camera-topic", "/camera/image_raw", "--params-file", str(params)]
    log = open(tmp_path / "up.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                            env=dict(os.environ, ROS_DOMAIN_ID=str(domain_id),
                                     ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
                                     PYTHONUNBUFFERED="1"),
                            preexec_fn=_die_with_parent)
    statuses, cv = {}, threading.Condition()

    def on_diagnostics(msg):
        with cv:
            for status in msg.status:
                statuses[status.name] = status
            cv.notify_all()

    client = LlmClient(domain_id, namespace=namespace)
    client.node.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics,
                                    qos.DIAGNOSTICS)
    try:
        client.wait_ready(timeout=120)
        handle = client.send_goal("Hello", [])
        result = wait_future(handle.get_result_async(), timeout=60).result
        assert result.finish_reason in ("stop", "length"), result.error
        names = {f"{namespace}/{n}: {t}" for n, t in (("engine_builder", "engine build"),
                                                      ("llm", "text generation"),
                                                      ("vision", "vision answers"))}

        def ready():
            if not names <= set(statuses):
                return False
            llm = values_of(statuses[f"{namespace}/llm: text generation"])
            vision = values_of(statuses[f"{namespace}/vision: vision answers"])
            # Each node publishes its status once a second: the builder's last one may still
            # predate its READY when the others already report the served request.
            builder = values_of(statuses[f"{namespace}/engine_builder: engine build"])
            return llm["requests_served"] == "1" and vision["lifecycle_state"] == "active" \
                and builder["state"] == "READY"

        with cv:
            assert cv.wait_for(ready, timeout=30), {k: v.message for k, v in statuses.items()}
        builder = statuses[f"{namespace}/engine_builder: engine build"]
        assert level_of(builder) == OK and values_of(builder)["state"] == "READY"
        llm = values_of(statuses[f"{namespace}/llm: text generation"])
        assert llm["backend"] == "transformers" and llm["lifecycle_state"] == "active"
        assert level_of(statuses[f"{namespace}/llm: text generation"]) == OK
        assert float(llm["last_ttft_ms"]) > 0 and float(llm["tokens_per_second"]) > 0
        assert int(llm["process_rss_mb"]) > 50 and llm["device"] == "cpu"
        assert llm["queue_depth"] == "0" and llm["requests_failed"] == "0"
        # The graph the process shows is the README's interface table, row for row (the camera
        # inputs remapped by --camera-topic).
        camera = {f"{namespace}/image": "/camera/image_raw",
                  f"{namespace}/image/compressed": "/camera/image_raw/compressed"}
        documented = {(n, k, camera.get(name, name), t)
                      for n, k, name, t in _readme_interfaces(namespace)}
        shown = _graph_interfaces(client.node, namespace, ("llm", "vision", "engine_builder"))
        assert shown == documented, (sorted(shown - documented), sorted(documented - shown))
    finally:
        client.close()
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        log.close()
    output = (tmp_path / "up.log").read_text()
    assert code == 0, output
    assert "-r image:=/camera/image_raw" in output and "engine ready:" in output


def test_readme_launch_table_lists_every_file_and_argument():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Launch files", 1)[1].split("\n### ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].endswith(".launch.py`"):
            rows[cells[0].strip("`")] = set(re.findall(r"`(\w+)`", cells[2]))
    assert set(rows) == {p.name for p in LAUNCH_FILES}
    for path in LAUNCH_FILES:
        assert rows[path.name] == set(LaunchFile(path).arguments()), path.name


def test_section_matching_and_precedence_agree_with_rcl(tmp_path, domain_id):
    """param_files decides which values reach a node exactly as rcl does (checked on real nodes)."""
    import rclpy
    from rclpy.node import Node

    from slm_ros.ros.param_files import node_values, pattern_matches, read_param_file
    patterns = ["llm", "/slm/llm", "/*/llm", "/**/llm", "/slm/*", "/**", "slm/llm", "/other/llm",
                "/**/vision", "/*"]
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain_id)
    try:
        def rcl_value(*files):
            args = ["--ros-args"] + [a for f in files for a in ("--params-file", str(f))]
            node = Node("llm", namespace="/slm", context=context, cli_args=args)
            try:
                return node.declare_parameter("model", "unset").value
            finally:
                node.destroy_node()

        for i, pattern in enumerate(patterns):
            path = tmp_path / f"p{i}.yaml"
            path.write_text(f"{pattern}:\n  ros__parameters:\n    model: hit\n")
            assert (rcl_value(path) == "hit") == pattern_matches(pattern, "/slm/llm"), pattern
        a = tmp_path / "a.yaml"
        a.write_text("/**/llm:\n  ros__parameters:\n    model: A\n"
                     "/**:\n  ros__parameters:\n    model: B\n")
        b = tmp_path / "b.yaml"
        b.write_text("/**:\n  ros__parameters:\n    model: C\n")
        c = tmp_path / "c.yaml"
        c.write_text("/slm/llm:\n  ros__parameters:\n    model: D\n")
        for files in ([a], [b, a], [a, b], [c, a], [a, c], [b, c, a], [c, b]):
            ours = node_values([read_param_file(f) for f in files], "/slm/llm")["model"][0]
            assert ours == rcl_value(*files), files
    finally:
        rclpy.try_shutdown(context=context)
