"""The TensorRT-LLM adapter, backend and build step against the stand-in package of each API line.

TensorRT-LLM cannot run here, so ``trtllm_standin`` (generated from test/data/tensorrt_llm_api.json)
plays it: recorded keyword lists, each line's streaming semantics, engines as directories. The
tokenizer, the chat template and the file copying are real (the tiny Llama of conftest.py). The last
test runs the real library and is skipped unless TensorRT-LLM and an NVIDIA GPU are present.
"""

import importlib.util
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import trtllm_standin
from slm_ros.backends import trtllm_adapter as adapter
from slm_ros.backends.base import BackendConfig
from slm_ros.backends.registry import create_backend
from slm_ros.backends.tensorrt_llm_backend import TensorRtLlmBackend, finish_reason_of
from slm_ros.build import trtllm_step
from slm_ros.build.spec import BuildCancelled, BuildError, BuildSpec
from slm_ros.build.trtllm_step import TensorRtLlmStep, TensorRtLlmUnavailable
from slm_ros.core.engine import Engine, EngineConfig
from slm_ros.core.errors import BackendUnavailable, ConfigError, ModelLoadError, RequestError
from slm_ros.core.types import FinishReason, Request, SamplingParams

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0)
ORIN = adapter.DeviceFacts(gpu="Orin", sm=87, cuda="12.6", l4t="R36.4.0", board="stand-in board")
LINES = ("0.12", "1.x")


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(params=LINES)
def trt(request, monkeypatch):
    """The stand-in tensorrt_llm of one API line, in sys.modules for this test only."""
    return trtllm_standin.install(request.param, monkeypatch)


@pytest.fixture
def trt012(monkeypatch):
    return trtllm_standin.install("0.12", monkeypatch)


@pytest.fixture
def trt1x(monkeypatch):
    return trtllm_standin.install("1.x", monkeypatch)


@pytest.fixture
def on_orin(monkeypatch):
    """Device facts of a Jetson Orin (SM 8.7): this machine has no CUDA GPU to read them from."""
    monkeypatch.setattr(adapter, "device_facts", lambda device="auto": ORIN)
    return ORIN


@pytest.fixture(scope="module")
def hf_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llama with untied embeddings (tied Llama checkpoints are refused on 0.12)."""
    out = tmp_path_factory.mktemp("tiny-llama-untied")
    for path in Path(tiny_model_dir).iterdir():
        shutil.copy(path, out / path.name)
    config = json.loads((out / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "robot_text.txt"
    path.write_text("The robot drives to the kitchen.\n\nIt picks up the red cup.\n\n"
                    "Battery at forty percent; returning to the dock.\n")
    return str(path)


def spec_for(model, **fields):
    fields.setdefault("max_input_len", 256)
    fields.setdefault("max_seq_len", 512)
    return BuildSpec(model=model, backend="tensorrt_llm", **fields)


def build(hf_dir, tmp_path, **fields):
    """Run the build step into a fresh artifact directory; return (dir, manifest facts, phases)."""
    out = tmp_path / f"artifact-{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    phases = []
    facts = TensorRtLlmStep().build(spec_for(hf_dir, **fields), out,
                                    lambda phase, fraction: phases.append((phase, fraction)),
                                    threading.Event())
    return out, facts, phases


def state(trt):
    return trt.__stand_in_state__


def load(engine_dir, **fields):
    backend = TensorRtLlmBackend()
    backend.load(BackendConfig(model=str(engine_dir), **fields))
    return backend


def prompt_of(backend, text="Where is the red cup?"):
    return backend.apply_chat_template([{"role": "user", "content": text}])


def expected_tokens(trt, backend, prompt, count):
    """What the stand-in generates for ``prompt`` (the end-of-sequence ids are never generated)."""
    vocab = json.loads((Path(backend.describe()["model"]) / "config.json").read_text())
    avoid = set(backend.eos_token_ids) | {backend._pad_id}
    return trtllm_standin.stand_in_tokens(prompt, count,
                                          vocab["pretrained_config"]["vocab_size"], avoid)


# -- API line detection and availability ----------------------------------------------------------


@pytest.mark.parametrize("version,line", [
    ("0.12.0", "0.12"), ("0.12.0.dev2024080600", "0.12"), ("1.0.0", "1.x"), ("1.0.0rc4", "1.x"),
    ("1.2.0rc5", "1.x"), ("2.0.0", "1.x")])
def test_api_line_for_version(version, line):
    assert adapter.api_line_for_version(version) == line


@pytest.mark.parametrize("version", ["0.11.0", "0.13.0", "0.15.0", "nightly", ""])
def test_other_versions_are_refused_with_the_supported_lines(version):
    with pytest.raises(BackendUnavailable) as err:
        adapter.api_line_for_version(version)
    assert "0.12" in str(err.value) and ("1.x" in str(err.value) or "version" in str(err.value))


def test_without_tensorrt_llm_validate_and_load_say_why(monkeypatch, hf_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # None = "import fails"
    reason = adapter.unavailable_reason()
    assert "TensorRT-LLM is not usable here" in reason and "v0.12.0-jetson" in reason
    with pytest.raises(TensorRtLlmUnavailable) as err:
        TensorRtLlmStep().validate(spec_for(hf_dir))
    assert isinstance(err.value, BuildError) and isinstance(err.value, BackendUnavailable)
    assert "cannot build here" in str(err.value)
    with pytest.raises(TensorRtLlmUnavailable):
        TensorRtLlmStep().runtime_versions()
    # A well-formed engine directory still cannot be loaded without the library.
    engine = tmp_path / "engine"
    trtllm_standin._write_engine(engine, {"architecture": "LlamaForCausalLM", "dtype": "float16"},
                                 {"max_input_len": 64, "max_seq_len": 128, "max_batch_size": 1},
                                 "0.12.0")
    adapter.copy_tokenizer_files(hf_dir, str(engine))
    with pytest.raises(BackendUnavailable, match="not usable here"):
        load(engine)


def test_static_mistakes_are_reported_before_availability(monkeypatch, hf_dir):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    with pytest.raises(ConfigError, match="unknown quantization 'int3'"):
        TensorRtLlmStep().validate(spec_for(hf_dir, quantization="int3"))


def test_unsupported_installed_version(trt, monkeypatch):
    monkeypatch.setattr(trt, "__version__", "0.13.0")
    assert "TensorRT-LLM 0.13.0 is not supported" in adapter.unavailable_reason()


def test_pynvml_is_hidden_from_tensorrt_llm_on_tegra(monkeypatch):
    monkeypatch.setattr(adapter._device, "is_jetson", lambda: True)
    monkeypatch.delitem(sys.modules, "tensorrt_llm", raising=False)
    saved = sys.modules.pop("pynvml", "absent")
    try:
        with pytest.raises(BackendUnavailable):  # not installed here, but the guard ran first
            adapter.tensorrt_llm_version()
        assert "pynvml" in sys.modules and sys.modules["pynvml"] is None
        with pytest.raises(ImportError):
            import pynvml  # noqa: F401
    finally:
        sys.modules.pop("pynvml", None)
        if saved != "absent":
            sys.modules["pynvml"] = saved


def test_device_facts_here_have_no_gpu():
    facts = adapter.device_facts("auto")
    assert facts.sm is None and facts.sm_text == "none"  # this machine has no CUDA GPU
    with pytest.raises(ConfigError, match="needs an NVIDIA"):
        adapter.device_facts("cpu")


# -- the stand-in itself follows the record -------------------------------------------------------


def test_stand_in_accepts_only_recorded_keywords(trt):
    import tensorrt_llm
    assert tensorrt_llm.__stand_in__ is True
    if trt.__stand_in_line__ == "0.12":
        from tensorrt_llm.hlapi import KvCacheConfig, QuantAlgo, SamplingParams
        SamplingParams(max_new_tokens=4, end_id=2)
        with pytest.raises(TypeError, match="max_tokens"):
            SamplingParams(max_tokens=4)
        assert not hasattr(QuantAlgo, "NVFP4")
    else:
        from tensorrt_llm.llmapi import KvCacheConfig, QuantAlgo, SamplingParams
        SamplingParams(max_tokens=4, end_id=2)
        with pytest.raises(TypeError, match="max_new_tokens"):
            SamplingParams(max_new_tokens=4)
        assert QuantAlgo.NVFP4 == "NVFP4" and QuantAlgo.W4A16_AWQ == "W4A16_AWQ"
        with pytest.raises(RuntimeError, match="PyTorch backend"):
            tensorrt_llm.LLM(model="x")
    KvCacheConfig(free_gpu_memory_fraction=0.5)
    with pytest.raises(TypeError):
        KvCacheConfig(max_tokens=10)  # a real field, but not recorded: the adapter may not use it


def test_stand_in_0_12_request_semantics(trt012, hf_dir, tmp_path, on_orin):
    engine, _, _ = build(hf_dir, tmp_path)
    from tensorrt_llm.hlapi import LLM, SamplingParams
    llm = LLM(model=str(engine), skip_tokenizer_init=False)
    request = llm.generate_async([5, 6, 7], sampling_params=SamplingParams(max_new_tokens=3, end_id=2),
                                 streaming=True)
    steps = [(list(r.outputs[0].token_ids), r.outputs[0].text_diff, r.outputs[0].text_diff)
             for r in request]
    assert [len(ids) for ids, _, _ in steps] == [1, 2, 3]          # cumulative
    assert all(first and second == "" for _, first, second in steps)  # text_diff advances on read
    assert not hasattr(request.outputs[0], "finish_reason")
    with pytest.raises(NotImplementedError):
        request.cancel()


# -- quantization choices and refusals (pure) -------------------------------------------------------


@pytest.mark.parametrize("name,canonical,algo", [
    ("none", "none", None), ("FP16", "fp16", None), ("bfloat16", "bf16", None),
    ("int8_wo", "w8a16", "W8A16"), ("w4a16", "w4a16", "W4A16"), ("int4-awq", "w4a16_awq", "W4A16_AWQ"),
    ("smoothquant", "w8a8_sq", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"), ("fp8", "fp8", "FP8"),
    ("w4a8_awq", "w4a8_awq", "W4A8_AWQ")])
def test_quantization_names(name, canonical, algo):
    quant = adapter.resolve_quantization(name)
    assert (quant.name, quant.quant_algo) == (canonical, algo)


def test_unknown_quantization_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        adapter.resolve_quantization("q4_k_m")
    assert "unknown quantization 'q4_k_m'" in str(err.value) and "w4a16_awq" in str(err.value)


LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16"}


def plan(spec, line="0.12", sm=87, hf=None):
    return trtllm_step.plan_build(spec, line, sm, dict(LLAMA if hf is None else hf))


@pytest.mark.parametrize("quant", ["fp8", "w4a8_awq"])
def test_fp8_and_w4a8_are_refused_on_orin(quant, calib_file):
    with pytest.raises(BuildError) as err:
        plan(spec_for("/m", quantization=quant, calib_dataset=calib_file), sm=87)
    message = str(err.value)
    assert ">= 8.9" in message and "SM 8.7 (Jetson Orin)" in message and "w4a16_awq" in message
    assert plan(spec_for("/m", quantization=quant, calib_dataset=calib_file), sm=89)


@pytest.mark.parametrize("quant", ["w4a16_awq", "w8a8_sq"])
def test_calibrated_quantizations_need_local_data(quant, tmp_path):
    with pytest.raises(BuildError, match="would download cnn_dailymail"):
        plan(spec_for("/m", quantization=quant))
    with pytest.raises(BuildError, match="does not exist"):
        plan(spec_for("/m", quantization=quant, calib_dataset=str(tmp_path / "missing.txt")))
    downloading = tmp_path / "cnn_dailymail"
    downloading.mkdir()
    with pytest.raises(BuildError, match="rename it"):
        plan(spec_for("/m", quantization=quant, calib_dataset=str(downloading)))


def test_calibration_on_1x_is_not_supported_yet(calib_file):
    with pytest.raises(BuildError, match="not supported by this adapter yet: .*CalibConfig"):
        plan(spec_for("/m", quantization="w4a16_awq", calib_dataset=calib_file), line="1.x")
    assert plan(spec_for("/m", quantization="w4a16"), line="1.x").quantization.quant_algo == "W4A16"


@pytest.mark.parametrize("hf", [
    {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
     "vision_config": {}},
    {"architectures": ["Phi3VForCausalLM"], "model_type": "phi3_v"},
    {"architectures": ["LlavaLlamaModel"], "model_type": "llava_llama"}])
def test_vision_language_models_are_refused_with_the_reason(hf):
    with pytest.raises(BuildError, match="vision-language model, which is not supported by this "
                                         "adapter yet: .*build_visual_engine.py"):
        plan(spec_for("/m"), hf=hf)


def test_plan_refusals_and_choices(calib_file):
    with pytest.raises(BuildError, match="no CUDA GPU is visible"):
        plan(spec_for("/m"), sm=None)
    with pytest.raises(BuildError, match="architecture 'GPT2LMHeadModel' is not one"):
        plan(spec_for("/m"), hf={"architectures": ["GPT2LMHeadModel"]})
    tied = dict(LLAMA, tie_word_embeddings=True)
    with pytest.raises(BuildError, match="tie_word_embeddings=true fails checkpoint conversion"):
        plan(spec_for("/m"), hf=tied)
    assert plan(spec_for("/m"), line="1.x", hf=tied)
    with pytest.raises(ConfigError, match="needs an NVIDIA GPU"):
        plan(spec_for("/m", device="cpu"))
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES"):
        plan(spec_for("/m", device="cuda:1"))
    with pytest.raises(ConfigError, match="dtype for tensorrt_llm"):
        plan(spec_for("/m", dtype="float32"))
    with pytest.raises(ConfigError, match="means dtype float16"):
        plan(spec_for("/m", quantization="fp16", dtype="bfloat16"))
    with pytest.raises(BuildError, match="needs a GPU with compute capability >= 8.0"):
        plan(spec_for("/m", quantization="bf16"), sm=75)
    # dtype auto: the checkpoint's bfloat16 where the GPU has it, else float16.
    assert plan(spec_for("/m")).dtype == "bfloat16"
    assert plan(spec_for("/m"), sm=75).dtype == "float16"
    assert plan(spec_for("/m"), hf=dict(LLAMA, torch_dtype="float32")).dtype == "float16"
    assert plan(spec_for("/m", quantization="fp16")).dtype == "float16"
    chosen = plan(spec_for("/m", quantization="int4_awq", calib_dataset=calib_file))
    assert (chosen.trt_architecture, chosen.quantization.quant_algo) == ("LLaMAForCausalLM",
                                                                         "W4A16_AWQ")


def test_max_num_tokens_is_explicit():
    assert trtllm_step.max_num_tokens_for(spec_for("/m", max_input_len=1024, max_seq_len=2048)) == 1024
    assert trtllm_step.max_num_tokens_for(
        spec_for("/m", max_input_len=1024, max_seq_len=2048, max_batch_size=4)) == 4096
    assert trtllm_step.max_num_tokens_for(
        spec_for("/m", max_input_len=4096, max_seq_len=8192, max_batch_size=8)) == 8192


def test_calibration_data_is_converted_to_a_local_dataset(tmp_path):
    def samples(source):
        out = Path(trtllm_step.prepare_calibration_data(str(source), tmp_path / "scratch"))
        lines = (out / "train.jsonl").read_text().splitlines()
        return [json.loads(line)["text"] for line in lines]

    txt = tmp_path / "a.txt"
    txt.write_text("first paragraph\nstill first\n\n\nsecond\n")
    assert samples(txt) == ["first paragraph\nstill first", "second"]
    js = tmp_path / "b.json"
    js.write_text(json.dumps(["one", {"text": "two"}, {"other": 1}, ""]))
    assert samples(js) == ["one", "two"]
    js.write_text(json.dumps({"text": ["x", "y"]}))
    assert samples(js) == ["x", "y"]
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"text": "alpha"}\n"beta"\n\n')
    assert samples(jl) == ["alpha", "beta"]
    directory = tmp_path / "dataset"
    directory.mkdir()
    assert trtllm_step.prepare_calibration_data(str(directory), tmp_path) == str(directory.resolve())
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(BuildError, match="no text samples"):
        samples(empty)
    csv = tmp_path / "data.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(BuildError, match="expected a directory or a .txt"):
        samples(csv)


# -- the build step against the stand-in ----------------------------------------------------------


def test_validate_here_refuses_without_a_gpu(trt, hf_dir):
    # Real device facts: this machine has no CUDA GPU.
    with pytest.raises(BuildError, match="no CUDA GPU is visible"):
        TensorRtLlmStep().validate(spec_for(hf_dir))


def test_validate_refuses_fp8_on_orin_and_awq_without_data(trt, hf_dir, on_orin):
    step = TensorRtLlmStep()
    with pytest.raises(BuildError, match="SM 8.7"):
        step.validate(spec_for(hf_dir, quantization="fp8", calib_dataset=hf_dir))
    with pytest.raises(BuildError, match="cnn_dailymail"):
        step.validate(spec_for(hf_dir, quantization="w4a16_awq"))
    step.validate(spec_for(hf_dir, quantization="w4a16"))


@pytest.mark.parametrize("quant,algo", [("none", None), ("fp16", None), ("w8a16", "W8A16"),
                                        ("w4a16", "W4A16")])
def test_build_0_12_without_calibration(trt012, hf_dir, tmp_path, on_orin, quant, algo):
    out, facts, phases = build(hf_dir, tmp_path, quantization=quant, max_batch_size=2)
    s = state(trt012)
    assert [c["quant_algo"] for c in s.calls_to("QuantConfig")] == [algo]
    convert = s.calls_to("Arch.from_hugging_face")
    assert len(convert) == 1 and convert[0]["class"] == "LLaMAForCausalLM"
    assert convert[0]["dtype"] == "float16"  # the tiny checkpoint is float32: engines get float16
    assert not s.calls_to("Arch.quantize")
    assert s.calls_to("BuildConfig") == [{"max_batch_size": 2, "max_input_len": 256,
                                          "max_seq_len": 512, "max_num_tokens": 512,
                                          "max_beam_width": 1}]
    assert s.calls_to("Engine.save") == [{"engine_dir": str(out)}]
    assert (out / "rank0.engine").is_file()
    assert facts["api_line"] == "0.12" and facts["tensorrt_llm"] == "0.12.0"
    assert facts["quant_algo"] == (algo or "none") and facts["max_num_tokens"] == 512
    assert [p for p, _ in phases] == ["plan", "load", "compile", "save", "save"]
    assert [f for _, f in phases] == sorted(f for _, f in phases)


@pytest.mark.parametrize("quant,algo,alpha", [
    ("w4a16_awq", "W4A16_AWQ", None), ("w8a8_sq", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", 0.5)])
def test_build_0_12_calibrates_on_local_data(trt012, hf_dir, tmp_path, on_orin, calib_file, quant,
                                             algo, alpha):
    out, facts, phases = build(hf_dir, tmp_path, quantization=quant, calib_dataset=calib_file)
    s = state(trt012)
    (quantize,) = s.calls_to("Arch.quantize")
    assert quantize["device"] == "cuda" and quantize["quant_config"].quant_algo == algo
    assert quantize["quant_config"].smoothquant_val == alpha
    calib = Path(quantize["calib_dataset"])
    assert calib.name == "calibration" and "cnn_dailymail" not in str(calib)
    assert not calib.exists()  # scratch is removed after the build
    assert not s.calls_to("Arch.from_hugging_face")
    assert len(s.calls_to("Arch.from_checkpoint")) == 1
    assert [p for p, _ in phases][:4] == ["plan", "quantize", "load", "compile"]
    engine = json.loads((out / "config.json").read_text())
    assert engine["pretrained_config"]["quantization"]["quant_algo"] == algo
    assert facts["calibration"] == "robot_text.txt"
    assert not list(out.parent.glob(".tmp-trtllm-scratch-*"))


@pytest.mark.parametrize("quant,algo", [("none", None), ("w4a16", "W4A16")])
def test_build_1x_goes_through_the_engine_llm(trt1x, hf_dir, tmp_path, on_orin, quant, algo):
    out, facts, _ = build(hf_dir, tmp_path, quantization=quant)
    s = state(trt1x)
    (llm,) = s.calls_to("LLM")
    assert llm["model"] == str(Path(hf_dir).resolve()) and llm["skip_tokenizer_init"] is True
    assert llm["quant_config"].quant_algo == algo
    assert llm["kv_cache_config"].free_gpu_memory_fraction == trtllm_step.BUILD_KV_CACHE_FRACTION
    assert s.calls_to("BuildConfig") == [{"max_batch_size": 1, "max_input_len": 256,
                                          "max_seq_len": 512, "max_num_tokens": 256,
                                          "max_beam_width": 1}]
    assert s.calls_to("LLM.save") == [{"engine_dir": str(out)}]
    assert len(s.calls_to("LLM.shutdown")) == 1
    assert facts["api_line"] == "1.x" and facts["tensorrt_llm"] == "1.0.0"


def test_build_puts_tokenizer_and_chat_template_beside_the_engine(trt, hf_dir, tmp_path, on_orin):
    out, facts, _ = build(hf_dir, tmp_path)
    source = Path(hf_dir)
    expected = {p.name for p in source.iterdir() if p.name.startswith("tokenizer")
                or p.name in ("generation_config.json", "chat_template.jinja",
                              "special_tokens_map.json")}
    assert {"tokenizer.json", "generation_config.json"} <= expected
    assert set(facts["tokenizer_files"]) == expected
    assert expected <= {p.name for p in out.iterdir()}
    assert "build_config" in json.loads((out / "config.json").read_text())  # not the HF config
    messages = [{"role": "user", "content": "Hello robot"}]
    ours = AutoTokenizer.from_pretrained(str(out))
    theirs = AutoTokenizer.from_pretrained(hf_dir)
    assert ours.chat_template and ours.chat_template == theirs.chat_template
    assert (ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            == theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def test_library_failures_become_build_errors(trt012, hf_dir, tmp_path, on_orin):
    empty = tmp_path / "calibration-set"
    empty.mkdir()  # a dataset directory without a train split: the library's loader fails
    with pytest.raises(BuildError, match=r"TensorRT-LLM failed to build .* \(w4a16_awq, float16, "
                                         r"LLaMAForCausalLM\): ValueError: no 'text' samples"):
        build(hf_dir, tmp_path, quantization="w4a16_awq", calib_dataset=str(empty))


def test_build_cancelled_before_work(trt, hf_dir, tmp_path, on_orin):
    out = tmp_path / "artifact"
    out.mkdir()
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(BuildCancelled):
        TensorRtLlmStep().build(spec_for(hf_dir), out, lambda *a: None, cancel)
    assert not list(out.iterdir())


def test_runtime_versions_and_device_info(trt, hf_dir, on_orin):
    step = TensorRtLlmStep()
    assert step.backend == "tensorrt_llm"
    versions = step.runtime_versions()
    assert versions["tensorrt_llm"] == trt.__version__
    assert versions["tensorrt_llm_api"] == trt.__stand_in_line__
    assert {"tensorrt", "nvidia-modelopt", "torch", "transformers"} <= set(versions)
    assert step.device_info(spec_for(hf_dir)) == {"gpu": "Orin", "sm": "8.7", "cuda": "12.6",
                                                  "l4t": "R36.4.0", "board": "stand-in board"}


# -- the backend against the stand-in -------------------------------------------------------------


@pytest.fixture
def engine_dir(trt, hf_dir, tmp_path, on_orin):
    out, _, _ = build(hf_dir, tmp_path)
    return out


def test_backend_streams_token_ids(trt, engine_dir):
    backend = load(engine_dir)
    try:
        prompt = prompt_of(backend)
        tokens = list(backend.generate(prompt, GREEDY, threading.Event()))
        assert tokens == expected_tokens(trt, backend, prompt, 12)
        assert backend.last_finish_reason is FinishReason.LENGTH
        assert backend.decode(tokens)
        s = state(trt)
        (sampling,) = s.calls_to("SamplingParams")
        limit_field, seed_field = (("max_new_tokens", "random_seed") if trt.__stand_in_line__ == "0.12"
                                   else ("max_tokens", "seed"))
        assert sampling[limit_field] == 12 and sampling[seed_field] is None
        assert sampling["top_k"] == 1 and sampling["temperature"] is None  # greedy
        assert sampling["end_id"] == 2 and sampling["stop_token_ids"] is None
        if trt.__stand_in_line__ == "1.x":
            assert sampling["detokenize"] is False
        (llm,) = s.calls_to("LLM")[-1:]
        assert llm["model"] == str(engine_dir)
        if trt.__stand_in_line__ == "1.x":   # xgrammar (guided decoding) needs the tokenizer
            assert llm["skip_tokenizer_init"] is False
            assert llm["guided_decoding_backend"] == "xgrammar"
        else:   # slm_ros tokenizes; the constrained-output slots are registered
            assert llm["skip_tokenizer_init"] is True
            assert sorted(llm["logits_post_processor_map"]) == [
                f"slm_ros_constraint_{i}" for i in range(adapter.LogitsSlots.COUNT)]
        info = backend.describe()
        assert info["tensorrt_llm_api"] == trt.__stand_in_line__ and info["context_length"] == 512
        assert backend.context_length == 512 and backend.eos_token_ids == frozenset({2})
    finally:
        backend.close()
    assert s.calls_to("LLM.shutdown")


def test_end_of_sequence_finishes_with_stop(trt, engine_dir):
    state(trt).eos_after = 3
    backend = load(engine_dir)
    try:
        tokens = list(backend.generate(prompt_of(backend), GREEDY, threading.Event()))
        assert len(tokens) == 3 and backend.last_finish_reason is FinishReason.STOP
    finally:
        backend.close()


def test_kv_cache_fraction_is_passed_and_checked(trt, engine_dir):
    for fraction in (0.5, 0.3):
        fields = {} if fraction == 0.5 else {"kv_cache_fraction": fraction}
        load(engine_dir, **fields).close()
        assert state(trt).calls_to("KvCacheConfig")[-1] == {"free_gpu_memory_fraction": fraction}
    assert BackendConfig(model="x").kv_cache_fraction == adapter.DEFAULT_KV_CACHE_FRACTION == 0.5
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match="kv_cache_fraction"):
            load(engine_dir, kv_cache_fraction=bad)


def test_sampling_settings_are_mapped(trt, engine_dir):
    backend = load(engine_dir)
    try:
        params = SamplingParams(max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=40,
                                repetition_penalty=1.2, seed=5)
        list(backend.generate(prompt_of(backend), params, threading.Event()))
        (sampling,) = state(trt).calls_to("SamplingParams")
        seed_field = "random_seed" if trt.__stand_in_line__ == "0.12" else "seed"
        assert (sampling["temperature"], sampling["top_p"], sampling["top_k"],
                sampling["repetition_penalty"], sampling[seed_field]) == (0.7, 0.9, 40, 1.2, 5)
    finally:
        backend.close()


def cancel_after(backend, trt, count):
    """Generate with a slow stand-in, cancel after ``count`` tokens; return tokens and request."""
    state(trt).step_delay_s = 0.02
    cancel = threading.Event()
    params = SamplingParams(max_new_tokens=200, temperature=0.0)
    tokens = []
    for token in backend.generate(prompt_of(backend), params, cancel):
        tokens.append(token)
        if len(tokens) == count:
            cancel.set()
    (request,) = state(trt).requests
    return tokens, request


def test_cancel_aborts_the_request_on_1x(trt1x, hf_dir, tmp_path, on_orin):
    out, _, _ = build(hf_dir, tmp_path)
    backend = load(out)
    try:
        tokens, request = cancel_after(backend, trt1x, 2)
        assert len(tokens) <= 3  # at most one more token after the cancel
        assert backend.last_finish_reason is FinishReason.CANCELLED
        assert state(trt1x).calls_to("RequestOutput.abort") == [{}]
        assert request.done.wait(5) and request.generated < 10  # the "GPU" stopped too
    finally:
        backend.close()


def test_cancel_stops_reading_on_0_12_and_the_request_stays_bounded(trt012, hf_dir, tmp_path,
                                                                     on_orin):
    out, _, _ = build(hf_dir, tmp_path)
    backend = load(out)
    try:
        state(trt012).step_delay_s = 0.002
        cancel = threading.Event()
        tokens = []
        for token in backend.generate(prompt_of(backend), SamplingParams(max_new_tokens=40), cancel):
            tokens.append(token)
            if len(tokens) == 2:
                cancel.set()
        assert len(tokens) <= 3
        assert backend.last_finish_reason is FinishReason.CANCELLED
        (request,) = state(trt012).requests
        # 0.12 cannot cancel: nothing was aborted, the request ran on to exactly its bound.
        assert not state(trt012).calls_to("RequestOutput.abort")
        assert request.done.wait(10) and request.generated == 40
    finally:
        backend.close()


def test_consumer_stopping_early_stops_the_stream(trt, engine_dir):
    backend = load(engine_dir)
    try:
        state(trt).step_delay_s = 0.01
        stream = backend.generate(prompt_of(backend), SamplingParams(max_new_tokens=100),
                                  threading.Event())
        first = [next(stream), next(stream)]
        stream.close()  # what the engine does at a stop string: the worker is told to halt
        assert len(first) == 2
        if trt.__stand_in_line__ == "1.x":
            assert state(trt).calls_to("RequestOutput.abort") == [{}]
        assert backend.last_finish_reason is FinishReason.CANCELLED
    finally:
        backend.close()


def test_prompt_limits(trt, engine_dir):
    backend = load(engine_dir)
    try:
        with pytest.raises(RequestError, match="built for at most 256 input tokens"):
            list(backend.generate(list(range(100, 400)), GREEDY, threading.Event()))
        prompt = list(range(100, 350))
        tokens = list(backend.generate(prompt, SamplingParams(max_new_tokens=1000),
                                       threading.Event()))
        assert len(tokens) == 512 - 250  # budget clamped to the engine's max_seq_len
        assert backend.last_finish_reason is FinishReason.LENGTH
        with pytest.raises(RequestError, match="cannot take images"):
            backend.apply_chat_template([{"role": "user", "content": "x"}], images=[object()])
    finally:
        backend.close()


def test_load_refusals(trt, engine_dir, hf_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="Hugging Face checkpoint"):
        load(hf_dir)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="needs an NVIDIA GPU"):
        load(engine_dir, device="cpu")
    engine_dtype = json.loads((engine_dir / "config.json").read_text())["pretrained_config"]["dtype"]
    other = "float16" if engine_dtype == "bfloat16" else "bfloat16"
    with pytest.raises(ConfigError, match="dtype is fixed"):
        load(engine_dir, dtype=other)
    old = tmp_path / "old-engine"
    shutil.copytree(engine_dir, old)
    config = json.loads((old / "config.json").read_text())
    config["version"] = "0.11.0"
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="built with TensorRT-LLM 0.11.0.*rebuild"):
        load(old)
    bare = tmp_path / "bare-engine"
    bare.mkdir()
    for name in ("config.json", "rank0.engine"):
        shutil.copy(engine_dir / name, bare / name)
    with pytest.raises(ModelLoadError, match="no usable tokenizer beside the engine"):
        load(bare)


def test_finish_reason_mapping():
    end = adapter.StreamEnd
    assert finish_reason_of(end("stop", False, 3), 10, False) is FinishReason.STOP
    assert finish_reason_of(end("length", False, 10), 10, False) is FinishReason.LENGTH
    assert finish_reason_of(end("cancelled", True, 2, True), 10, True) is FinishReason.CANCELLED
    assert finish_reason_of(end("timeout", False, 2), 10, False) is FinishReason.ERROR
    # 0.12 reports no reason: inferred.
    assert finish_reason_of(end(None, False, 10), 10, False) is FinishReason.LENGTH
    assert finish_reason_of(end(None, False, 4), 10, False) is FinishReason.STOP
    assert finish_reason_of(end(None, True, 4), 10, True) is FinishReason.CANCELLED


def test_registry_and_engine_stream_text(trt, engine_dir):
    backend = create_backend("tensorrt_llm")
    assert isinstance(backend, TensorRtLlmBackend) and backend.name == "tensorrt_llm"
    backend.load(BackendConfig(model=str(engine_dir)))
    chunks, done = [], threading.Event()

    def sink(chunk):
        chunks.append(chunk)
        if chunk.is_final:
            done.set()

    engine = Engine(backend, EngineConfig(max_queue=2, defaults=SamplingParams(max_new_tokens=8)))
    engine.start()
    try:
        engine.submit(Request(prompt="Where is the cup?", request_id="r1"), sink)
        assert done.wait(30)
    finally:
        engine.stop()
        backend.close()
    final = chunks[-1]
    assert final.finish_reason is FinishReason.LENGTH and not final.error
    ids = [t for c in chunks for t in c.token_ids]
    assert len(ids) == 8 and "".join(c.text for c in chunks) == backend_text(engine_dir, ids)


def backend_text(engine_dir, ids):
    return AutoTokenizer.from_pretrained(str(engine_dir)).decode(ids, skip_special_tokens=True)


# -- the real thing (Jetson / NVIDIA GPU only) ----------------------------------------------------


def _real_tensorrt_llm_missing() -> bool:
    if importlib.util.find_spec("tensorrt_llm") is None:
        return True
    import torch
    return not torch.cuda.is_available()


@pytest.mark.skipif(_real_tensorrt_llm_missing(), reason="TensorRT-LLM not installed / no NVIDIA GPU")
def test_real_tensorrt_llm_build_and_stream(tmp_path):
    """Build an fp16 engine of a small checkpoint with the real TensorRT-LLM and stream from it."""
    model = os.environ.get("SLM_ROS_TRTLLM_TEST_MODEL", "")
    if not model:
        pytest.skip("set SLM_ROS_TRTLLM_TEST_MODEL to a Hugging Face checkpoint directory "
                    "(e.g. TinyLlama-1.1B-Chat-v1.0) to build a real engine")
    step = TensorRtLlmStep()
    spec = BuildSpec(model=model, backend="tensorrt_llm", quantization="fp16", max_input_len=512,
                     max_seq_len=1024)
    step.validate(spec)
    out = tmp_path / "engine"
    out.mkdir()
    t0 = time.monotonic()
    facts = step.build(spec, out, lambda phase, fraction: print(f"{phase} {fraction:.2f}"),
                       threading.Event())
    print(f"built in {time.monotonic() - t0:.0f} s: {facts}")
    backend = load(out)
    try:
        prompt = prompt_of(backend, "Name three colours.")
        tokens = list(backend.generate(prompt, SamplingParams(max_new_tokens=24, temperature=0.0),
                                       threading.Event()))
        assert 0 < len(tokens) <= 24 and backend.decode(tokens).strip()
        cancel = threading.Event()
        streamed = []
        for token in backend.generate(prompt, SamplingParams(max_new_tokens=200), cancel):
            streamed.append(token)
            if len(streamed) == 3:
                cancel.set()
        assert len(streamed) <= 4 and backend.last_finish_reason is FinishReason.CANCELLED
    finally:
        backend.close()
