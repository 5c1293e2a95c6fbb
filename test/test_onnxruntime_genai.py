"""Tier 2 and 3: ONNX Runtime GenAI on the real embedded SmolLM2-135M-Instruct -- built from its
Hugging Face checkpoint at int4 by the engine builder's step (about 10 s on a 2-core CPU, once per
module), loaded in the backend alone, under the engine, with constrained output, and served by an
llm_node process."""

import json
import os
import threading
import time
import uuid
from pathlib import Path

import pytest

og = pytest.importorskip(
    "onnxruntime_genai",
    reason="onnxruntime-genai is not installed (pip install onnxruntime-genai==0.18.0 onnx "
           "onnx_ir)")

from engine_helpers import Collector, running_engine  # noqa: E402
from slm_ros.backends.base import BackendConfig  # noqa: E402
from slm_ros.backends.registry import available_backends, create_backend  # noqa: E402
from slm_ros.build.builder import Builder  # noqa: E402
from slm_ros.build.spec import BuildCancelled, BuildError, BuildSpec  # noqa: E402
from slm_ros.core.constraints import ResponseFormat  # noqa: E402
from slm_ros.core.engine import EngineConfig  # noqa: E402
from slm_ros.core.errors import ConfigError, ModelLoadError, RequestError  # noqa: E402
from slm_ros.core.types import FinishReason, Request, SamplingOverrides, SamplingParams  # noqa: E402

GREEDY = SamplingParams(max_new_tokens=40, temperature=0.0, repetition_penalty=1.0)
#: Questions the embedded 135M model answers right at int4, with the words that count as right. A
#: 4-bit model's greedy text can differ between CPUs (ONNX Runtime picks kernels for the one it runs
#: on), so a majority must be right, not every answer.
FACTS = (
    ("What is the capital of France?", ("paris",)),
    ("What is the capital of Italy?", ("rome",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("What is the capital of Germany?", ("berlin",)),
    ("What is the capital of Spain?", ("madrid",)),
    ("How many days are in a week?", ("seven", "7")),
)
COMMAND = {
    "type": "object",
    "properties": {
        "action": {"enum": ["move", "turn", "stop", "pick", "place"]},
        "distance_m": {"type": "number", "minimum": 0, "maximum": 5},
        "target": {"type": "string", "maxLength": 16},
    },
    "required": ["action", "distance_m", "target"],
    "additionalProperties": False,
}


def spec(model, **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("quantization", "int4")
    return BuildSpec(model=str(model), backend="onnxruntime_genai", **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("ort-engines")
    phases = []
    t0 = time.monotonic()
    result = Builder(root).build(spec(default_model_dir),
                                 progress=lambda phase, fraction: phases.append((phase, fraction)))
    return root, result, phases, time.monotonic() - t0


@pytest.fixture(scope="module")
def backend(built):
    b = create_backend("onnxruntime_genai")
    b.load(BackendConfig(model=str(built[1].path), device="cpu", max_context_tokens=2048))
    yield b
    b.close()


def ask_tokens(backend, question, params=GREEDY, cancel=None):
    ids = backend.apply_chat_template([{"role": "user", "content": question}])
    return list(backend.generate(ids, params, cancel or threading.Event()))


def artifact_names(root: Path):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("onnxruntime_genai-"))


# ------------------------------------------------------------------------------ the build step

def test_int4_build_is_an_ort_genai_folder_and_a_second_build_is_a_cache_hit(built,
                                                                              default_model_dir):
    root, result, phases, seconds = built
    assert not result.cache_hit and result.path.name.startswith("onnxruntime_genai-int4-")
    names = set(os.listdir(result.path))
    assert {"genai_config.json", "model.onnx", "tokenizer.json", "config.json",
            "manifest.json"} <= names
    step = result.manifest["step"]
    assert step["precision"] == "int4" and step["block_size"] == 32
    assert step["execution_provider"] == "cpu" and step["model_type"] == "llama"
    assert 130e6 < step["parameters"] < 140e6
    # int4 weights: a fifth of the float32 checkpoint (538 MB) or less.
    assert result.manifest["size_bytes"] < 120e6
    inputs = result.manifest["key_inputs"]
    assert {"onnxruntime_genai", "onnxruntime"} <= set(inputs["runtime"])
    assert inputs["runtime"]["onnxruntime_genai"] == og.__version__
    assert inputs["device"]["device"] == "cpu" and "max_seq_len" not in inputs["spec"]
    seen = [p for p, _ in phases]
    assert {"load", "quantize", "save", "publish", "done"} <= set(seen)
    assert [f for _, f in phases] == sorted(f for _, f in phases)   # never goes back

    t0 = time.monotonic()
    again = Builder(root).build(spec(default_model_dir, max_seq_len=8192))   # limits not baked in
    assert again.cache_hit and again.path == result.path
    assert time.monotonic() - t0 < seconds


@pytest.mark.parametrize("damage, expected", [
    ("no-config", "config.json"),
    ("no-weights", "no weights"),
    ("nonsense-type", "nonsense"),
    ("nonsense-architecture", "NonsenseForCausalLM"),
])
def test_bad_checkpoints_fail_naming_the_problem_and_publish_nothing(built, default_model_dir,
                                                                     tmp_path, damage, expected):
    root = built[0]
    before = artifact_names(root)
    bad = tmp_path / "bad"
    bad.mkdir()
    for item in Path(default_model_dir).iterdir():   # links: no 538 MB copy
        if item.name == "config.json" or (damage == "no-weights" and item.suffix == ".safetensors"):
            continue
        (bad / item.name).symlink_to(item)
    config = json.loads((Path(default_model_dir) / "config.json").read_text())
    if damage == "nonsense-type":
        config["model_type"] = "nonsense"
    if damage == "nonsense-architecture":
        config["architectures"] = ["NonsenseForCausalLM"]
    if damage != "no-config":
        (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(BuildError, match=expected):
        Builder(root).build(spec(bad))
    assert artifact_names(root) == before


def test_unsupported_precision_for_the_provider_is_refused_before_building(built,
                                                                          default_model_dir):
    with pytest.raises(BuildError, match="fp16.*cpu"):
        Builder(built[0]).build(spec(default_model_dir, quantization="fp16"))
    with pytest.raises(BuildError, match="valid: none, int4"):
        Builder(built[0]).build(spec(default_model_dir, quantization="q4_k_m"))


def test_a_cancelled_build_stops_the_model_builder_and_publishes_nothing(built, default_model_dir):
    root = built[0]
    before = artifact_names(root)
    cancel = threading.Event()

    loads = []

    def progress(phase, _fraction):
        if phase == "load":
            loads.append(phase)
            if len(loads) == 2:   # the model builder is reading the checkpoint: stop it
                cancel.set()

    t0 = time.monotonic()
    with pytest.raises(BuildCancelled):
        Builder(root).build(spec(default_model_dir, quantization="int8"), progress=progress,
                            cancel=cancel)
    assert time.monotonic() - t0 < built[3] + 5
    assert artifact_names(root) == before
    assert not [p for p in root.iterdir() if "int8" in p.name and not p.name.endswith(".lock")]


# ------------------------------------------------------------------------------ the backend

def test_registered_and_describes_the_model(backend, built):
    assert "onnxruntime_genai" in available_backends("text")
    info = backend.describe()
    assert info["backend"] == "onnxruntime_genai" and info["model"] == str(built[1].path)
    assert info["device"] == "cpu" and info["dtype"] == "int4"
    assert info["context_length"] == backend.context_length == 2048   # max_context_tokens
    assert info["trained_context_length"] == 8192 and 130e6 < info["parameters"] < 140e6
    assert 2 in backend.eos_token_ids   # <|im_end|>
    assert backend.count_tokens("Hello robot") > 0
    assert backend.decode(backend.apply_chat_template([{"role": "user", "content": "Hi"}])) \
        .endswith("assistant\n")


def test_prompt_tokens_are_those_of_the_checkpoint_tokenizer(backend, default_model_dir):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    messages = [{"role": "system", "content": "You are a robot."},
                {"role": "user", "content": "Where is the dock?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert backend.apply_chat_template(messages) == \
        list(tokenizer(text, add_special_tokens=False)["input_ids"])
    # A control token typed by the user stays text.
    typed = backend.apply_chat_template([{"role": "user", "content": "hi<|im_end|>"}])
    plain = backend.apply_chat_template([{"role": "user", "content": "hi"}])
    assert typed.count(2) == plain.count(2)   # <|im_end|> (id 2): only the template's own


def test_threads_setting_loads_and_generates(built):
    b = create_backend("onnxruntime_genai")
    b.load(BackendConfig(model=str(built[1].path), device="auto", threads=1))
    try:
        assert b.describe()["device"] == "cpu" and b.describe()["threads"] == 1
        assert len(ask_tokens(b, "Hello!", SamplingParams(max_new_tokens=3))) == 3
    finally:
        b.close()


def test_greedy_is_deterministic_bounded_and_ends_with_eos(backend):
    first = ask_tokens(backend, "What is the capital of France? Answer in one sentence.")
    assert first and len(first) <= GREEDY.max_new_tokens
    assert ask_tokens(backend, "What is the capital of France? Answer in one sentence.") == first
    assert backend.decode(first).strip()
    if len(first) < GREEDY.max_new_tokens:
        assert first[-1] in backend.eos_token_ids
    short = ask_tokens(backend, "Tell me a long story about a robot.",
                       SamplingParams(max_new_tokens=5, temperature=0.0))
    assert len(short) == 5


def test_sampling_is_reproducible_with_a_seed(backend):
    params = SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.95, top_k=40, seed=42)
    first = ask_tokens(backend, "Tell me a story.", params)
    assert first and ask_tokens(backend, "Tell me a story.", params) == first


def test_cancel_stops_within_one_token(backend):
    ids = backend.apply_chat_template([{"role": "user",
                                        "content": "Count from one to a thousand."}])
    cancel = threading.Event()
    seen = []
    for token in backend.generate(ids, SamplingParams(max_new_tokens=500, temperature=0.0), cancel):
        seen.append(token)
        if len(seen) == 5:
            cancel.set()
    assert len(seen) <= 6, len(seen)
    assert list(backend.generate(ids, GREEDY, cancel)) == []   # already cancelled: nothing


def test_cancel_during_a_long_prompt_stops_between_prompt_chunks(backend):
    ids = backend.apply_chat_template([{"role": "user", "content": "Robots cook. " * 400}])
    assert len(ids) > 1200   # 19+ chunks: a cancel at a quarter stops near a third
    t0 = time.monotonic()
    assert len(list(backend.generate(ids, SamplingParams(max_new_tokens=1), threading.Event()))) == 1
    whole = time.monotonic() - t0
    cancel = threading.Event()
    timer = threading.Timer(whole / 4, cancel.set)
    timer.start()
    t0 = time.monotonic()
    assert list(backend.generate(ids, GREEDY, cancel)) == []
    assert time.monotonic() - t0 < whole * 0.9, (time.monotonic() - t0, whole)
    timer.join()


def test_prompts_that_do_not_fit_are_refused(backend):
    with pytest.raises(RequestError, match="does not fit"):
        list(backend.generate([1] * 2048, GREEDY, threading.Event()))
    with pytest.raises(RequestError, match="empty prompt"):
        list(backend.generate([], GREEDY, threading.Event()))


def test_knows_facts(backend):
    right, answers = 0, []
    for question, words in FACTS:
        text = backend.decode(ask_tokens(backend, question + " Answer in one sentence."))
        answers.append(text)
        right += any(w in text.lower() for w in words)
    assert right > len(FACTS) // 2, answers


def test_streamed_equals_non_streamed_through_the_engine(backend):
    prompt = "Describe a kitchen robot."
    direct = ask_tokens(backend, prompt)
    with running_engine(backend, EngineConfig(max_queue=4, defaults=GREEDY)) as engine:
        sink = Collector(timeout=60)
        rid = engine.submit(Request(prompt=prompt, session_id=uuid.uuid4().hex), sink)
        final = sink.final(rid)
    streamed = [t for c in sink.chunks[rid] for t in c.token_ids]
    assert streamed == direct
    assert sink.text(rid) == backend.decode([t for t in direct if t not in backend.eos_token_ids])
    assert final.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)


def test_json_schema_output_is_valid_json(backend):
    import jsonschema
    fmt = ResponseFormat("json_schema", json.dumps(COMMAND))
    config = EngineConfig(defaults=SamplingParams(max_new_tokens=96))
    with running_engine(backend, config) as engine:
        for prompt in ("Move forward two meters, slowly.", "Pick up the red box."):
            sink = Collector(timeout=60)
            rid = engine.submit(Request(prompt=prompt + " Answer with a JSON command.",
                                        session_id=uuid.uuid4().hex, response_format=fmt,
                                        sampling=SamplingOverrides()), sink)
            final = sink.final(rid)
            assert final.finish_reason is FinishReason.STOP, (sink.text(rid), final.error)
            jsonschema.validate(json.loads(sink.text(rid)), COMMAND)


def test_bad_model_folders_and_devices_are_refused(default_model_dir, built):
    b = create_backend("onnxruntime_genai")
    with pytest.raises(ModelLoadError, match="genai_config.json.*Hugging Face checkpoint"):
        b.load(BackendConfig(model=default_model_dir))
    with pytest.raises(ModelLoadError, match="does not exist"):
        b.load(BackendConfig(model="/nonexistent/ort-model"))
    with pytest.raises(ConfigError, match="device must be"):
        b.load(BackendConfig(model=str(built[1].path), device="tpu"))
    if not og.is_cuda_available():
        with pytest.raises(ConfigError, match="no CUDA support"):
            b.load(BackendConfig(model=str(built[1].path), device="cuda"))


# ------------------------------------------------------------------------------- across processes

def test_llm_node_answers_with_onnxruntime_genai(built, domain_id, tmp_path):
    from ros_helpers import LlmClient, NodeProcess, assert_feedback_ok, wait_future
    node = NodeProcess(domain_id, tmp_path / "llm.log", backend="onnxruntime_genai",
                       model=str(built[1].path), device="cpu", default_max_new_tokens=32)
    client = None
    try:
        assert node.wait_for_log("active: serving", 90), node.log()
        assert "with backend onnxruntime_genai" in node.log()
        client = LlmClient(domain_id)
        client.wait_ready()
        feedback = []
        handle = client.send_goal("What is the capital of France? Answer in one sentence.",
                                  feedback=feedback)
        result = wait_future(handle.get_result_async()).result
        assert result.finish_reason in ("stop", "length"), result.error
        assert result.text.strip() and result.stats.tokens_per_second > 0
        assert_feedback_ok(feedback, result.text)
    finally:
        if client is not None:
            client.close()
        assert node.stop() == 0, node.log()
