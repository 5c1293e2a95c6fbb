"""Engine builder, tier 2: the transformers step on a tiny random-weight Llama (real library)."""

import json
import os
import shutil
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from slm_ros.backends.base import BackendConfig
from slm_ros.backends.transformers_backend import TransformersBackend
from slm_ros.build import transformers_step
from slm_ros.build.builder import Builder
from slm_ros.build.spec import BuildError, BuildSpec
from slm_ros.build.steps import get_step
from slm_ros.core.types import SamplingParams

GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0, repetition_penalty=1.0)
MESSAGES = [{"role": "user", "content": "Which way is the charging dock?"}]


def greedy_tokens(model_dir):
    backend = TransformersBackend()
    backend.load(BackendConfig(model=model_dir, device="cpu", dtype="float32"))
    try:
        prompt = backend.apply_chat_template(MESSAGES)
        return prompt, list(backend.generate(prompt, GREEDY, threading.Event()))
    finally:
        backend.close()


def spec(model, **kw):
    kw.setdefault("device", "cpu")
    return BuildSpec(model=str(model), backend="transformers", **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("engines")
    return root, Builder(root).build(spec(tiny_model_dir, dtype="float32"))


def test_artifact_loads_in_the_backend_and_generates_the_same_tokens(built, tiny_model_dir):
    _root, result = built
    assert not result.cache_hit
    names = set(os.listdir(result.path))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "chat_template.jinja", "manifest.json"} <= names
    source_prompt, source_tokens = greedy_tokens(tiny_model_dir)
    prompt, tokens = greedy_tokens(str(result.path))
    assert prompt == source_prompt
    assert tokens == source_tokens and len(tokens) > 0

    inputs = result.manifest["key_inputs"]
    assert set(inputs["runtime"]) == {"torch", "transformers", "safetensors"}
    assert inputs["device"]["device"] == "cpu" and inputs["device"]["dtype"] == "float32"
    assert "max_seq_len" not in inputs["spec"]  # limits are applied at load, not baked in
    assert result.manifest["step"]["parameters"] == \
        sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())


def test_relaunch_from_a_moved_checkpoint_is_a_cache_hit(built, tiny_model_dir, tmp_path):
    root, result = built
    moved = shutil.copytree(tiny_model_dir, tmp_path / "moved-model")
    again = Builder(root).build(spec(moved, dtype="float32", max_input_len=4096, max_seq_len=8192))
    assert again.cache_hit and again.path == result.path


def test_int8_dynamic_is_a_float32_artifact_quantized_at_load(built, tiny_model_dir):
    root, plain = built
    result = Builder(root).build(spec(tiny_model_dir, quantization="int8_dynamic"))
    assert result.key != plain.key and result.path.name.startswith("transformers-int8_dynamic-")
    assert transformers_step.load_options(str(result.path))["quantize_dynamic"] == "qint8"
    assert result.manifest["step"]["load_options"]["quantize_dynamic"] == "qint8"

    model = AutoModelForCausalLM.from_pretrained(str(result.path), dtype=torch.float32)
    assert next(model.parameters()).dtype == torch.float32
    model = transformers_step.apply_load_options(model, str(result.path))
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    assert any(isinstance(m, dynamic) for m in model.modules())
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    ids = torch.tensor([[1, 2, 3, 4]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                         do_sample=False, pad_token_id=2)
    assert out.shape[1] > ids.shape[1]

    same = AutoModelForCausalLM.from_pretrained(str(plain.path))
    assert transformers_step.apply_load_options(same, str(plain.path)) is same


def test_validate_refuses_what_this_backend_cannot_build(tiny_model_dir):
    step = get_step("transformers")
    with pytest.raises(BuildError, match="'w4a16' is not available.*valid: none, int8_dynamic"):
        step.validate(spec(tiny_model_dir, quantization="w4a16"))
    with pytest.raises(BuildError, match="int8_dynamic needs float32"):
        step.validate(spec(tiny_model_dir, quantization="int8_dynamic", dtype="bfloat16"))
    with pytest.raises(BuildError, match="dtype must be"):
        step.validate(spec(tiny_model_dir, dtype="float8"))


@pytest.mark.parametrize("model_type, message", [
    ("robot_brain_9000", "does not know this model_type"),
    ("vit", "model_type 'vit' is not a causal language model"),
])
def test_unknown_architecture_is_refused_before_building(tmp_path, tiny_model_dir, model_type,
                                                         message):
    bad = shutil.copytree(tiny_model_dir, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["model_type"] = model_type
    (bad / "config.json").write_text(json.dumps(config))
    root = tmp_path / "cache"
    with pytest.raises(BuildError, match=message):
        Builder(root).build(spec(bad))
    assert not root.exists() or not [p for p in root.iterdir() if not p.name.startswith(".")]


def test_corrupt_weights_are_refused_naming_the_file(tmp_path, tiny_model_dir):
    bad = shutil.copytree(tiny_model_dir, tmp_path / "bad")
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(BuildError, match=r"corrupt safetensors file .*bad/model\.safetensors"):
        Builder(tmp_path / "cache").build(spec(bad))


def test_default_cache_root_follows_slm_ros_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SLM_ROS_CACHE", str(tmp_path))
    assert Builder().root == tmp_path / "engines"


@pytest.mark.skipif(not os.environ.get("SLM_ROS_SLOW_TESTS"),
                    reason="dequantizes the embedded GGUF (~40 s on 2 cores); set SLM_ROS_SLOW_TESTS=1")
def test_embedded_gguf_builds_into_a_loadable_artifact(tmp_path, default_model_dir):
    from slm_ros.models import embedded_gguf
    result = Builder(tmp_path / "cache").build(spec(embedded_gguf(), dtype="float32"))
    assert result.manifest["step"]["source_format"] == "gguf"
    assert greedy_tokens(str(result.path)) == greedy_tokens(default_model_dir)
