"""Shared fixtures. Every ROS participant started by the tests stays on this machine
(ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST) and gets its own ROS_DOMAIN_ID."""

import os
import shutil
import sys
from pathlib import Path

import pytest

# Before anything imports rclpy: discovery never leaves this machine.
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"

sys.path.insert(0, str(Path(__file__).parent))

_REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    # Running from the repository root must not import the source tree's slm_ros (it has no
    # generated msg modules): the installed package has to win.
    import slm_ros
    if Path(slm_ros.__file__).resolve().parent == _REPO / "slm_ros":
        raise pytest.UsageError(
            "tests import the source tree's slm_ros instead of the installed one; run them with "
            "scripts/test.sh (or `.venv/bin/pytest test`, not `python -m pytest`)")


@pytest.fixture(scope="session")
def default_model_dir():
    """The embedded SmolLM2-135M-Instruct, prepared in the user cache (converted once)."""
    from slm_ros.models import resolve_model
    return resolve_model("default", progress=print).path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir):
    """A tiny random-weight Llama (2 layers, hidden 64) with the real SmolLM2 tokenizer and chat
    template: loads in well under a second and generates hundreds of tokens per second."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        src = Path(default_model_dir) / name
        if src.exists():
            shutil.copy(src, out / name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model.save_pretrained(out)
    return str(out)


@pytest.fixture
def domain_id():
    """A ROS_DOMAIN_ID reserved for this test (released afterwards)."""
    from domain_coordinator import domain_id as reserve
    with reserve() as did:
        yield did
