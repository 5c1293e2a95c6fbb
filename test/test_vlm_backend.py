"""Tier 2: the transformers vision-language backend on tiny random-weight LLaVA and Idefics3
(SmolVLM) checkpoints built offline (test/vlm_fixtures.py), through the real processor and model
classes."""

import shutil
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from slm_ros.backends.base import BackendConfig, Prompt
from slm_ros.backends.transformers_backend import TransformersBackend
from slm_ros.backends.transformers_vlm_backend import TransformersVlmBackend, VlmBackendConfig
from slm_ros.core.engine import EngineConfig
from slm_ros.core.errors import ConfigError, ModelLoadError, RequestError
from slm_ros.core.types import FinishReason, Request, SamplingParams
from slm_ros.core.vision import RawImage
from engine_helpers import running_engine
from vlm_fixtures import build_tiny_idefics3, build_tiny_llava, build_tiny_text_model

GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0, repetition_penalty=1.0)
# family -> (builder, image tokens per image, extra processor outputs)
FAMILIES = {
    "llava": (build_tiny_llava, 16, {"pixel_values"}),
    "idefics3": (build_tiny_idefics3, 4, {"pixel_values", "pixel_attention_mask"}),
}
QUESTION = [{"role": "system", "content": "You describe camera images."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi, what should I look at?"},
            {"role": "user", "content": "What is in the image?"}]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-vlms")
    dirs = {name: build(root / name) for name, (build, _, _) in FAMILIES.items()}
    dirs["text"] = build_tiny_text_model(root / "text")
    return dirs


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, model_dirs):
    """(family name, checkpoint dir, loaded backend) for each VLM family."""
    backend = TransformersVlmBackend()
    backend.load(BackendConfig(model=model_dirs[request.param], device="cpu", dtype="float32"))
    yield request.param, model_dirs[request.param], backend
    backend.close()


def camera_image(seed: int, shape=(48, 64)) -> np.ndarray:
    return cv2.resize(np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8),
                      shape[::-1], interpolation=cv2.INTER_LINEAR)


def test_load_facts(family):
    name, path, backend = family
    assert backend.supports_images and backend.name == "transformers"
    assert backend.context_length == 2048
    assert backend.eos_token_ids
    info = backend.describe()
    assert info["model_type"] == name and info["model"] == path and info["device"] == "cpu"
    assert "ImageProcessor" in info["image_processor"]
    backend.warmup()


def test_prompt_carries_image_tokens_and_pixels(family):
    name, path, backend = family
    _, n_image_tokens, keys = FAMILIES[name]
    prompt = backend.apply_chat_template(QUESTION, images=(camera_image(0),))
    assert isinstance(prompt, Prompt) and all(isinstance(t, int) for t in prompt)
    assert set(prompt.inputs) == keys
    assert isinstance(prompt.inputs["pixel_values"], torch.Tensor)
    processor = AutoProcessor.from_pretrained(path)
    image_id = processor.image_token_id
    assert prompt.count(image_id) == n_image_tokens
    text = processor.tokenizer.decode(prompt)
    assert "What is in the image?" in text and "Hi, what should I look at?" in text
    # Image tokens belong to the last user turn only.
    assert text.index("<image>") > text.index("Hi, what should I look at?")
    bos = processor.tokenizer.bos_token_id
    assert prompt[1] != bos and prompt.count(bos) <= 1   # the template's BOS is not doubled
    # Text only (earlier turns of a session, warmup): no pixel inputs, no image tokens.
    plain = backend.apply_chat_template(QUESTION)
    assert plain.inputs == {} and image_id not in plain
    assert len(prompt) - len(plain) >= n_image_tokens


def test_streamed_equals_non_streamed_greedy(family):
    name, path, backend = family
    image = camera_image(1)
    streamed = list(backend.generate(backend.apply_chat_template(QUESTION, images=(image,)),
                                     GREEDY, threading.Event()))
    assert streamed
    # Reference: the library alone, without the backend, the streamer or a thread.
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
             for m in QUESTION]
    parts[-1]["content"].insert(0, {"type": "image"})
    text = processor.apply_chat_template(parts, add_generation_prompt=True, tokenize=False)
    bos = processor.tokenizer.bos_token
    inputs = processor(text=text, images=[image], return_tensors="pt",
                       add_special_tokens=not (bos and text.startswith(bos)))
    eos = sorted(backend.eos_token_ids)
    ref = model.generate(**inputs, max_new_tokens=GREEDY.max_new_tokens, do_sample=False,
                         repetition_penalty=1.0, eos_token_id=eos, pad_token_id=eos[0])
    assert streamed == ref[0, inputs["input_ids"].shape[1]:].tolist()
    assert backend.decode(streamed) == processor.tokenizer.decode(streamed,
                                                                  skip_special_tokens=True)


def test_the_image_reaches_the_model(family):
    _, _, backend = family
    answers = {tuple(backend.generate(backend.apply_chat_template(QUESTION, images=(img,)),
                                      GREEDY, threading.Event()))
               for img in (camera_image(2), camera_image(3), np.zeros((48, 64, 3), np.uint8))}
    assert len(answers) == 3


def test_text_only_question_generates(family):
    _, _, backend = family
    tokens = list(backend.generate(backend.apply_chat_template(QUESTION), GREEDY,
                                   threading.Event()))
    assert 0 < len(tokens) <= GREEDY.max_new_tokens


def test_cancel_stops_within_a_token_or_two(family):
    _, _, backend = family
    prompt = backend.apply_chat_template(QUESTION, images=(camera_image(4),))
    cancel = threading.Event()
    params = SamplingParams(max_new_tokens=1500, temperature=1.0, seed=7)
    stream = backend.generate(prompt, params, cancel)
    received = 0
    after_cancel = 0
    t0 = time.monotonic()
    for _ in stream:
        if cancel.is_set():
            after_cancel += 1
        received += 1
        if received == 3:
            cancel.set()
    assert received >= 3 and after_cancel <= 2
    assert time.monotonic() - t0 < 5
    assert not [t for t in threading.enumerate() if t.name == "slm-transformers-vlm-generate"]


def test_bad_images_are_request_errors(family):
    _, _, backend = family
    for bad, words in ((np.zeros((8, 8), np.uint8), "H x W x 3"),
                       (np.zeros((8, 8, 3), np.float32), "uint8"),
                       (np.zeros((0, 8, 3), np.uint8), "H x W x 3"),
                       ("picture.jpg", "str")):
        with pytest.raises(RequestError, match=words):
            backend.apply_chat_template(QUESTION, images=(bad,))
    with pytest.raises(RequestError, match="last user message"):
        backend.apply_chat_template(QUESTION[:3], images=(camera_image(0),))


def test_engine_answers_about_a_lazily_decoded_frame(family):
    """Engine + backend + RawImage: the frame is decoded only when inference starts."""
    _, _, backend = family
    rgb = camera_image(5)
    frame = RawImage("bgr8", 64, 48, 64 * 3, rgb[:, :, ::-1].tobytes())
    decoded = []

    def image():
        decoded.append(True)
        return frame.decode()

    done = threading.Event()
    chunks = []

    def sink(chunk):
        chunks.append(chunk)
        if chunk.is_final:
            done.set()

    with running_engine(backend, EngineConfig(defaults=GREEDY)) as engine:
        engine.submit(Request("What is in the image?", image=image), sink)
        assert done.wait(30)
    final = chunks[-1]
    assert final.finish_reason in (FinishReason.STOP, FinishReason.LENGTH), final.error
    assert decoded == [True]
    expected = list(backend.generate(
        backend.apply_chat_template([{"role": "user", "content": "What is in the image?"}],
                                    images=(rgb,)), GREEDY, threading.Event()))
    assert [t for c in chunks for t in c.token_ids] == expected


def test_image_options(model_dirs):
    backend = TransformersVlmBackend()
    backend.load(VlmBackendConfig(model=model_dirs["idefics3"], device="cpu",
                                  image_options={"do_image_splitting": True}))
    assert backend.describe()["image_options"] == {"do_image_splitting": True}
    backend.close()
    with pytest.raises(ConfigError, match="do_tiling"):
        TransformersVlmBackend().load(VlmBackendConfig(model=model_dirs["llava"],
                                                       image_options={"do_tiling": False}))
    with pytest.raises(ConfigError):
        VlmBackendConfig(model="x", image_options=["do_image_splitting"])


def test_load_errors_name_the_problem(model_dirs, tmp_path):
    def err(path) -> str:
        with pytest.raises(ModelLoadError) as info:
            TransformersVlmBackend().load(BackendConfig(model=str(path), device="cpu"))
        return str(info.value)

    msg = err(model_dirs["text"])
    assert "model_type 'llama' is not an image-text-to-text model" in msg
    assert model_dirs["text"] in msg
    msg = err(tmp_path / "nowhere")
    assert "does not exist" in msg and "nowhere" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "config.json" in err(empty)
    no_processor = tmp_path / "no-processor"
    shutil.copytree(model_dirs["llava"], no_processor)
    (no_processor / "processor_config.json").unlink()
    msg = err(no_processor)
    assert "processor" in msg and str(no_processor) in msg
    no_weights = tmp_path / "no-weights"
    shutil.copytree(model_dirs["idefics3"], no_weights)
    (no_weights / "model.safetensors").unlink()
    msg = err(no_weights)
    assert "idefics3" in msg and str(no_weights) in msg


def test_missing_chat_template_gets_a_fallback(model_dirs, tmp_path):
    path = Path(tmp_path) / "no-template"
    shutil.copytree(model_dirs["llava"], path)
    (path / "chat_template.jinja").unlink()
    backend = TransformersVlmBackend()
    backend.load(BackendConfig(model=str(path), device="cpu"))
    prompt = backend.apply_chat_template(QUESTION, images=(camera_image(0),))
    processor = AutoProcessor.from_pretrained(path)
    assert prompt.count(processor.image_token_id) == 16
    assert processor.tokenizer.decode(prompt).endswith("What is in the image?\nAssistant:")


def test_text_backend_refuses_images(model_dirs):
    backend = TransformersBackend()
    backend.load(BackendConfig(model=model_dirs["text"], device="cpu", dtype="float32"))
    assert not backend.supports_images
    with pytest.raises(RequestError, match="text model"):
        backend.apply_chat_template(QUESTION, images=(camera_image(0),))
    assert backend.apply_chat_template(QUESTION)   # text still works
