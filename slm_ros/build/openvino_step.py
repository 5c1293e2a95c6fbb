"""Build step for the openvino backend: a Hugging Face checkpoint as an OpenVINO IR that
``openvino_genai.LLMPipeline`` loads.

The artifact is a directory with ``openvino_model.xml/.bin`` (a stateful decoder: the KV cache lives
in the model's variables, inputs ``input_ids``, ``attention_mask``, ``position_ids``, ``beam_idx``,
output ``logits``), ``openvino_tokenizer.xml`` / ``openvino_detokenizer.xml`` (openvino-tokenizers,
carrying the chat template), and the checkpoint's config, generation config and tokenizer files.

Why not optimum-intel: its newest release (2.2.0) needs transformers < 5.6 and huggingface-hub
< 1.22, and this project runs transformers 5.23; installing it would downgrade both (and torch). So
the graph is written here directly with OpenVINO's operation API from the safetensors weights (no
torch, no tracing), for the Llama family of decoders (``llama``, ``mistral`` without sliding window,
``qwen2``, ``qwen3``); other architectures are refused by :meth:`OpenVinoStep.validate`. Weight
compression is NNCF's ``compress_weights`` on that graph, as optimum-intel would do it:

* ``int4``: 4-bit asymmetric, one scale and zero point per group of 64 input channels
  (:data:`INT4_GROUP_SIZE`) on every decoder matrix; NNCF keeps the embedding / lm_head at int8.
* ``int8``: 8-bit asymmetric, per output channel, every matrix and the embedding.
* ``fp16``: weights stored as float16 (computed at the device's precision).
* ``none``: float32 weights.

Token limits are not baked in (the IR has dynamic shapes) and the compute precision is the device's
choice at load (the backend's ``dtype``), so neither is part of the cache key.

The build runs in this process: cancel is checked after reading the checkpoint, after every
converted layer, after compression and after saving; NNCF's compression itself cannot be
interrupted (8-13 s for SmolLM2-135M on 2 cores). The float32 weights are held in memory while the
graph is built (about 4 bytes per parameter, twice at the peak), which bounds the model size a
robot can convert on-board.

Measured on the embedded SmolLM2-135M-Instruct (538 MB float32 safetensors) on a shared 2-core x86
CPU, cold build / artifact size: int4 19 s / 94 MB, int8 15 s / 143 MB, fp16 6 s / 277 MB, none
9 s / 546 MB; a cache hit takes about 0.01 s.
"""

from __future__ import annotations

import gc
import json
import shutil
import struct
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

import openvino as ov
import openvino.opset13 as ops
from openvino.opset6 import assign, read_value

from slm_ros.build import device as device_facts
from slm_ros.build.builder import read_hf_config
from slm_ros.build.spec import BuildCancelled, BuildError, BuildSpec, ProgressFn

QUANTIZATIONS = ("int4", "int8", "fp16", "none")
#: Input channels sharing one int4 scale / zero point. 64 divides the hidden sizes of the small
#: models this project runs (576, 960, 1536, 2048, ...); 128 does not divide 576 (SmolLM2-135M).
INT4_GROUP_SIZE = 64
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DEVICES = ("CPU", "GPU", "NPU")
_ARTIFACT_XML = "openvino_model.xml"
_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
           "tokenizer.model", "added_tokens.json")
# Not baked into the IR: token limits (dynamic shapes) and the compute precision (chosen by the
# device when the backend loads: its ``dtype``).
_UNUSED_FIELDS = ("max_input_len", "max_seq_len", "max_batch_size", "dtype")


def normalize(quantization: str) -> str:
    """Canonical quantization name (case-insensitive); BuildError lists the valid ones."""
    name = (quantization or "none").strip().lower()
    name = {"int4_asym": "int4", "int8_asym": "int8", "float16": "fp16", "fp32": "none",
            "float32": "none", "w4a16": "int4", "w8a16": "int8"}.get(name, name)
    if name not in QUANTIZATIONS:
        raise BuildError(f"quantization {quantization!r} is not available for the openvino "
                         f"backend; valid: {', '.join(QUANTIZATIONS)}")
    return name


def ov_device(device: str) -> str:
    """OpenVINO device name for a ``device`` value (``auto``/``cpu`` -> CPU, ``gpu``, ``npu``,
    ``gpu.1``); ValueError names the valid ones."""
    name = (device or "auto").strip().upper()
    if name in ("AUTO", ""):
        return "CPU"
    if name.split(".", 1)[0] in DEVICES:
        return name
    raise ValueError(f"device {device!r} is not an OpenVINO device; valid: auto, cpu, gpu, "
                     f"gpu.N, npu")


class OpenVinoStep:
    """:class:`~slm_ros.build.spec.BuildStep` for the ``openvino`` backend."""

    backend = "openvino"

    def validate(self, spec: BuildSpec) -> None:
        normalize(spec.quantization)
        try:
            ov_device(spec.device)
        except ValueError as exc:
            raise BuildError(f"build: {exc}") from exc
        path = Path(spec.model)
        if path.suffix.lower() == ".gguf" or not path.is_dir():
            raise BuildError(f"the openvino step builds from a Hugging Face checkpoint directory "
                             f"(config.json, *.safetensors, tokenizer.json); {spec.model!r} is not "
                             f"one")
        config = read_hf_config(path)
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise BuildError(f"{path / 'config.json'}: model_type {model_type!r} is not supported "
                             f"by the openvino step; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if config.get("sliding_window") and config.get("use_sliding_window", True) and \
                model_type == "mistral":
            raise BuildError(f"{path / 'config.json'}: sliding-window attention is not supported "
                             f"by the openvino step")
        if not (path / "tokenizer.json").is_file():
            raise BuildError(f"{path}: tokenizer.json is missing (the OpenVINO tokenizer is "
                             f"converted from it)")
        if not sorted(path.glob("*.safetensors")):
            raise BuildError(f"{path}: no *.safetensors weights (the openvino step reads "
                             f"safetensors only)")
        _rope_inv_freq(config, path)  # refuses rope scalings it cannot do

    def key_fields(self, spec: BuildSpec) -> Dict[str, Any]:
        """Token limits and dtype are load-time choices of the backend, not part of the IR."""
        fields = spec.key_fields()
        for name in _UNUSED_FIELDS:
            fields.pop(name)
        fields["quantization"] = normalize(spec.quantization)
        if fields["quantization"] == "int4":
            fields["int4_group_size"] = INT4_GROUP_SIZE
        return fields

    def runtime_versions(self) -> Dict[str, str]:
        return {name: _version(name) for name in
                ("openvino", "openvino-genai", "openvino-tokenizers", "nncf", "transformers")}

    def device_info(self, spec: BuildSpec) -> Dict[str, str]:
        # The IR is device-independent (each device compiles it when the pipeline loads); the
        # machine is recorded so an artifact is not silently shared across CPU architectures.
        return {"device": "cpu" if ov_device(spec.device) == "CPU" else ov_device(spec.device),
                "machine": device_facts.cpu_info()["machine"]}

    def build(self, spec: BuildSpec, out_dir: Path, progress: ProgressFn,
              cancel: threading.Event) -> Dict[str, Any]:
        source = Path(spec.model)
        quantization = normalize(spec.quantization)
        config = read_hf_config(source)

        def check(where: str) -> None:
            if cancel.is_set():
                raise BuildCancelled(f"build cancelled {where}; nothing was published")

        progress("load", 0.0)
        weights = _Weights(source)
        check("after reading the checkpoint")
        progress("convert", 0.1)
        model = _decoder_graph(config, weights, source,
                               lambda i, n: (check(f"converting layer {i}"),
                                             progress("convert", 0.1 + 0.4 * i / n)))
        weights.close()
        gc.collect()
        check("after converting the model")
        facts: Dict[str, Any] = {"quantization": quantization,
                                 "model_type": config.get("model_type"),
                                 "architectures": list(config.get("architectures") or []),
                                 "source_format": "huggingface", "converter": "slm_ros opset graph"}
        if quantization in ("int4", "int8"):
            progress("quantize", 0.5)
            model, facts["compression"] = _compress(model, quantization)
            check("after weight compression")
        progress("save", 0.8)
        out_dir.mkdir(parents=True, exist_ok=True)
        ov.save_model(model, str(out_dir / _ARTIFACT_XML), compress_to_fp16=quantization == "fp16")
        del model
        gc.collect()
        check("after saving the model")
        progress("save", 0.9)
        facts["chat_template"] = _save_tokenizer(source, out_dir)
        for name in _COPIED:
            if (source / name).is_file() and not (out_dir / name).exists():
                shutil.copy2(source / name, out_dir / name)
        progress("save", 1.0)
        return facts


# --------------------------------------------------------------------------- checkpoint reading

class _Weights:
    """Tensors of the safetensors files of a checkpoint as float32 numpy arrays, read on demand."""

    _DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}

    def __init__(self, directory: Path):
        self._where: Dict[str, Tuple[np.memmap, dict, Path]] = {}
        self._maps: List[np.memmap] = []
        for path in sorted(directory.glob("*.safetensors")):
            try:
                with open(path, "rb") as handle:
                    (length,) = struct.unpack("<Q", handle.read(8))
                    header = json.loads(handle.read(length))
                data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + length)
            except (OSError, ValueError, struct.error) as exc:
                raise BuildError(f"cannot read safetensors file {path}: {exc}") from exc
            self._maps.append(data)
            for name, info in header.items():
                if name != "__metadata__":
                    self._where[name] = (data, info, path)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        try:
            data, info, path = self._where[name]
        except KeyError:
            raise BuildError(f"the checkpoint has no tensor {name!r}") from None
        kind = self._DTYPES.get(info["dtype"])
        if kind is None:
            raise BuildError(f"{path}: tensor {name!r} has dtype {info['dtype']}; the openvino "
                             f"step reads F32, F16 and BF16")
        start, end = info["data_offsets"]
        array = np.frombuffer(data[start:end], dtype=kind).reshape(info["shape"])
        if kind is np.uint16:  # bfloat16: the top half of a float32
            return (array.astype(np.uint32) << 16).view(np.float32)
        return array.astype(np.float32)

    def close(self) -> None:
        self._where.clear()
        self._maps.clear()


def _rope_inv_freq(config: Dict[str, Any], path: Path) -> np.ndarray:
    """RoPE inverse frequencies, with the ``linear`` and ``llama3`` scalings applied."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    if kind == "linear":
        inv = inv / float(rope["factor"])
    elif kind == "llama3":
        factor, low, high = (float(rope["factor"]), float(rope["low_freq_factor"]),
                             float(rope["high_freq_factor"]))
        old = float(rope["original_max_position_embeddings"])
        wavelen = 2 * np.pi / inv
        smooth = (old / wavelen - low) / (high - low)
        scaled = np.where(wavelen > old / low, inv / factor, inv)
        middle = (wavelen <= old / low) & (wavelen >= old / high)
        inv = np.where(middle, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif kind != "default":
        raise BuildError(f"{path / 'config.json'}: rope type {kind!r} is not supported by the "
                         f"openvino step (default, linear, llama3 are)")
    return inv.astype(np.float32)


# --------------------------------------------------------------------------- the graph

def _named(node, name: str):
    node.output(0).get_tensor().set_names({name})
    node.set_friendly_name(name)
    return node


def _decoder_graph(config: Dict[str, Any], weights: _Weights, path: Path, on_layer) -> ov.Model:
    """A stateful OpenVINO decoder in the layout optimum-intel exports (what LLMPipeline
    expects)."""
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        layers = int(config["num_hidden_layers"])
        eps = float(config.get("rms_norm_eps", 1e-6))
    except (KeyError, TypeError, ValueError) as exc:
        raise BuildError(f"{path / 'config.json'}: missing or bad field {exc}") from exc
    head_dim = int(config.get("head_dim") or hidden // heads)
    qk_norm = config.get("model_type") == "qwen3"
    f32 = np.float32

    def const(array) -> ov.Node:
        return ops.constant(np.ascontiguousarray(array, dtype=f32) if isinstance(array, np.ndarray)
                            else array)

    def ints(*values) -> ov.Node:
        return ops.constant(np.array(values, dtype=np.int64))

    def rms_norm(x, weight_name: str):
        variance = ops.reduce_mean(ops.multiply(x, x), ints(-1), keep_dims=True)
        scaled = ops.multiply(x, ops.sqrt(ops.divide(const(np.float32(1.0)),
                                                     ops.add(variance, const(np.float32(eps))))))
        return ops.multiply(scaled, const(weights.get(weight_name)))

    def linear(x, prefix: str):
        out = ops.matmul(x, const(weights.get(prefix + ".weight")), False, True)
        if prefix + ".bias" in weights:
            out = ops.add(out, const(weights.get(prefix + ".bias")))
        return out

    input_ids = ops.parameter([-1, -1], ov.Type.i64, name="input_ids")
    attention_mask = ops.parameter([-1, -1], ov.Type.i64, name="attention_mask")
    position_ids = ops.parameter([-1, -1], ov.Type.i64, name="position_ids")
    beam_idx = ops.parameter([-1], ov.Type.i32, name="beam_idx")
    params = [input_ids, attention_mask, position_ids, beam_idx]
    for param in params:
        _named(param, param.get_friendly_name())

    ids_shape = ops.shape_of(input_ids, output_type="i64")
    batch = ops.gather(ids_shape, ints(0), ints(0))
    seq = ops.gather(ids_shape, ints(1), ints(0))
    total = ops.gather(ops.shape_of(attention_mask, output_type="i64"), ints(1), ints(0))

    # RoPE tables [batch, 1, seq, head_dim]
    inv_freq = _rope_inv_freq(config, path)
    freqs = ops.multiply(ops.unsqueeze(ops.convert(position_ids, "f32"), ints(-1)),
                         const(inv_freq))
    angles = ops.unsqueeze(ops.concat([freqs, freqs], -1), ints(1))
    cos, sin = ops.cos(angles), ops.sin(angles)

    def rope(x):
        first, second = ops.split(x, ops.constant(np.int64(-1)), 2).outputs()
        rotated = ops.concat([ops.negative(second), first], -1)
        return ops.add(ops.multiply(x, cos), ops.multiply(rotated, sin))

    # Additive mask [batch, 1, seq, total]: query i sits at key position total - seq + i.
    key_pos = ops.range(ops.constant(np.int64(0)),
                        ops.squeeze(total, ints(0)), ops.constant(np.int64(1)), "i64")
    query_pos = ops.add(ops.range(ops.constant(np.int64(0)), ops.squeeze(seq, ints(0)),
                                  ops.constant(np.int64(1)), "i64"), ops.subtract(total, seq))
    causal = ops.less_equal(ops.unsqueeze(key_pos, ints(0)), ops.unsqueeze(query_pos, ints(1)))
    padding = ops.not_equal(ops.unsqueeze(attention_mask, ints(1, 2)), ops.constant(np.int64(0)))
    allowed = ops.logical_and(ops.unsqueeze(causal, ints(0, 1)), padding)
    mask = ops.select(allowed, const(np.float32(0.0)), const(np.float32(np.finfo(f32).min)))

    empty_cache = ops.broadcast(const(np.float32(0.0)),
                                ops.concat([batch, ints(kv_heads, 0, head_dim)], 0))
    scale = const(np.float32(1.0 / np.sqrt(head_dim)))
    group = heads // kv_heads
    sinks = []

    def heads_first(x, count: int):
        return ops.transpose(ops.reshape(x, ints(0, 0, count, head_dim), True), ints(0, 2, 1, 3))

    def cached(x, layer: int, kind: str):
        variable = f"past_key_values.{layer}.{kind}present.{layer}.{kind}"
        past = read_value(empty_cache, variable, ov.Type.f32, [-1, kv_heads, -1, head_dim])
        joined = ops.concat([ops.gather(past, beam_idx, ints(0)), x], 2)
        sinks.append(assign(joined, variable))
        if group == 1:
            return joined
        wide = ops.broadcast(ops.unsqueeze(joined, ints(2)), ints(1, 1, group, 1, 1),
                             broadcast_spec="BIDIRECTIONAL")
        return ops.reshape(wide, ints(0, heads, -1, head_dim), True)

    h = ops.gather(const(weights.get("model.embed_tokens.weight")), input_ids, ints(0))
    for i in range(layers):
        on_layer(i, layers)
        p = f"model.layers.{i}."
        x = rms_norm(h, p + "input_layernorm.weight")
        q = heads_first(linear(x, p + "self_attn.q_proj"), heads)
        k = heads_first(linear(x, p + "self_attn.k_proj"), kv_heads)
        v = heads_first(linear(x, p + "self_attn.v_proj"), kv_heads)
        if qk_norm:
            q = rms_norm(q, p + "self_attn.q_norm.weight")
            k = rms_norm(k, p + "self_attn.k_norm.weight")
        attn = ops.scaled_dot_product_attention(rope(q), cached(rope(k), i, "key"),
                                                cached(v, i, "value"), mask, scale)
        attn = ops.reshape(ops.transpose(attn, ints(0, 2, 1, 3)), ints(0, 0, heads * head_dim),
                           True)
        h = ops.add(h, linear(attn, p + "self_attn.o_proj"))
        x = rms_norm(h, p + "post_attention_layernorm.weight")
        gated = ops.multiply(ops.swish(linear(x, p + "mlp.gate_proj")),
                             linear(x, p + "mlp.up_proj"))
        h = ops.add(h, linear(gated, p + "mlp.down_proj"))
    h = rms_norm(h, "model.norm.weight")
    head = "lm_head.weight" if "lm_head.weight" in weights else "model.embed_tokens.weight"
    logits = _named(ops.matmul(h, const(weights.get(head)), False, True), "logits")
    model = ov.Model([ops.result(logits)], sinks, params, "slm_ros_decoder")
    model.outputs[0].get_tensor().set_names({"logits"})
    return model


def _compress(model: ov.Model, quantization: str) -> Tuple[ov.Model, Dict[str, Any]]:
    import nncf
    if quantization == "int4":
        settings = {"mode": nncf.CompressWeightsMode.INT4_ASYM, "group_size": INT4_GROUP_SIZE,
                    "ratio": 1.0}
    else:
        settings = {"mode": nncf.CompressWeightsMode.INT8_ASYM}
    try:
        compressed = nncf.compress_weights(model, **settings)
    except (RuntimeError, ValueError) as exc:
        raise BuildError(f"NNCF weight compression ({quantization}) failed: {exc}") from exc
    facts = {key: str(value).rsplit(".", 1)[-1].lower() if key == "mode" else value
             for key, value in settings.items()}
    facts["nncf"] = nncf.__version__
    return compressed, facts


def _save_tokenizer(source: Path, out_dir: Path) -> bool:
    """Convert the checkpoint's tokenizer to OpenVINO (tokenizer + detokenizer, chat template in
    their rt_info); True when a chat template came along."""
    from openvino_tokenizers import convert_tokenizer
    from transformers import AutoTokenizer
    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(str(source))
        tokenizer, detokenizer = convert_tokenizer(hf_tokenizer, with_detokenizer=True,
                                                   skip_special_tokens=True)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise BuildError(f"cannot convert the tokenizer of {source} to OpenVINO: "
                         f"{type(exc).__name__}: {exc}") from exc
    ov.save_model(tokenizer, str(out_dir / "openvino_tokenizer.xml"))
    ov.save_model(detokenizer, str(out_dir / "openvino_detokenizer.xml"))
    return bool(getattr(hf_tokenizer, "chat_template", None))


def _version(distribution: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return ""


def artifact_model(directory: Path) -> Optional[Path]:
    """The IR of an openvino artifact directory, or None when it is not one."""
    path = Path(directory) / _ARTIFACT_XML
    return path if path.is_file() else None
