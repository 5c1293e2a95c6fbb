"""Board profiles and model cards (config/) against the memory planner.

For every model card × board profile the planner runs on the model's architecture
(test/data/model_configs/<card>.json) at the limits the card and profile set: what a card says runs on
a board fits there, every board's default text and vision models fit together, and every pair a card
documents as "does-not-fit" is refused by the planner for each deployment slm_ros could use on that
board. README's "Which model fits which board" table is the generated form of the same numbers.

The remote profile (`remote: true`: generation on an OpenAI-compatible server) has no board: no
memory to plan against and no verdict in the model cards, so it is left out of those checks and
checked for what it is instead (backend openai, no builder, planning refused with the reason).
"""

import json
import sys
from pathlib import Path

import pytest

from slm_ros.build.planner import ModelArch
from slm_ros.build.spec import BuildError
from slm_ros.core.errors import ConfigError
from slm_ros.ros import deployment
from slm_ros.ros.param_files import node_values, read_param_file

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "test" / "data" / "model_configs"
CARDS = [deployment.read_model_card(p) for p in sorted((ROOT / "config/models").glob("*.yaml"))]
PROFILES = [deployment.read_profile(p) for p in sorted((ROOT / "config/profiles").glob("*.yaml"))]
BY_NAME = {c.name: c for c in CARDS}
#: Profiles of a board the memory planner and the model cards' verdicts apply to.
BOARDS = [p for p in PROFILES if not p.remote]

sys.path.insert(0, str(ROOT / "scripts"))
import gen_param_docs  # noqa: E402


def _config(card):
    return json.loads((CONFIGS / f"{card.name}.json").read_text())


def test_the_cards_and_profiles_the_issue_asks_for_exist():
    assert {c.name for c in CARDS} == {
        "smollm2-135m-instruct", "tinyllama-1.1b-chat", "qwen2.5-1.5b-instruct",
        "phi-3.5-mini-instruct", "llama-3.2-3b-instruct", "smolvlm-256m-instruct",
        "smolvlm-500m-instruct", "phi-3.5-vision-instruct", "vila1.5-3b"}
    assert {p.name for p in PROFILES} == {"orin-nano-8gb", "orin-nx-16gb", "agx-orin-64gb",
                                          "x86-cuda", "cpu", "x86-intel", "remote"}
    assert {p.name for p in PROFILES if p.remote} == {"remote"}


@pytest.mark.parametrize("card", CARDS, ids=lambda c: c.name)
def test_card_is_consistent_with_its_architecture(card):
    config = _config(card)
    arch = ModelArch.from_config(config)
    assert card.context_length == arch.max_position_embeddings, "context_length vs config.json"
    assert set(card.boards) == {p.name for p in BOARDS}, "one verdict per board"
    files = [read_param_file(card.path)]
    node = "vision" if card.modality == "vision" else "llm"
    limits = {k: v[0] for k, v in node_values(files, f"/slm/{node}").items()}
    assert 0 < limits["max_context_tokens"] <= card.context_length
    assert limits["model"] == "default" or limits["model"].startswith("/models/")
    builder = {k: v[0] for k, v in node_values(files, "/slm/engine_builder").items()}
    if card.modality == "text":
        assert builder["max_input_len"] < builder["max_seq_len"] <= card.context_length
        assert builder["model"] == limits["model"]
    else:
        assert not builder, "vision models are not built by the engine builder"
    for board, dep in card.boards.items():
        if dep.fits:
            assert dep.backend in ("transformers", "tensorrt_llm", "llama_cpp", "openvino",
                                   "onnxruntime_genai")
            if dep.backend in ("openvino", "onnxruntime_genai"):   # built from the checkpoint
                assert card.modality == "text" and dep.needs_builder
                assert not next(p for p in PROFILES if p.name == board).discrete_gpu
            if dep.backend == "llama_cpp":   # GGUF models on a board without a discrete GPU
                assert card.modality == "text" and limits["model"] == "default"
                assert not next(p for p in PROFILES if p.name == board).discrete_gpu
            if card.modality == "vision":
                assert (dep.backend, dep.quantization) == ("transformers", "none")


@pytest.mark.parametrize("profile", BOARDS, ids=lambda p: p.name)
def test_every_card_on_this_board_fits_or_is_refused_as_documented(profile):
    device = profile.device()
    for card in CARDS:
        dep = card.on(profile.name)
        if dep.fits:
            plan = deployment.plan_memory_for(card, profile, _config(card))
            assert plan.fits, plan.summary()
            plan.check()
            if dep.needs_builder and dep.backend == "tensorrt_llm" and device.shared:
                # Jetson engines are built on the board (or one like it): the build must fit.
                assert plan.build_fits, plan.summary()
        else:
            # Refused for every deployment slm_ros could use there (TensorRT-LLM 0.12, the Jetson
            # line, cannot convert these models; see the cards' comments).
            options = [deployment.Deployment("transformers", "none")]
            if profile.name == "cpu" and card.modality == "text":
                options.append(deployment.Deployment("transformers", "int8_dynamic"))
            for option in options:
                plan = deployment.plan_memory_for(card, profile, _config(card), option)
                assert not plan.fits, f"{card.name} on {profile.name} fits: {plan.summary()}"
                with pytest.raises(BuildError, match="does not fit"):
                    plan.check()


@pytest.mark.parametrize("profile", BOARDS, ids=lambda p: p.name)
def test_default_models_fit_the_board_together(profile):
    text, vision = BY_NAME[profile.default_model], BY_NAME[profile.default_vision_model]
    assert (text.modality, vision.modality) == ("text", "vision")
    assert text.loadable and vision.loadable
    plans = [deployment.plan_memory_for(card, profile, _config(card)) for card in (text, vision)]
    assert all(p.fits for p in plans)
    # Two node processes on one board: both must fit at once.
    total = sum(p.total_bytes for p in plans)
    assert total <= profile.device().available_bytes, [p.summary() for p in plans]
    dep = text.on(profile.name)
    if dep.backend == "tensorrt_llm":
        assert plans[0].build_fits, plans[0].summary()


def test_profiles_point_the_builder_at_their_board():
    for profile in BOARDS:
        builder = {k: v[0] for k, v in node_values([read_param_file(profile.path)],
                                                   "/slm/engine_builder").items()}
        if profile.device_profile:
            assert builder["device_profile"] == profile.device_profile
            assert profile.device().shared
        else:
            assert "device_profile" not in builder and profile.memory_gb > 0


def test_the_remote_profile_streams_from_a_server_and_plans_nothing_on_board(tmp_path):
    remote = next(p for p in PROFILES if p.remote)
    files = [read_param_file(remote.path)]
    assert not node_values(files, "/slm/engine_builder"), "nothing to build on the robot"
    for node in ("llm", "vision"):
        values = {k: v[0] for k, v in node_values(files, f"/slm/{node}").items()}
        assert values["backend"] == "openai" and values["model"] == "default"
        assert values["remote.base_url"].startswith("http") and \
            values["remote.base_url"].endswith("/v1")
        assert values["remote.api_key_env"] == "SLM_ROS_API_KEY"
        assert not any("key" in k and k != "remote.api_key_env" for k in values), \
            "the API key is never a parameter value"
    # No board memory: the planner and the cards' verdicts do not apply, and say why.
    assert (remote.default_model, remote.default_vision_model) == ("", "")
    with pytest.raises(ConfigError, match="no on-board memory"):
        remote.device()
    for card in CARDS:
        assert card.on(remote.name) is None
        with pytest.raises(ConfigError, match="no on-board memory plan"):
            deployment.plan_memory_for(card, remote, _config(card))
    # A remote profile may not carry board settings or default models (they would mean nothing,
    # or become launch overrides no params_file could change).
    for extra in ("default_model: qwen2.5-1.5b-instruct", "device_profile: orin-nano-8gb",
                  "memory_gb: 8.0"):
        bad = tmp_path / "bad_remote.yaml"
        bad.write_text(f"slm_ros_profile:\n  ros__parameters:\n    title: x\n    remote: true\n"
                       f"    {extra}\n")
        with pytest.raises(ConfigError, match="remove " + extra.split(":")[0]):
            deployment.read_profile(bad)


def test_readme_board_table_is_the_planner_output():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    region = readme.split("<!-- BEGIN GENERATED: boards", 1)[1].split("-->\n", 1)[1]
    region = region.split("<!-- END GENERATED: boards -->", 1)[0]
    assert region.strip() == gen_param_docs.board_table(ROOT).strip(), \
        "README board table is stale: run scripts/gen_param_docs.py --write"
