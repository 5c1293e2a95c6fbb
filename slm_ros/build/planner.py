"""Memory planner: will this model, quantized this way, with these limits, fit this device?

ROS-free, no heavy imports: it works from a ``config.json`` dict, so it can answer before any weight is
read -- and before a build that would run an 8 GB Orin Nano out of memory (the failure Jetson users
report most). Every number is an estimate; the assumptions are listed here and in
:attr:`MemoryPlan.assumptions`:

* **Weights.** Parameters are counted from the architecture (decoder-only transformers: embedding,
  per-layer attention and MLP matrices, norms, biases, lm_head). Linear weights take the scheme's bits
  plus its scales: per output channel (fp16 scale) for weight-only int8/int4, per group of 128 input
  weights for AWQ/GPTQ (fp16 scale, GPTQ also a zero point), per tensor for FP8 and CPU dynamic int8.
  Embeddings stay at the activation dtype. The lm_head stays at the activation dtype for TensorRT-LLM
  (its weight-only and AWQ recipes exclude it) and is quantized by CPU ``int8_dynamic`` (it is an
  ``nn.Linear``). With tied embeddings TensorRT-LLM engines hold a second copy for the lm_head; the
  transformers backend shares one tensor (unless ``int8_dynamic`` quantizes the lm_head copy).
* **KV cache.** ``2 x layers x kv_heads x head_dim x max_seq_len x max_batch_size x kv bytes``, the
  KV dtype being the activation dtype unless an int8/fp8 KV cache is asked for.
* **Activations (rough).** The context phase of a full batch: ``max_batch_size x max_input_len``
  tokens, each holding about ``2 x hidden + (heads + 2 x kv_heads) x head_dim + 2 x intermediate``
  values at the activation dtype (residual, normed input, q/k/v, gate and up projections), plus fp32
  logits for one position per sequence. Attention is assumed fused (TensorRT-LLM context FMHA,
  PyTorch SDPA): no ``seq x seq`` score matrix.
* **Runtime overhead.** A process running TensorRT-LLM or PyTorch on a GPU: 1 GiB (CUDA context with
  lazy module loading, cuBLAS/cuBLASLt and TensorRT workspaces, the Python interpreter with torch
  imported); PyTorch on a CPU: 0.5 GiB (importing torch + transformers measured 0.25 GiB RSS on
  x86-64, plus tokenizer, allocator slack and generate buffers).
* **llama_cpp (GGUF).** Its quantization names are GGUF weight types (``q4_0``, ``q8_0``, ``f16``,
  ...; ``none`` = the file's own type, read from ``general.file_type``, else planned as f16). Every
  weight takes the type's bits per weight, block scales included (:data:`GGUF_BITS`; k-quant mixes
  at their typical average), except the token embedding (and an untied output matrix), which
  llama.cpp's quantizer keeps at 8.5 bits or more. KV cache f16 (llama.cpp's default); activations
  for one 512-token batch (its default ``n_batch``) at float32; 0.5 GiB runtime. Requantizing peaks at
  the source file + the new file + 0.5 GiB.
* **onnxruntime_genai / openvino.** Their build steps' quantization names map to
  :data:`EDGE_SCHEMES`: ORT GenAI's model builder quantizes every matrix, the (tied) embedding and
  lm_head included, to int4 or int8 in blocks of 32 weights with one fp32 scale each (fp16 on CUDA),
  round-to-nearest, symmetric: 5 / 9 bits per weight on the CPU (the embedded SmolLM2 at int4: 86 MB
  measured, 88 MB planned). OpenVINO's NNCF compresses linear weights to int4 (asymmetric, groups
  of 64 -- 128 does not divide SmolLM2's 576-wide rows -- fp16 scale and zero point) and keeps the
  embedding and lm_head at int8 (asymmetric per channel: its "backup" precision), or everything to
  int8 per channel (SmolLM2 int4: 94 MB measured). Activations and KV cache planned at float32 on
  a CPU (OpenVINO's CPU plugin keeps a u8 KV cache and computes in bf16 where it can: an
  overestimate), float16 on a GPU; 0.5 GiB runtime. Building exports from the Hugging Face model in
  float32: about 3.3x its float32 size at peak (measured 3.3x for ORT GenAI, 2.4x for OpenVINO).
* **Reserve.** What the device profile keeps for the OS and ROS (see :mod:`slm_ros.build.device`):
  on Jetson the GPU shares memory with the CPU, so the model competes with everything else.
* **Build peak.** TensorRT-LLM: the larger of checkpoint conversion (the Hugging Face model at its
  checkpoint dtype + the converted weights + 0.5 GiB Python; calibrated schemes -- AWQ, SmoothQuant,
  FP8 -- also hold an fp16 copy on the GPU plus ~1 GiB of calibration activations and a CUDA context)
  and the engine build (the network's weights + the serialized engine copy + ~1 GiB builder workspace +
  CUDA/TensorRT overhead), i.e. about 3-4 bytes per parameter for fp16, in line with what Jetson users
  report. transformers: the model at the target dtype x 1.5 (serializing touches every page; 1.2x
  measured on SmolLM2-135M) + 0.5 GiB, plus the dequantized fp32 model when the source is a GGUF file.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Tuple

from slm_ros.build.device import GiB, DeviceProfile
from slm_ros.build.spec import BuildError


class ArchitectureUnknown(BuildError):
    """config.json lacks a number the planner needs (the message names the field)."""


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "fp8": 1}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16",
                  "bf16": "bfloat16", "int8": "int8", "fp8": "fp8", "float8": "fp8"}


def normalize_dtype(name: str) -> str:
    """``fp16`` → ``float16`` etc.; ``auto`` and ``""`` stay as they are."""
    name = (name or "").strip().lower().replace("torch.", "")
    return _DTYPE_ALIASES.get(name, name)


def dtype_bytes(name: str) -> int:
    """Bytes per element of a (normalized or aliased) dtype name."""
    norm = normalize_dtype(name)
    try:
        return _DTYPE_BYTES[norm]
    except KeyError:
        raise BuildError(f"unknown dtype {name!r}; known: {', '.join(_DTYPE_BYTES)}") from None


@dataclasses.dataclass(frozen=True)
class Scheme:
    """How a quantization stores linear weights (see the module docstring for the assumptions)."""

    name: str
    #: Bits per linear weight; 0 = the activation dtype (no quantization).
    weight_bits: int
    #: Scale granularity: ``channel`` (one per output row), ``group`` (one per 128 inputs of a row),
    #: ``tensor`` (one per matrix).
    granularity: str = "channel"
    scale_bytes: int = 2
    zero_points: bool = False
    quantizes_lm_head: bool = False
    #: Needs calibration data (and a full fp16 model in memory while calibrating).
    calibration: bool = False
    description: str = ""
    #: Weights per scale for ``group`` granularity.
    group_size: int = 128
    #: Bits of the token embedding (and an lm_head quantized with it); 0 = the activation dtype.
    #: Stored per channel with one scale (and zero point when ``zero_points``), or per group.
    embedding_bits: int = 0


GROUP_SIZE = 128

SCHEMES: Dict[str, Scheme] = {s.name: s for s in (
    Scheme("none", 0, description="weights at the activation dtype"),
    Scheme("w8a16", 8, description="int8 weight-only, per-channel fp16 scales (TensorRT-LLM)"),
    Scheme("w4a16", 4, description="int4 weight-only, per-channel fp16 scales (TensorRT-LLM)"),
    Scheme("w4a16_awq", 4, "group", calibration=True,
           description="int4 AWQ, fp16 scales per group of 128 (TensorRT-LLM / ModelOpt)"),
    Scheme("w4a16_gptq", 4, "group", zero_points=True,
           description="int4 GPTQ, fp16 scale + zero per group of 128 (pre-quantized checkpoint)"),
    Scheme("w8a8", 8, scale_bytes=4, calibration=True,
           description="int8 SmoothQuant weights and activations, fp32 per-channel scales"),
    Scheme("fp8", 8, "tensor", scale_bytes=4, calibration=True,
           description="FP8 weights and activations (SM >= 89; not on Orin)"),
    Scheme("w4a8_awq", 4, "group", calibration=True,
           description="int4 AWQ weights, FP8 activations (SM >= 89; not on Orin)"),
    Scheme("int8_dynamic", 8, "tensor", scale_bytes=8, quantizes_lm_head=True,
           description="PyTorch CPU dynamic int8 on every nn.Linear (lm_head included)"),
)}

#: The onnxruntime_genai and openvino build steps' quantization names -> how they store weights
#: (see the module docstring); ``None`` = weights at the activation dtype.
EDGE_SCHEMES: Dict[str, Dict[str, Optional[Scheme]]] = {
    "onnxruntime_genai": {
        "int4": Scheme("int4", 4, "group", scale_bytes=4, quantizes_lm_head=True, group_size=32,
                       embedding_bits=4, description="int4 weight-only in blocks of 32, one fp32 "
                       "scale each, embedding and lm_head included (ORT GenAI model builder, RTN)"),
        "int8": Scheme("int8", 8, "group", scale_bytes=4, quantizes_lm_head=True, group_size=32,
                       embedding_bits=8, description="int8 weight-only in blocks of 32, one fp32 "
                       "scale each, embedding and lm_head included (ORT GenAI model builder, RTN)"),
        "fp16": None, "bf16": None, "fp32": None, "none": None,
    },
    "openvino": {
        "int4": Scheme("int4", 4, "group", scale_bytes=2, zero_points=True, quantizes_lm_head=True,
                       group_size=64, embedding_bits=8, description="int4 asymmetric in groups of "
                       "64 (fp16 scale + zero point); embedding and lm_head int8 asymmetric per "
                       "channel (NNCF, as the openvino build step asks it)"),
        "int8": Scheme("int8", 8, "channel", scale_bytes=2, zero_points=True,
                       quantizes_lm_head=True, embedding_bits=8, description="int8 asymmetric per "
                       "channel, embedding and lm_head included (NNCF INT8_ASYM)"),
        "fp16": None, "none": None,
    },
}

#: GGUF weight types (the llama_cpp backend's quantization names): bits per weight, block scales
#: included. The k-quant mixes (``_s``/``_m``/``_l``) are averages over a model's tensors.
GGUF_BITS: Dict[str, float] = {
    "f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q6_k": 6.5625, "q5_1": 6.0,
    "q5_k_m": 5.7, "q5_k_s": 5.5, "q5_0": 5.5, "q4_1": 5.0, "q4_k_m": 4.85, "q4_k_s": 4.6,
    "q4_0": 4.5, "q3_k_l": 4.3, "q3_k_m": 3.9, "q3_k_s": 3.5, "q2_k": 2.6,
}
#: ``general.file_type`` values of a GGUF (llama.cpp's ``LLAMA_FTYPE_*``) for those types.
GGUF_FILE_TYPES: Dict[int, str] = {
    0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 8: "q5_0", 9: "q5_1", 10: "q2_k",
    11: "q3_k_s", 12: "q3_k_m", 13: "q3_k_l", 14: "q4_k_s", 15: "q4_k_m", 16: "q5_k_s",
    17: "q5_k_m", 18: "q6_k", 32: "bf16",
}
#: Prompt tokens llama.cpp evaluates in one batch (llama-cpp-python's default ``n_batch``).
GGUF_BATCH = 512

_QUANT_ALIASES = {
    "": "none", "full_prec": "none", "fp16": "none", "bf16": "none", "fp32": "none", "float16": "none",
    "bfloat16": "none", "float32": "none",
    "int8": "w8a16", "int8_wo": "w8a16", "int8_weight_only": "w8a16",
    "int4": "w4a16", "int4_wo": "w4a16", "int4_weight_only": "w4a16",
    "awq": "w4a16_awq", "int4_awq": "w4a16_awq",
    "gptq": "w4a16_gptq", "int4_gptq": "w4a16_gptq",
    "int8_sq": "w8a8", "smoothquant": "w8a8", "w8a8_sq": "w8a8", "int8_smoothquant": "w8a8",
    "w8a8_sq_per_channel_per_token_plugin": "w8a8",
}


def normalize_quantization(name: str) -> str:
    """Canonical scheme name for a quantization string (case-insensitive; TensorRT-LLM spellings such
    as ``W4A16_AWQ``, ``int4_wo`` and ``int8_sq`` are accepted)."""
    key = (name or "").strip().lower().replace("-", "_")
    key = _QUANT_ALIASES.get(key, key)
    if key not in SCHEMES:
        raise BuildError(f"unknown quantization {name!r}; known: {', '.join(SCHEMES)} "
                         f"(aliases: {', '.join(sorted(a for a in _QUANT_ALIASES if a))})")
    return key


# MLPs with two matrices (up, down) instead of three (gate, up, down).
_UNGATED_MLP = {"gpt2", "gpt_neox", "gptj", "gpt_bigcode", "phi", "falcon", "opt", "bloom",
                "starcoder2", "mpt", "codegen", "bert", "gpt_neo"}
# Attention with q/k/v biases although config.json does not say attention_bias.
_QKV_BIAS = {"qwen2", "qwen2_vl", "qwen2_5_vl"}


def _first(config: Mapping[str, Any], names: Tuple[str, ...]) -> Any:
    for name in names:
        value = config.get(name)
        if value is not None:
            return value
    return None


@dataclasses.dataclass(frozen=True)
class ModelArch:
    """The architecture numbers of a decoder-only transformer, from its config.json."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    gated_mlp: bool = True
    qkv_bias: bool = False
    max_position_embeddings: int = 0
    #: The dtype the checkpoint stores (``torch_dtype``/``dtype`` field); ``""`` when not stated.
    checkpoint_dtype: str = ""

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str = "config.json") -> "ModelArch":
        """Read the numbers from a config.json dict (vision-language configs: their ``text_config``;
        the vision tower is not counted). Raises :class:`ArchitectureUnknown` naming a missing field."""
        if not isinstance(config, Mapping):
            raise ArchitectureUnknown(f"{source}: expected a JSON object, got {type(config).__name__}")
        if "text_config" in config and _first(config, ("hidden_size", "n_embd", "d_model")) is None:
            text = dict(config["text_config"] or {})
            text.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", False))
            return cls.from_config(text, f"{source} text_config")
        model_type = str(config.get("model_type", "") or "")

        def need(names: Tuple[str, ...]) -> int:
            value = _first(config, names)
            if value is None:
                raise ArchitectureUnknown(
                    f"{source} has no {names[0]} (model_type {model_type or '?'}): cannot plan memory")
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ArchitectureUnknown(f"{source}: {names[0]} must be a positive integer, "
                                          f"got {value!r}")
            return value

        hidden = need(("hidden_size", "n_embd", "d_model"))
        layers = need(("num_hidden_layers", "n_layer", "num_layers"))
        heads = need(("num_attention_heads", "n_head", "num_heads"))
        kv_heads = _first(config, ("num_key_value_heads", "num_kv_heads", "multi_query_group_num"))
        if config.get("multi_query") is True and kv_heads is None:
            kv_heads = 1
        head_dim = _first(config, ("head_dim",)) or hidden // heads
        intermediate = _first(config, ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size"))
        gated = model_type not in _UNGATED_MLP
        if intermediate is None:
            if gated:
                need(("intermediate_size",))
            intermediate = 4 * hidden  # GPT-2 style configs leave n_inner null
        dtype = str(_first(config, ("torch_dtype", "dtype")) or "")
        return cls(
            model_type=model_type, hidden_size=hidden, num_layers=layers, num_heads=heads,
            num_kv_heads=int(kv_heads or heads), head_dim=int(head_dim),
            intermediate_size=int(intermediate), vocab_size=need(("vocab_size", "padded_vocab_size")),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)), gated_mlp=gated,
            qkv_bias=bool(config.get("attention_bias", False)) or model_type in _QKV_BIAS,
            max_position_embeddings=int(_first(config, ("max_position_embeddings", "n_positions",
                                                        "max_seq_len")) or 0),
            checkpoint_dtype=normalize_dtype(dtype) if dtype else "")

    def linear_shapes(self) -> List[Tuple[int, int]]:
        """``(in_features, out_features)`` of the weight matrices of one decoder layer."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        shapes = [(h, q), (h, kv), (h, kv), (q, h)]
        if self.gated_mlp:
            shapes += [(h, self.intermediate_size), (h, self.intermediate_size),
                       (self.intermediate_size, h)]
        else:
            shapes += [(h, self.intermediate_size), (self.intermediate_size, h)]
        return shapes

    def kv_cache_bytes(self, tokens: int, element_bytes: int) -> int:
        """Keys and values of every layer for ``tokens`` positions."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * tokens * element_bytes

    @property
    def activation_width(self) -> int:
        """Values one token holds in a layer's context phase: residual, normed input, q/k/v, gate
        and up projections (see the module docstring)."""
        return 2 * self.hidden_size + (self.num_heads + 2 * self.num_kv_heads) * self.head_dim + \
            2 * self.intermediate_size

    @property
    def linear_parameters(self) -> int:
        """Weights of all decoder-layer matrices (what weight quantization shrinks)."""
        return self.num_layers * sum(i * o for i, o in self.linear_shapes())

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def other_parameters(self) -> int:
        """Norm weights (two per layer plus the final one) and q/k/v biases."""
        per_layer = 2 * self.hidden_size
        if self.qkv_bias:
            per_layer += (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        return self.num_layers * per_layer + self.hidden_size

    @property
    def parameters(self) -> int:
        """Parameter count, a tied lm_head counted once."""
        lm_head = 0 if self.tie_word_embeddings else self.embedding_parameters
        return self.linear_parameters + self.embedding_parameters + lm_head + self.other_parameters


def _matrix_bytes(in_f: int, out_f: int, scheme: Scheme, act_bytes: int) -> int:
    if scheme.weight_bits == 0:
        return in_f * out_f * act_bytes
    data = in_f * out_f * scheme.weight_bits // 8
    if scheme.granularity == "group":
        scales = out_f * -(-in_f // scheme.group_size)
    elif scheme.granularity == "channel":
        scales = out_f
    else:
        scales = 1
    per_scale = scheme.scale_bytes * (2 if scheme.zero_points else 1)
    return data + scales * per_scale


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Estimated memory of one build at run time and while building, against a device profile."""

    name: str
    backend: str
    quantization: str
    dtype: str
    kv_cache_dtype: str
    max_input_len: int
    max_seq_len: int
    max_batch_size: int
    parameters: int
    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    runtime_overhead_bytes: int
    device: DeviceProfile
    build_peak_bytes: int
    assumptions: Tuple[str, ...] = ()
    #: Cheaper quantizations of the same backend that would fit, as (scheme, total bytes).
    alternatives: Tuple[Tuple[str, int], ...] = ()

    @property
    def total_bytes(self) -> int:
        """Everything the model process needs at run time (the reserve excluded)."""
        return self.weights_bytes + self.kv_cache_bytes + self.activation_bytes + \
            self.runtime_overhead_bytes

    @property
    def available_bytes(self) -> int:
        """What the device leaves to the model: total minus the OS/ROS reserve."""
        return self.device.available_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.available_bytes

    @property
    def build_fits(self) -> bool:
        """Whether building on this device is expected to stay within its memory."""
        return self.build_peak_bytes <= self.available_bytes

    def _terms(self) -> str:
        return (f"weights {_gib(self.weights_bytes)} + KV cache {_gib(self.kv_cache_bytes)} "
                f"({self.max_batch_size} x {self.max_seq_len} tokens, {self.kv_cache_dtype}) + "
                f"activations {_gib(self.activation_bytes)} + runtime "
                f"{_gib(self.runtime_overhead_bytes)}")

    def _device(self) -> str:
        return (f"{self.device.name} has {_gib(self.available_bytes)} available "
                f"({_gib(self.device.total_bytes)} total - {_gib(self.device.reserve_bytes)} "
                f"reserved for the OS and ROS)" if self.device.shared else
                f"{self.device.name} has {_gib(self.available_bytes)} available "
                f"({_gib(self.device.total_bytes)} GPU memory - {_gib(self.device.reserve_bytes)} "
                f"reserve)")

    def summary(self) -> str:
        """One paragraph for logs: what was assumed, each term, and the verdicts."""
        verdict = "fits" if self.fits else "does NOT fit"
        build = "fits" if self.build_fits else "does NOT fit"
        return (f"{self.name or 'model'} ({self.parameters / 1e9:.2f} B params, {self.backend}, "
                f"quantization {self.quantization}, {self.dtype}): needs {_gib(self.total_bytes)} = "
                f"{self._terms()}; {self._device()}: {verdict}. Build peak ~"
                f"{_gib(self.build_peak_bytes)}: {build} on this device.")

    def check(self, build: bool = False) -> None:
        """Raise :class:`BuildError` with the numbers when the model will not fit at run time (and,
        with ``build=True``, when building it here would exceed the device's memory)."""
        if not self.fits:
            hint = "; ".join(f"quantization {q} would need ~{_gib(b)}" for q, b in self.alternatives)
            raise BuildError(
                f"{self.name or 'model'} does not fit: quantization {self.quantization} "
                f"({self.dtype}) needs {_gib(self.total_bytes)} ({self._terms()}) but "
                f"{self._device()}. Lower max_seq_len/max_batch_size"
                + (f", or {hint}" if hint else ", or choose a smaller model") + ".")
        if build and not self.build_fits:
            raise BuildError(
                f"building {self.name or 'model'} with quantization {self.quantization} peaks at "
                f"~{_gib(self.build_peak_bytes)} but {self._device()}. Build on a larger machine with "
                f"the same JetPack/TensorRT/GPU (e.g. an AGX Orin for an Orin Nano) and copy the "
                f"cache directory, add swap, or choose a weight-only quantization that needs no "
                f"calibration.")

    def as_dict(self) -> Dict[str, Any]:
        """JSON-friendly form for the manifest."""
        return {
            "parameters": self.parameters, "weights_bytes": self.weights_bytes,
            "kv_cache_bytes": self.kv_cache_bytes, "activation_bytes": self.activation_bytes,
            "runtime_overhead_bytes": self.runtime_overhead_bytes, "total_bytes": self.total_bytes,
            "available_bytes": self.available_bytes, "fits": self.fits,
            "build_peak_bytes": self.build_peak_bytes, "build_fits": self.build_fits,
            "device": dataclasses.asdict(self.device), "dtype": self.dtype,
            "kv_cache_dtype": self.kv_cache_dtype, "quantization": self.quantization,
        }


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


#: Runtime overhead per process (see the module docstring).
GPU_RUNTIME_OVERHEAD = 1 * GiB
CPU_RUNTIME_OVERHEAD = GiB // 2
#: Extra working memory while building: TensorRT builder workspace; calibration activations.
BUILDER_WORKSPACE = 1 * GiB
CALIBRATION_WORKSPACE = 1 * GiB

#: Cheaper schemes to suggest when a plan does not fit, per backend.
_CHEAPER = {"tensorrt_llm": ("w8a16", "w4a16"), "transformers": ("int8_dynamic",),
            "llama_cpp": ("q8_0", "q4_0"), "onnxruntime_genai": ("int8", "int4"),
            "openvino": ("int8", "int4")}


def weights_bytes(arch: ModelArch, scheme: Scheme, act_bytes: int, backend: str) -> int:
    """Bytes of all weights under ``scheme`` (see the module docstring for what stays unquantized)."""
    linear = arch.num_layers * sum(_matrix_bytes(i, o, scheme, act_bytes)
                                   for i, o in arch.linear_shapes())
    embedding = arch.embedding_parameters * act_bytes
    if scheme.embedding_bits:
        same = scheme.embedding_bits == scheme.weight_bits   # else: an int8 per-channel "backup"
        table = dataclasses.replace(scheme, weight_bits=scheme.embedding_bits,
                                    granularity=scheme.granularity if same else "channel",
                                    zero_points=scheme.zero_points if same else True)
        embedding = _matrix_bytes(arch.hidden_size, arch.vocab_size, table, act_bytes)
        if arch.tie_word_embeddings:   # one quantized table serves both
            return linear + embedding + arch.other_parameters * act_bytes
        return linear + 2 * embedding + arch.other_parameters * act_bytes
    if scheme.quantizes_lm_head:
        lm_head = _matrix_bytes(arch.hidden_size, arch.vocab_size, scheme, act_bytes)
    elif arch.tie_word_embeddings and backend != "tensorrt_llm":
        lm_head = 0  # shares the embedding tensor
    else:
        lm_head = arch.embedding_parameters * act_bytes
    return linear + embedding + lm_head + arch.other_parameters * act_bytes


def plan_memory(config: Mapping[str, Any], device: DeviceProfile, *, backend: str = "tensorrt_llm",
                quantization: str = "none", dtype: str = "auto", kv_cache_dtype: str = "auto",
                max_input_len: int = 2048, max_seq_len: int = 4096, max_batch_size: int = 1,
                on_gpu: Optional[bool] = None, source_dtype: str = "", name: str = "",
                _suggest: bool = True) -> MemoryPlan:
    """Estimate run-time and build-time memory of a model from its config.json dict.

    ``dtype`` is the activation dtype; ``auto`` means float16 for TensorRT-LLM and float32 for the
    transformers backend (its CPU choice without native bf16 -- pass the resolved dtype when known).
    ``on_gpu`` defaults to True for TensorRT-LLM, False otherwise. ``source_dtype`` is what the
    checkpoint stores (default: its config's ``torch_dtype``, else float32; ``gguf`` for GGUF files).
    """
    arch = ModelArch.from_config(config)
    if backend == "llama_cpp":
        return _plan_gguf(arch, config, device, quantization, max_seq_len, max_batch_size,
                          max_input_len, name, _suggest)
    if on_gpu is None:
        on_gpu = backend == "tensorrt_llm"
    act = normalize_dtype(dtype)
    if backend in EDGE_SCHEMES:
        scheme, act = _edge_scheme(backend, quantization, act, on_gpu)
    else:
        scheme = SCHEMES[normalize_quantization(quantization)]
    if act in ("", "auto"):
        act = "float16" if on_gpu else "float32"
    if scheme.name == "int8_dynamic":
        act = "float32"  # PyTorch dynamic quantization works on float32 modules only
    act_bytes = dtype_bytes(act)
    kv = normalize_dtype(kv_cache_dtype)
    kv = act if kv in ("", "auto") else kv
    kv_bytes = dtype_bytes(kv)

    weights = weights_bytes(arch, scheme, act_bytes, backend)
    kv_cache = arch.kv_cache_bytes(max_seq_len * max_batch_size, kv_bytes)
    activations = max_batch_size * max_input_len * arch.activation_width * act_bytes + \
        max_batch_size * arch.vocab_size * 4
    overhead = GPU_RUNTIME_OVERHEAD if on_gpu else CPU_RUNTIME_OVERHEAD

    # Build peak (see the module docstring).
    src = normalize_dtype(source_dtype or arch.checkpoint_dtype or "float32")
    if backend == "tensorrt_llm":
        source_bytes = arch.parameters * (4 if src == "gguf" else dtype_bytes(src))
        convert = source_bytes + weights + CPU_RUNTIME_OVERHEAD
        if scheme.calibration:
            convert += arch.parameters * 2 + CALIBRATION_WORKSPACE + GPU_RUNTIME_OVERHEAD
        engine = 2 * weights + max(BUILDER_WORKSPACE, activations) + GPU_RUNTIME_OVERHEAD
        build_peak = max(convert, engine)
    elif backend in EDGE_SCHEMES:   # export from the float32 Hugging Face model (measured 3.3x)
        build_peak = arch.parameters * 4 * 33 // 10 + CPU_RUNTIME_OVERHEAD
    else:
        target = weights_bytes(arch, SCHEMES["none"], act_bytes, backend)
        build_peak = target * 3 // 2 + CPU_RUNTIME_OVERHEAD
        if src == "gguf":
            build_peak += arch.parameters * 4

    embeddings = (f"embeddings at int{scheme.embedding_bits}" if scheme.embedding_bits else
                  "embeddings at " + act)
    assumptions = (
        f"linear weights: {scheme.description}",
        embeddings + ("; lm_head quantized" if scheme.quantizes_lm_head else
                                  "; lm_head at " + act +
                                  ("" if not arch.tie_word_embeddings else
                                   " (a second copy of the tied embedding)" if backend ==
                                   "tensorrt_llm" else " (tied: shared)")),
        f"KV cache {kv}, fused attention (no seq x seq scores)",
        f"runtime overhead {_gib(overhead)} ({'GPU' if on_gpu else 'CPU'} process)",
    )
    plan = MemoryPlan(
        name=name, backend=backend, quantization=scheme.name, dtype=act, kv_cache_dtype=kv,
        max_input_len=max_input_len, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
        parameters=arch.parameters, weights_bytes=weights, kv_cache_bytes=kv_cache,
        activation_bytes=activations, runtime_overhead_bytes=overhead, device=device,
        build_peak_bytes=build_peak, assumptions=assumptions)
    if _suggest and not plan.fits:
        options = []
        for cheaper in _CHEAPER.get(backend, ()):
            if cheaper == scheme.name:
                continue
            alt = plan_memory(config, device, backend=backend, quantization=cheaper, dtype=dtype,
                              kv_cache_dtype=kv_cache_dtype, max_input_len=max_input_len,
                              max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                              on_gpu=on_gpu, source_dtype=source_dtype, name=name, _suggest=False)
            if alt.fits and alt.total_bytes < plan.total_bytes:
                options.append((cheaper, alt.total_bytes))
        plan = dataclasses.replace(plan, alternatives=tuple(options))
    return plan


def _edge_scheme(backend: str, quantization: str, act: str, on_gpu: bool) -> Tuple[Scheme, str]:
    """(scheme, activation dtype) of an onnxruntime_genai / openvino quantization name; the float
    names set the activation dtype instead (BuildError lists the valid names)."""
    name = (quantization or "none").strip().lower().replace("-", "_")
    schemes = EDGE_SCHEMES[backend]
    if name not in schemes:
        raise BuildError(f"unknown quantization {quantization!r} for the {backend} backend; "
                         f"known: {', '.join(schemes)}")
    scheme = schemes[name]
    if act not in ("float32", "float16", "bfloat16"):   # auto, or the quantization name as dtype
        act = "auto"
    if scheme is None:
        if name in ("fp16", "bf16", "fp32"):
            act = normalize_dtype(name)
        return SCHEMES["none"], act
    if scheme.name == "int4" and backend == "onnxruntime_genai" and on_gpu:
        scheme = dataclasses.replace(scheme, scale_bytes=2)   # fp16 scales for CUDA
    return scheme, act


def gguf_type(quantization: str, config: Mapping[str, Any]) -> str:
    """The GGUF weight type a llama_cpp quantization stands for: ``none`` = the source file's own
    type (``_gguf_file_type`` of a config read from a GGUF), else f16; BuildError for a name that
    is not a GGUF type."""
    name = (quantization or "none").strip().lower().replace("-", "_")
    if name == "none":
        return str(config.get("_gguf_file_type") or "f16")
    if name not in GGUF_BITS:
        raise BuildError(f"unknown GGUF quantization {quantization!r}; known: none, "
                         f"{', '.join(GGUF_BITS)}")
    return name


def _gguf_embedding_bits(kind: str) -> float:
    return max(GGUF_BITS[kind], GGUF_BITS["q8_0"])


def _gguf_weights(arch: ModelArch, kind: str) -> int:
    """Bytes of a GGUF of ``arch`` at weight type ``kind`` (norms stay float32)."""
    untied = 0 if arch.tie_word_embeddings else arch.embedding_parameters
    return int(arch.linear_parameters * GGUF_BITS[kind] / 8 +
               (arch.embedding_parameters + untied) * _gguf_embedding_bits(kind) / 8 +
               arch.other_parameters * 4)


def _plan_gguf(arch: ModelArch, config: Mapping[str, Any], device: DeviceProfile,
               quantization: str, max_seq_len: int, max_batch_size: int, max_input_len: int,
               name: str, suggest: bool) -> MemoryPlan:
    """plan_memory for the llama_cpp backend (see the module docstring)."""
    kind = gguf_type(quantization, config)
    bits, embedding_bits = GGUF_BITS[kind], _gguf_embedding_bits(kind)
    weights = _gguf_weights(arch, kind)
    kv_cache = arch.kv_cache_bytes(max_seq_len * max_batch_size, 2)
    batch = min(max_input_len, GGUF_BATCH)
    activations = batch * arch.activation_width * 4 + max_batch_size * arch.vocab_size * 4
    source = _gguf_weights(arch, gguf_type("none", config))
    plan = MemoryPlan(
        name=name, backend="llama_cpp", quantization=kind, dtype="float32", kv_cache_dtype="float16",
        max_input_len=batch, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
        parameters=arch.parameters, weights_bytes=weights, kv_cache_bytes=kv_cache,
        activation_bytes=activations, runtime_overhead_bytes=CPU_RUNTIME_OVERHEAD, device=device,
        build_peak_bytes=source + weights + CPU_RUNTIME_OVERHEAD,
        assumptions=(f"GGUF {kind}: {bits:g} bits per weight, the token embedding at "
                     f"{embedding_bits:g}" + ("" if arch.tie_word_embeddings else
                                               " and the output matrix too"),
                     "KV cache float16 (llama.cpp default)",
                     f"activations of one {batch}-token batch at float32",
                     f"runtime overhead {_gib(CPU_RUNTIME_OVERHEAD)} (CPU process)"))
    if suggest and not plan.fits:
        options = []
        for cheaper in _CHEAPER["llama_cpp"]:
            alt = _plan_gguf(arch, config, device, cheaper, max_seq_len, max_batch_size,
                             max_input_len, name, False)
            if cheaper != kind and alt.fits and alt.total_bytes < plan.total_bytes:
                options.append((cheaper, alt.total_bytes))
        plan = dataclasses.replace(plan, alternatives=tuple(options))
    return plan
