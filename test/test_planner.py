"""Memory planner against the config.json of real models (test/data/model_configs) and Orin sizes."""

import json
from pathlib import Path

import pytest

from slm_ros.build import device
from slm_ros.build.device import GiB, PRESETS, DeviceProfile
from slm_ros.build.planner import (ArchitectureUnknown, ModelArch, normalize_quantization,
                                   plan_memory)
from slm_ros.build.spec import BuildError

CONFIGS = Path(__file__).parent / "data" / "model_configs"
ORIN = {8: PRESETS["orin-nano-8gb"], 16: PRESETS["orin-nx-16gb"], 32: PRESETS["agx-orin-32gb"],
        64: PRESETS["agx-orin-64gb"]}


def config(name):
    return json.loads((CONFIGS / f"{name}.json").read_text())


@pytest.mark.parametrize("name, params", [
    ("tinyllama-1.1b-chat", 1.10e9), ("qwen2.5-1.5b-instruct", 1.54e9),
    ("phi-3.5-mini-instruct", 3.82e9), ("llama-3.2-3b-instruct", 3.21e9),
])
def test_parameter_count_matches_published(name, params):
    assert ModelArch.from_config(config(name)).parameters == pytest.approx(params, rel=0.05)


def test_architecture_numbers():
    llama = ModelArch.from_config(config("llama-3.2-3b-instruct"))
    assert (llama.num_kv_heads, llama.head_dim, llama.tie_word_embeddings) == (8, 128, True)
    phi = ModelArch.from_config(config("phi-3.5-mini-instruct"))
    assert phi.head_dim == 3072 // 32 and not phi.tie_word_embeddings
    assert ModelArch.from_config(config("qwen2.5-1.5b-instruct")).qkv_bias


def test_kv_cache_formula():
    plan = plan_memory(config("llama-3.2-3b-instruct"), ORIN[8], max_seq_len=4096)
    assert plan.kv_cache_bytes == 2 * 28 * 8 * 128 * 4096 * 1 * 2
    batched = plan_memory(config("llama-3.2-3b-instruct"), ORIN[8], max_seq_len=4096,
                          max_batch_size=4, kv_cache_dtype="int8")
    assert batched.kv_cache_bytes == plan.kv_cache_bytes * 4 // 2


def test_weights_shrink_with_quantization():
    cfg = config("tinyllama-1.1b-chat")
    sizes = {q: plan_memory(cfg, ORIN[8], quantization=q).weights_bytes
             for q in ("none", "w8a16", "w4a16", "w4a16_awq", "w4a16_gptq")}
    params = ModelArch.from_config(cfg).parameters
    assert sizes["none"] == pytest.approx(2 * params, rel=0.001)
    assert sizes["none"] > sizes["w8a16"] > sizes["w4a16_gptq"] > sizes["w4a16_awq"] > \
        sizes["w4a16"]
    # Embedding + lm_head (2 x 32000 x 2048) stay fp16: int4 is far from a quarter of fp16.
    assert sizes["w4a16"] == pytest.approx(0.5 * 0.969e9 + 2 * 2 * 65.5e6, rel=0.02)


def test_tied_embeddings_count_twice_in_tensorrt_llm_once_in_transformers():
    cfg = config("llama-3.2-3b-instruct")
    trt = plan_memory(cfg, ORIN[64], backend="tensorrt_llm", dtype="float16")
    hf = plan_memory(cfg, ORIN[64], backend="transformers", dtype="float16")
    assert trt.weights_bytes - hf.weights_bytes == 128256 * 3072 * 2


@pytest.mark.parametrize("size", [8, 16, 32, 64])
def test_tinyllama_int4_fits_every_orin(size):
    plan = plan_memory(config("tinyllama-1.1b-chat"), ORIN[size], quantization="W4A16")
    assert plan.fits and plan.build_fits
    plan.check(build=True)


@pytest.mark.parametrize("name, quantization, fits", [
    ("llama-3.2-3b-instruct", "none", {8: False, 16: True, 32: True, 64: True}),
    ("llama-3.2-3b-instruct", "W4A16", {8: True, 16: True, 32: True, 64: True}),
    ("phi-3.5-mini-instruct", "none", {8: False, 16: True, 32: True, 64: True}),
    ("phi-3.5-mini-instruct", "int4_awq", {8: True, 16: True, 32: True, 64: True}),
    ("qwen2.5-1.5b-instruct", "none", {8: True, 16: True, 32: True, 64: True}),
])
def test_runtime_verdicts_4k_context(name, quantization, fits):
    for size, expected in fits.items():
        plan = plan_memory(config(name), ORIN[size], quantization=quantization, max_seq_len=4096)
        assert plan.fits is expected, plan.summary()


def test_check_raises_with_the_numbers_and_a_way_out():
    plan = plan_memory(config("llama-3.2-3b-instruct"), ORIN[8], quantization="none",
                       max_seq_len=4096, name="Llama-3.2-3B")
    with pytest.raises(BuildError) as info:
        plan.check()
    message = str(info.value)
    for text in ("Llama-3.2-3B does not fit", f"{plan.total_bytes / GiB:.2f} GiB",
                 f"weights {plan.weights_bytes / GiB:.2f} GiB", "KV cache 0.44 GiB",
                 "orin-nano-8gb has 6.00 GiB available", "8.00 GiB total", "w4a16 would need"):
        assert text in message, message


def test_build_peak_calibration_does_not_fit_an_orin_nano():
    tiny = config("tinyllama-1.1b-chat")
    weight_only = plan_memory(tiny, ORIN[8], quantization="int4_wo")
    awq = plan_memory(tiny, ORIN[8], quantization="W4A16_AWQ")
    assert weight_only.build_fits and awq.fits and not awq.build_fits
    assert awq.build_peak_bytes > 2 * ModelArch.from_config(tiny).parameters  # holds fp16 model
    with pytest.raises(BuildError, match=r"peaks at ~\d+\.\d\d GiB .*Build on a larger machine"):
        awq.check(build=True)
    awq.check()  # it runs fine once built elsewhere
    # fp16 engines of 3B models need several bytes per parameter to build.
    big = plan_memory(config("llama-3.2-3b-instruct"), ORIN[16], quantization="none")
    assert big.fits and not big.build_fits
    assert big.build_peak_bytes / ModelArch.from_config(config("llama-3.2-3b-instruct")).parameters \
        > 3


def test_transformers_cpu_plan_uses_float32_and_int8_dynamic_is_smaller():
    cpu = DeviceProfile("cpu", 16 * GiB, shared=True, reserve_bytes=GiB)
    cfg = config("qwen2.5-1.5b-instruct")
    fp32 = plan_memory(cfg, cpu, backend="transformers")
    int8 = plan_memory(cfg, cpu, backend="transformers", quantization="int8_dynamic")
    assert fp32.dtype == "float32" and fp32.kv_cache_dtype == "float32"
    assert fp32.weights_bytes == pytest.approx(4 * 1.54e9, rel=0.01)
    assert int8.weights_bytes < fp32.weights_bytes / 2


def test_quantization_names():
    assert normalize_quantization("W4A16_AWQ") == "w4a16_awq"
    assert normalize_quantization("int8_wo") == "w8a16"
    assert normalize_quantization("fp16") == "none"
    with pytest.raises(BuildError, match="unknown quantization 'int3'.*known: none"):
        normalize_quantization("int3")


def test_missing_architecture_field_is_named():
    cfg = config("tinyllama-1.1b-chat")
    del cfg["num_hidden_layers"]
    with pytest.raises(ArchitectureUnknown, match="config.json has no num_hidden_layers"):
        ModelArch.from_config(cfg)


def test_gguf_header_gives_the_same_architecture_as_the_converted_checkpoint(default_model_dir):
    from slm_ros.build.builder import gguf_config
    from slm_ros.models import embedded_gguf
    from_gguf = ModelArch.from_config(gguf_config(embedded_gguf()))
    converted = json.loads((Path(default_model_dir) / "config.json").read_text())
    from_hf = ModelArch.from_config(converted)
    assert dataclasses_fields(from_gguf) == dataclasses_fields(from_hf)
    assert from_gguf.parameters == 134_515_008  # what transformers counts after conversion


def test_gguf_plan_of_the_embedded_file_matches_its_size():
    """llama_cpp plans in GGUF weight types: ``none`` is the file's own (Q4_1 here), read from its
    header; the weights estimate is within a few percent of the file for block types."""
    from slm_ros.build.builder import gguf_config
    from slm_ros.models import embedded_gguf
    path = embedded_gguf()
    cfg = gguf_config(path)
    assert cfg["_gguf_file_type"] == "q4_1"
    cpu = PRESETS["orin-nano-8gb"]
    plan = plan_memory(cfg, cpu, backend="llama_cpp", max_seq_len=4096)
    assert plan.quantization == "q4_1" and plan.fits
    assert plan.weights_bytes == pytest.approx(path.stat().st_size, rel=0.05)
    # 30 layers x 3 KV heads x 64 x 2 (K and V) x 2 bytes (f16) per token
    assert plan.kv_cache_bytes == 4096 * 30 * 3 * 64 * 2 * 2
    sizes = {q: plan_memory(cfg, cpu, backend="llama_cpp", quantization=q).weights_bytes
             for q in ("q4_0", "q4_1", "q8_0", "f16")}
    assert sizes["q4_0"] < sizes["q4_1"] < sizes["q8_0"] < sizes["f16"]
    assert sizes["f16"] == pytest.approx(2 * 134_515_008, rel=0.01)
    # A requantization holds the source file and the new one at once.
    assert plan_memory(cfg, cpu, backend="llama_cpp", quantization="q8_0").build_peak_bytes > \
        sizes["q8_0"] + plan.weights_bytes
    with pytest.raises(BuildError, match="unknown GGUF quantization 'w4a16'"):
        plan_memory(cfg, cpu, backend="llama_cpp", quantization="w4a16")


def test_gguf_file_types_are_llama_cpps():
    """The planner's GGUF tables (ROS-free, no llama_cpp import) agree with llama.cpp's enum and
    cover every quantization the llama_cpp build step offers."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from slm_ros.build.llama_cpp_step import QUANTIZATIONS
    from slm_ros.build.planner import GGUF_BITS, GGUF_FILE_TYPES
    for value, name in GGUF_FILE_TYPES.items():
        const = "LLAMA_FTYPE_ALL_F32" if name == "f32" else f"LLAMA_FTYPE_MOSTLY_{name.upper()}"
        assert getattr(llama_cpp, const) == value, name
    assert set(QUANTIZATIONS) - {"none"} <= set(GGUF_BITS) == set(GGUF_FILE_TYPES.values())


def dataclasses_fields(arch):
    return (arch.hidden_size, arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.head_dim,
            arch.intermediate_size, arch.vocab_size, arch.tie_word_embeddings)


def test_device_facts(tmp_path):
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, "
                       "EABI: aarch64, DATE: Fri Sep 13 04:36:44 UTC 2024\n")
    assert device.l4t_release(release) == "R36.4.0"
    assert device.l4t_release(tmp_path / "absent") == ""
    total, available = device.memory_bytes()
    assert total > available > 0
    here = device.detect_profile("cpu")
    assert here.total_bytes == total and here.available_bytes < total
    assert device.preset("orin-nano-8gb").total_bytes == 8 * GiB


# -- onnxruntime_genai / openvino weight formats --------------------------------------------------


def test_ort_genai_int4_counts_blocks_of_32_with_the_embedding_quantized():
    cpu = device.detect_profile("cpu")
    plan = plan_memory(config("smollm2-135m-instruct"), cpu, backend="onnxruntime_genai",
                       quantization="int4", dtype="int4")
    # The built artifact of the embedded SmolLM2 is 86 MB (4-bit weights + an fp32 scale per 32).
    assert 80e6 < plan.weights_bytes < 92e6 and plan.dtype == "float32"
    int8 = plan_memory(config("smollm2-135m-instruct"), cpu, backend="onnxruntime_genai",
                       quantization="int8")
    fp32 = plan_memory(config("smollm2-135m-instruct"), cpu, backend="onnxruntime_genai",
                       quantization="fp32")
    assert plan.weights_bytes < int8.weights_bytes < fp32.weights_bytes
    assert fp32.weights_bytes == pytest.approx(4 * ModelArch.from_config(
        config("smollm2-135m-instruct")).parameters, rel=0.01)
    cuda = plan_memory(config("phi-3.5-mini-instruct"), ORIN[8], backend="onnxruntime_genai",
                       quantization="int4", on_gpu=True)
    assert cuda.dtype == "float16" and cuda.weights_bytes < 2.5 * GiB


def test_openvino_int4_keeps_embedding_and_head_at_int8():
    cpu = device.detect_profile("cpu")
    plans = {q: plan_memory(config("phi-3.5-mini-instruct"), cpu, backend="openvino",
                            quantization=q) for q in ("int4", "int8", "fp16")}
    assert plans["int4"].weights_bytes < plans["int8"].weights_bytes < plans["fp16"].weights_bytes
    assert "embeddings at int8" in plans["int4"].assumptions[1]
    arch = ModelArch.from_config(config("phi-3.5-mini-instruct"))
    # Untied Phi-3.5: two int8 vocab tables (embedding, lm_head) + int4 matrices.
    assert plans["int4"].weights_bytes > arch.linear_parameters / 2 + 2 * arch.embedding_parameters


def test_edge_backends_refuse_names_of_other_backends():
    cpu = device.detect_profile("cpu")
    with pytest.raises(BuildError, match="for the openvino backend; known: int4, int8, fp16"):
        plan_memory(config("smollm2-135m-instruct"), cpu, backend="openvino", quantization="q4_0")
    with pytest.raises(BuildError, match="onnxruntime_genai"):
        plan_memory(config("smollm2-135m-instruct"), cpu, backend="onnxruntime_genai",
                    quantization="w4a16_awq")
