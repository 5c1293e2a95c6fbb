"""The only module that touches TensorRT-LLM: which API line is installed, building engines, streaming.

NVIDIA supports TensorRT-LLM on Jetson Orin only on the ``v0.12.0-jetson`` branch; desktop and server
GPUs run 1.x. The two lines differ in module names, argument names and streaming semantics
(``test/data/TENSORRT_LLM_API.md``). This module hides the differences behind plain Python:

* :func:`tensorrt_llm_version`, :func:`api_line_for_version`, :func:`unavailable_reason` - which line is
  installed (``"0.12"`` or ``"1.x"``) or, in one line, why TensorRT-LLM cannot be used here.
* :func:`device_facts` - GPU name, compute capability (SM), Jetson L4T release.
* :data:`QUANTIZATIONS`, :func:`resolve_quantization` - the quantizations slm_ros builds.
* :func:`build_engine` - quantize, compile with an explicit BuildConfig, save.
* :func:`copy_tokenizer_files`, :func:`find_engine_dir`, :func:`read_engine_config` - engine directory
  layout.
* :class:`TrtLlmRuntime` - a loaded engine that streams token ids, optionally constrained: 1.x through
  its own guided decoding (xgrammar, :data:`GUIDE_KINDS`), 0.12 through logits post-processors that
  apply slm_ros's grammar mask (:class:`LogitsSlots`).

Convention, enforced by ``test/test_trtllm_api_surface.py`` against the recorded API surface
(``test/data/tensorrt_llm_api.json``):

1. ``tensorrt_llm`` is never imported at module level (this module must import without it). The package
   itself is imported only by :func:`_import_tensorrt_llm`, which reads ``__version__``. Every other use
   lives in the methods of :class:`_Api012` (checked against the 0.12.0-jetson record) or :class:`_Api1x`
   (checked against the 1.x record), through ``from tensorrt_llm.<module> import <Name>`` statements.
2. Inside those two classes, TensorRT-LLM objects are held in variables named for what they are:
   ``llm`` (the LLM), ``request`` (a RequestOutput), ``completion`` (a CompletionOutput), ``engine``
   (a ``tensorrt_llm.builder.Engine``), ``model`` (an ``<Arch>ForCausalLM`` instance) and ``arch``
   (an ``<Arch>ForCausalLM`` class). The only other attribute receivers there are ``self`` and ``job``
   (this module's own request dataclasses).
3. Every keyword is spelled out: no ``**kwargs`` or ``*args`` into TensorRT-LLM, so each can be checked.
4. Code outside the two classes may pass TensorRT-LLM objects around but never reads their attributes.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from slm_ros.build import device as _device
from slm_ros.core.errors import BackendUnavailable, ConfigError, ModelLoadError, RequestError

API_012 = "0.12"
API_1X = "1.x"

#: Why 0.5 and not TensorRT-LLM's 0.9: on Jetson the GPU allocates from the same memory as the CPU, so
#: "free GPU memory" is nearly all of the board's RAM; 0.9 of it starves ROS, the camera driver and the
#: OS (reported as engines that load and then the board swaps or reboots). Half leaves room for them
#: while still giving a small model thousands of tokens of KV cache.
DEFAULT_KV_CACHE_FRACTION = 0.5

_INSTALL_HINT = ("on Jetson Orin use JetPack 6.1 with the v0.12.0-jetson wheel (e.g. the "
                 "dustynv/tensorrt_llm:0.12-r36.4.0 container); on x86 GPUs pip install tensorrt_llm")


# -- which TensorRT-LLM is installed ---------------------------------------------------------------


def api_line_for_version(version: str) -> str:
    """``"0.12"`` for 0.12.x, ``"1.x"`` for 1.0 and later; other versions raise BackendUnavailable."""
    match = re.match(r"\s*(\d+)\.(\d+)", version or "")
    if not match:
        raise BackendUnavailable(f"cannot tell the TensorRT-LLM API line from version {version!r} "
                                 f"(slm_ros drives the 0.12 and 1.x lines)")
    major, minor = int(match.group(1)), int(match.group(2))
    if major == 0 and minor == 12:
        return API_012
    if major >= 1:
        return API_1X
    raise BackendUnavailable(
        f"TensorRT-LLM {version} is not supported: slm_ros drives the 0.12 line (v0.12.0-jetson, the "
        f"only one NVIDIA supports on Jetson Orin) and 1.x")


def _block_pynvml_on_tegra() -> None:
    """Make ``import pynvml`` fail inside TensorRT-LLM on Jetson.

    The Jetson branch's ``tensorrt_llm/profiler.py`` initialises NVML at import when pynvml is
    installed; Tegra has no full NVML, so the import either fails or leaves a function undefined that
    later raises NameError. With pynvml hidden the profiler takes its "not installed" path and only
    stops reporting device memory. Only done on Jetson, and only if nothing imported pynvml yet.
    """
    if "pynvml" not in sys.modules:
        sys.modules["pynvml"] = None  # type: ignore[assignment]  # None = "import fails" to Python


def _import_tensorrt_llm():
    """Import the ``tensorrt_llm`` package or raise BackendUnavailable saying why."""
    if "tensorrt_llm" not in sys.modules and _device.is_jetson():
        _block_pynvml_on_tegra()
    try:
        import tensorrt_llm
    except (ImportError, OSError, RuntimeError) as exc:
        raise BackendUnavailable(
            f"TensorRT-LLM is not usable here (import tensorrt_llm failed: {exc}); "
            f"{_INSTALL_HINT}") from exc
    return tensorrt_llm


def tensorrt_llm_version() -> str:
    """The installed TensorRT-LLM version (imports it; raises BackendUnavailable when missing)."""
    tensorrt_llm = _import_tensorrt_llm()
    return str(tensorrt_llm.__version__)


def installed_api_line() -> str:
    """The API line of the installed TensorRT-LLM (raises BackendUnavailable when unusable)."""
    return api_line_for_version(tensorrt_llm_version())


def unavailable_reason() -> str:
    """Why TensorRT-LLM cannot be used here in one line, or ``""`` when it can."""
    try:
        installed_api_line()
    except BackendUnavailable as exc:
        return str(exc)
    return ""


# -- the device -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DeviceFacts:
    """The GPU an engine is built for or runs on. ``sm`` is major*10+minor (87 on Orin), None when
    no CUDA GPU is visible."""

    gpu: str = ""
    sm: Optional[int] = None
    cuda: str = ""
    l4t: str = ""
    board: str = ""

    @property
    def sm_text(self) -> str:
        """``8.7`` style, or ``none``."""
        return "none" if self.sm is None else f"{self.sm // 10}.{self.sm % 10}"


def cuda_index(device: str) -> int:
    """GPU index of ``auto``/``cuda``/``cuda:N``; ConfigError for anything else (TensorRT-LLM needs
    a GPU)."""
    device = (device or "auto").strip().lower()
    if device in ("auto", "cuda"):
        return 0
    match = re.fullmatch(r"cuda:(\d+)", device)
    if not match:
        raise ConfigError(f"device must be auto, cuda or cuda:N for TensorRT-LLM (it needs an NVIDIA "
                          f"GPU), got {device!r}")
    return int(match.group(1))


def device_facts(device: str = "auto") -> DeviceFacts:
    """Facts about the CUDA GPU ``device`` names, as PyTorch sees it (compute capability from
    ``torch.cuda``), plus the Jetson L4T release from /etc/nv_tegra_release."""
    gpu = _device.cuda_device(cuda_index(device))
    sm = None
    if gpu.get("sm"):
        major, _, minor = gpu["sm"].partition(".")
        sm = int(major) * 10 + int(minor or 0)
    return DeviceFacts(gpu=gpu.get("gpu", ""), sm=sm, cuda=gpu.get("cuda", ""),
                       l4t=_device.l4t_release(), board=_device.board_model())


# -- quantizations and architectures ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Quantization:
    """One way slm_ros builds an engine. ``quant_algo`` is a ``QuantAlgo`` member name (None = no
    quantization); ``dtype`` forces the activation dtype; ``min_sm`` is the lowest compute capability
    (major*10+minor) whose kernels TensorRT-LLM has for it."""

    name: str
    quant_algo: Optional[str]
    description: str
    dtype: Optional[str] = None
    min_sm: int = 0
    needs_calibration: bool = False
    smoothquant_val: Optional[float] = None
    group_size: int = 128


#: Orin (SM 8.7, Ampere) has kernels for everything here except fp8 and w4a8_awq, which need Ada
#: (8.9) or Hopper; those two stay listed so that a build asking for them gets that reason.
QUANTIZATIONS: Dict[str, Quantization] = {q.name: q for q in (
    Quantization("none", None, "no quantization; weights in the build dtype (auto: the checkpoint's)"),
    Quantization("fp16", None, "no quantization, float16", dtype="float16"),
    Quantization("bf16", None, "no quantization, bfloat16 (SM >= 8.0)", dtype="bfloat16", min_sm=80),
    Quantization("w8a16", "W8A16", "int8 weight-only"),
    Quantization("w4a16", "W4A16", "int4 weight-only (per channel)"),
    Quantization("w4a16_awq", "W4A16_AWQ", "int4 weights, AWQ-calibrated, group size 128",
                 needs_calibration=True),
    Quantization("w8a8_sq", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
                 "int8 weights and activations, SmoothQuant (alpha 0.5), per channel + per token",
                 needs_calibration=True, smoothquant_val=0.5),
    Quantization("fp8", "FP8", "fp8 weights and activations", min_sm=89, needs_calibration=True),
    Quantization("w4a8_awq", "W4A8_AWQ", "int4 weights, fp8 activations, AWQ", min_sm=89,
                 needs_calibration=True),
)}

#: Other spellings users bring from trtllm-build / quantize.py (``--qformat``) and dtype names.
QUANTIZATION_ALIASES: Dict[str, str] = {
    "full_prec": "none", "float16": "fp16", "bfloat16": "bf16", "int8_wo": "w8a16",
    "int4_wo": "w4a16", "int4_awq": "w4a16_awq", "awq": "w4a16_awq", "int8_sq": "w8a8_sq",
    "smoothquant": "w8a8_sq",
}


def resolve_quantization(name: str) -> Quantization:
    """The :class:`Quantization` called ``name`` (or an alias); ConfigError listing the known ones."""
    key = (name or "none").strip().lower().replace("-", "_")
    key = QUANTIZATION_ALIASES.get(key, key)
    try:
        return QUANTIZATIONS[key]
    except KeyError:
        known = ", ".join(f"{q.name} ({q.description})" for q in QUANTIZATIONS.values())
        raise ConfigError(f"unknown quantization {name!r} for tensorrt_llm; known: {known}") from None


#: Hugging Face ``architectures[0]`` -> the TensorRT-LLM 0.12 model class that converts it (from
#: ``tensorrt_llm.models``; the 1.x LLM API picks the class itself).
TRT_ARCHITECTURES: Dict[str, str] = {
    "LlamaForCausalLM": "LLaMAForCausalLM",
    "MistralForCausalLM": "LLaMAForCausalLM",
    "Qwen2ForCausalLM": "QWenForCausalLM",
    "Phi3ForCausalLM": "Phi3ForCausalLM",
    "PhiForCausalLM": "PhiForCausalLM",
    "GemmaForCausalLM": "GemmaForCausalLM",
}


# -- engine directory layout ------------------------------------------------------------------------

#: Files copied from the checkpoint beside the engine. ``LLM.save()`` copies only ``tokenizer*``; the
#: backend also needs the special tokens, the generation config (end-of-sequence ids) and the chat
#: template. Never ``config.json``: that name is the engine's own config.
TOKENIZER_FILES: Tuple[str, ...] = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "generation_config.json",
    "chat_template.jinja", "chat_template.json", "vocab.json", "vocab.txt", "merges.txt",
    "*.tiktoken",
)


def copy_tokenizer_files(checkpoint_dir: str, engine_dir: str) -> List[str]:
    """Copy the tokenizer, special-token map, generation config and chat template from a Hugging Face
    checkpoint into an engine directory; return the names copied (sorted)."""
    src, dst = Path(checkpoint_dir), Path(engine_dir)
    copied = set()
    for pattern in TOKENIZER_FILES:
        for path in src.glob(pattern):
            if path.is_file() and path.name != "config.json":
                shutil.copy2(path, dst / path.name)
                copied.add(path.name)
    return sorted(copied)


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    """What an engine directory's ``config.json`` says about the engine."""

    path: str
    version: str
    architecture: str
    dtype: str
    quant_algo: str
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    vocab_size: int = 0


def read_engine_config(engine_dir: str) -> EngineInfo:
    """Parse ``<engine_dir>/config.json`` (written by ``Engine.save``/``LLM.save``); ModelLoadError
    naming the file when it is missing or not an engine config."""
    path = Path(engine_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read TensorRT-LLM engine config {path}: {exc}") from exc
    pretrained, build = config.get("pretrained_config"), config.get("build_config")
    if not isinstance(pretrained, dict) or not isinstance(build, dict):
        hint = (" (it is a Hugging Face checkpoint: build an engine from it with the engine builder, "
                "backend tensorrt_llm)") if "model_type" in config or "architectures" in config else ""
        raise ModelLoadError(f"{path} is not a TensorRT-LLM engine config: no pretrained_config / "
                             f"build_config{hint}")
    quant = pretrained.get("quantization") or {}
    return EngineInfo(
        path=str(Path(engine_dir)), version=str(config.get("version", "")),
        architecture=str(pretrained.get("architecture", "")), dtype=str(pretrained.get("dtype", "")),
        quant_algo=str(quant.get("quant_algo") or "none"),
        max_batch_size=int(build.get("max_batch_size") or 1),
        max_input_len=int(build.get("max_input_len") or 0),
        max_seq_len=int(build.get("max_seq_len") or 0),
        max_num_tokens=int(build.get("max_num_tokens") or 0),
        vocab_size=int(pretrained.get("vocab_size") or 0))


def find_engine_dir(path: str) -> str:
    """The engine directory at ``path`` (an engine dir or the engine builder's artifact dir, which
    are the same: the build step writes the engine at the artifact's top level)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ModelLoadError(f"TensorRT-LLM engine directory {path!r} does not exist")
    info = read_engine_config(str(root))
    if not any(root.glob("rank*.engine")):
        raise ModelLoadError(f"{root} has an engine config but no rank0.engine: incomplete engine")
    if info.max_seq_len < 1:
        raise ModelLoadError(f"{root}/config.json has no build_config.max_seq_len")
    return str(root)


# -- requests the per-line classes execute ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StreamJob:
    """One generation, fully resolved. ``None`` sampling fields are left to the library's default;
    ``emit`` receives each new token id; ``should_stop`` is polled after every step."""

    prompt_ids: Tuple[int, ...]
    max_new_tokens: int
    end_id: int
    pad_id: int
    emit: Callable[[int], None]
    should_stop: Callable[[], bool]
    stop_token_ids: Optional[List[int]] = None
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    seed: Optional[int] = None
    #: Constrained output on 1.x: (kind, text), kind one of :data:`GUIDE_KINDS`; TensorRT-LLM's
    #: guided decoding enforces it.
    guide: Optional[Tuple[str, str]] = None
    #: Constrained output on 0.12: called before every step with the tokens so far (TensorRT-LLM's
    #: ``ids`` of the first beam), returns the boolean numpy array of allowed token ids (the mask is
    #: applied to the logits here). Runs on TensorRT-LLM's thread: it must not raise.
    allowed_tokens: Optional[Callable[[Sequence[int]], Any]] = None
    #: Set by :class:`TrtLlmRuntime` on 0.12: the logits post-processor (slot) the request uses.
    processor_name: Optional[str] = None


#: The guides of TensorRT-LLM 1.x's ``GuidedDecodingParams`` that slm_ros sends (``structural_tag``
#: is never sent: the engine path's decoder has no branch for it).
GUIDE_KINDS = ("json", "json_object", "regex", "grammar")


@dataclasses.dataclass(frozen=True)
class StreamEnd:
    """How a stream ended. ``finish_reason`` is TensorRT-LLM's (1.x: stop, length, timeout,
    cancelled; 0.12 reports none); ``stopped_early`` means we stopped reading because
    ``should_stop`` said so; ``aborted`` means the library was told to stop generating (1.x only)."""

    finish_reason: Optional[str]
    stopped_early: bool
    produced: int
    aborted: bool = False
    #: 0.12, stopped early: the request's results, still running on to ``max_new_tokens``
    #: (:func:`_drain` reads them to the end).
    running: Any = None


@dataclasses.dataclass(frozen=True)
class EngineBuildJob:
    """One engine build, fully resolved by the build step. ``phase(name, fraction)`` is called before
    each phase and raises to cancel. ``calib_dir`` is a local dataset directory (``train`` split,
    ``text`` column) or empty for quantizations without calibration."""

    hf_dir: str
    out_dir: str
    checkpoint_dir: str
    trt_architecture: str
    quant_algo: Optional[str]
    dtype: str
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    phase: Callable[[str, float], None]
    group_size: int = 128
    smoothquant_val: Optional[float] = None
    calib_dir: str = ""
    kv_cache_fraction: float = 0.1


# -- per API line: the only code that calls TensorRT-LLM ---------------------------------------------


class _Api012:
    """TensorRT-LLM 0.12.0-jetson: ``tensorrt_llm.hlapi`` LLM API to run, ``Arch.from_hugging_face`` /
    ``Arch.quantize`` + ``tensorrt_llm.builder.build`` to build."""

    line = API_012

    def load_llm(self, engine_dir: str, kv_cache_fraction: float,
                 processors: Dict[str, Callable]) -> Any:
        """Open an engine directory (no build: the directory already holds the engine), with the
        logits post-processors constrained requests select by name (0.12 has no guided decoding)."""
        from tensorrt_llm.hlapi import LLM, KvCacheConfig

        # skip_tokenizer_init: slm_ros tokenizes itself and reads token ids only, so the LLM neither
        # loads a second tokenizer nor detokenizes every step.
        return LLM(model=engine_dir, skip_tokenizer_init=True,
                   kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=kv_cache_fraction),
                   logits_post_processor_map=processors)

    def close_llm(self, llm) -> None:
        """Shut the executor down. 0.12 has no public ``shutdown()``: the context-manager exit is it."""
        llm.__exit__(None, None, None)

    def stream(self, llm, job: StreamJob) -> StreamEnd:
        """Stream one request.

        0.12 semantics: ``token_ids`` is cumulative, so the new ids are the tail past what was already
        emitted (``text_diff`` is not used: it advances on every read). There is no finish reason, and
        ``cancel()`` raises NotImplementedError: a stop request ends the reading, and the request
        itself runs on to ``max_new_tokens``, which the caller bounds.
        """
        from tensorrt_llm.hlapi import SamplingParams

        if job.guide is not None:
            raise RequestError("TensorRT-LLM 0.12 has no guided decoding: constrained requests use "
                               "a logits post-processor (allowed_tokens)")
        sampling_params = SamplingParams(
            max_new_tokens=job.max_new_tokens, end_id=job.end_id, pad_id=job.pad_id,
            stop_token_ids=job.stop_token_ids, temperature=job.temperature, top_k=job.top_k,
            top_p=job.top_p, repetition_penalty=job.repetition_penalty, random_seed=job.seed,
            logits_post_processor_name=job.processor_name)
        produced = 0
        results = llm.generate_async(list(job.prompt_ids), sampling_params=sampling_params,
                                     streaming=True)
        for request in results:
            completion = request.outputs[0]
            token_ids = list(completion.token_ids)
            for token in token_ids[produced:]:
                job.emit(int(token))
            produced = max(produced, len(token_ids))
            if job.should_stop():
                return StreamEnd(None, stopped_early=True, produced=produced, running=results)
        return StreamEnd(None, stopped_early=False, produced=produced)

    def build(self, job: EngineBuildJob) -> Dict[str, Any]:
        """Convert (or calibrate and quantize), compile with an explicit BuildConfig, save."""
        from tensorrt_llm import models
        from tensorrt_llm.builder import BuildConfig, build
        from tensorrt_llm.models.modeling_utils import QuantConfig
        from tensorrt_llm.quantization import QuantAlgo

        algos = {None: None, "W8A16": QuantAlgo.W8A16, "W4A16": QuantAlgo.W4A16,
                 "W4A16_AWQ": QuantAlgo.W4A16_AWQ,
                 "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN": QuantAlgo.W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN,
                 "FP8": QuantAlgo.FP8, "W4A8_AWQ": QuantAlgo.W4A8_AWQ}
        quant_config = QuantConfig(quant_algo=algos[job.quant_algo], group_size=job.group_size,
                                   smoothquant_val=job.smoothquant_val)
        arch = getattr(models, job.trt_architecture)
        if job.calib_dir:
            job.phase("quantize", 0.05)
            # Calibration runs ModelOpt on the GPU. calib_dataset must be a local directory: the
            # default ('cnn_dailymail') is downloaded.
            arch.quantize(job.hf_dir, job.checkpoint_dir, dtype=job.dtype, quant_config=quant_config,
                          device="cuda", calib_dataset=job.calib_dir)
            job.phase("load", 0.4)
            model = arch.from_checkpoint(job.checkpoint_dir)
        else:
            job.phase("load", 0.05)
            model = arch.from_hugging_face(job.hf_dir, dtype=job.dtype, quant_config=quant_config)
        job.phase("compile", 0.45)
        # Explicit limits: 0.12's BuildConfig defaults (batch 8, input 256, seq 512) differ from
        # trtllm-build's, and max_num_tokens bounds the activation memory.
        build_config = BuildConfig(max_batch_size=job.max_batch_size, max_input_len=job.max_input_len,
                                   max_seq_len=job.max_seq_len, max_num_tokens=job.max_num_tokens,
                                   max_beam_width=1)
        engine = build(model, build_config)
        del model  # the converted weights; the engine holds its own copy
        job.phase("save", 0.9)
        engine.save(job.out_dir)
        return {"build_path": "Arch.quantize+from_checkpoint" if job.calib_dir
                else "Arch.from_hugging_face"}


class _Api1x:
    """TensorRT-LLM 1.x: the TensorRT engine LLM (``tensorrt_llm._tensorrt_engine.LLM``; plain
    ``tensorrt_llm.LLM`` is the PyTorch backend) with ``tensorrt_llm.llmapi`` configs."""

    line = API_1X

    def load_llm(self, engine_dir: str, kv_cache_fraction: float,
                 processors: Dict[str, Callable]) -> Any:
        """Open an engine directory with guided decoding (xgrammar, the only guided backend of the
        engine path). xgrammar needs the LLM's tokenizer, so it is loaded (from the tokenizer files
        beside the engine); slm_ros still sends and reads token ids (``detokenize=False``)."""
        from tensorrt_llm._tensorrt_engine import LLM
        from tensorrt_llm.llmapi import KvCacheConfig

        return LLM(model=engine_dir, skip_tokenizer_init=False, guided_decoding_backend="xgrammar",
                   kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=kv_cache_fraction))

    def close_llm(self, llm) -> None:
        """Shut the executor down."""
        llm.shutdown()

    def stream(self, llm, job: StreamJob) -> StreamEnd:
        """Stream one request: ``token_ids_diff`` per step, ``finish_reason`` at the end, and
        ``abort()`` when told to stop, so the GPU stops generating for a cancelled request."""
        from tensorrt_llm.llmapi import GuidedDecodingParams, SamplingParams

        guided = None
        if job.guide is not None:
            kind, text = job.guide
            if kind not in GUIDE_KINDS:
                raise RequestError(f"no TensorRT-LLM guide for {kind!r}")
            # One guide per request (more raises ValueError); json takes the schema text as is.
            guided = GuidedDecodingParams(json=text if kind == "json" else None,
                                          json_object=kind == "json_object",
                                          regex=text if kind == "regex" else None,
                                          grammar=text if kind == "grammar" else None)
        elif job.allowed_tokens is not None:
            raise RequestError("TensorRT-LLM 1.x constrains output through guided decoding (guide)")
        sampling_params = SamplingParams(
            max_tokens=job.max_new_tokens, end_id=job.end_id, pad_id=job.pad_id,
            stop_token_ids=job.stop_token_ids, temperature=job.temperature, top_k=job.top_k,
            top_p=job.top_p, repetition_penalty=job.repetition_penalty, seed=job.seed,
            detokenize=False, guided_decoding=guided)
        produced = 0
        reason = None
        for request in llm.generate_async(list(job.prompt_ids), sampling_params=sampling_params,
                                          streaming=True):
            completion = request.outputs[0]
            for token in completion.token_ids_diff:
                job.emit(int(token))
                produced += 1
            reason = completion.finish_reason or reason
            if reason is None and job.should_stop():
                request.abort()
                return StreamEnd("cancelled", stopped_early=True, produced=produced, aborted=True)
        return StreamEnd(reason, stopped_early=False, produced=produced)

    def build(self, job: EngineBuildJob) -> Dict[str, Any]:
        """Build through the LLM API (it converts, quantizes and compiles), then save."""
        from tensorrt_llm._tensorrt_engine import LLM
        from tensorrt_llm.llmapi import BuildConfig, KvCacheConfig, QuantAlgo, QuantConfig

        if job.calib_dir:
            # The step refuses this earlier; kept so the adapter never silently drops the data.
            raise BackendUnavailable(
                "not supported by this adapter yet: calibrated quantization on TensorRT-LLM 1.x needs "
                "CalibConfig, whose fields are not in the recorded API surface")
        algos = {None: None, "W8A16": QuantAlgo.W8A16, "W4A16": QuantAlgo.W4A16,
                 "W4A16_AWQ": QuantAlgo.W4A16_AWQ,
                 "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN": QuantAlgo.W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN,
                 "FP8": QuantAlgo.FP8, "W4A8_AWQ": QuantAlgo.W4A8_AWQ}
        # >= 0.15 defaults (batch 2048, 8192 tokens) would size buffers for a server: set them all.
        build_config = BuildConfig(max_batch_size=job.max_batch_size, max_input_len=job.max_input_len,
                                   max_seq_len=job.max_seq_len, max_num_tokens=job.max_num_tokens,
                                   max_beam_width=1)
        job.phase("compile", 0.05)
        # The LLM API starts a runtime after building: keep its KV cache small, it is never used.
        llm = LLM(model=job.hf_dir, dtype=job.dtype, skip_tokenizer_init=True,
                  build_config=build_config,
                  quant_config=QuantConfig(quant_algo=algos[job.quant_algo], group_size=job.group_size,
                                           smoothquant_val=job.smoothquant_val),
                  kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=job.kv_cache_fraction))
        try:
            job.phase("save", 0.9)
            llm.save(job.out_dir)
        finally:
            llm.shutdown()
        return {"build_path": "LLM(build_config)+save"}


_API_CLASSES = {API_012: _Api012, API_1X: _Api1x}


def _api_for(line: str) -> Any:
    """The per-line implementation (``_Api012`` or ``_Api1x``) for an API line."""
    return _API_CLASSES[line]()


# -- constrained output on 0.12: logits post-processors ---------------------------------------------


class LogitsSlots:
    """TensorRT-LLM 0.12's logits post-processors for constrained requests.

    0.12 takes a fixed map of named post-processors when the engine is opened, and a request selects
    one by name; the callback learns nothing else about the request (``client_id`` is never set by
    the 0.12 LLM API). So there are :attr:`COUNT` named slots, each lent to one running request at a
    time: its callback asks that request's ``allowed_tokens`` for the mask and applies it to the
    logits in place (on TensorRT-LLM's CUDA stream). A request stopped early runs on in 0.12; its
    slot is *detached* (the callback leaves the logits alone) and lent again once the request ended.
    """

    COUNT = 4
    PREFIX = "slm_ros_constraint_"
    #: How long a constrained request waits for a free slot.
    WAIT_S = 60.0

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._owners: Dict[str, Optional[Tuple[Callable, int]]] = {
            f"{self.PREFIX}{i}": None for i in range(self.COUNT)}
        self._free = list(self._owners)
        self.errors: List[str] = []

    def processors(self) -> Dict[str, Callable]:
        """name -> callback, for ``LLM(logits_post_processor_map=...)``."""
        return {name: self._callback(name) for name in self._owners}

    def acquire(self, allowed_tokens: Callable, end_id: int) -> str:
        with self._cond:
            if not self._cond.wait_for(lambda: self._free, timeout=self.WAIT_S):
                raise RequestError(f"all {self.COUNT} constrained-output slots of TensorRT-LLM 0.12 "
                                   f"stayed busy for {self.WAIT_S:.0f} s")
            name = self._free.pop(0)
            self._owners[name] = (allowed_tokens, end_id)
            return name

    def detach(self, name: str) -> None:
        with self._cond:
            self._owners[name] = None

    def release(self, name: str) -> None:
        with self._cond:
            self._owners[name] = None
            if name not in self._free:
                self._free.append(name)
            self._cond.notify_all()

    def _callback(self, name: str) -> Callable:
        def post_process(req_id, logits, ids, stream_ptr, client_id=None):
            # Arity: the 0.12 stub declares five arguments, 0.11 passed four; both are accepted.
            owner = self._owners.get(name)
            if owner is None:
                return
            allowed_tokens, end_id = owner
            try:
                allowed = allowed_tokens(list(ids[0]) if len(ids) else [])
            except Exception as exc:  # noqa: BLE001 - raising here would fail every active request
                self.errors.append(f"{type(exc).__name__}: {exc}")
                allowed = None
            _mask_logits(logits, allowed, end_id, stream_ptr)
        post_process.__name__ = f"post_process_{name}"
        return post_process


def _mask_logits(logits, allowed, end_id: int, stream_ptr: Optional[int]) -> None:
    """Set the logits of tokens not in ``allowed`` (a boolean numpy array over the vocabulary) to
    -inf, in place; ``allowed`` None (the mask failed) leaves only ``end_id``, ending the request."""
    import numpy as np
    import torch

    if allowed is None:
        allowed = np.zeros(int(logits.shape[-1]), dtype=bool)
        allowed[end_id] = True
    n = min(len(allowed), int(logits.shape[-1]))
    blocked = torch.from_numpy(np.ascontiguousarray(~allowed[:n]))

    def apply() -> None:
        logits[..., :n].masked_fill_(blocked.to(logits.device), float("-inf"))
        if logits.shape[-1] > n:
            logits[..., n:] = float("-inf")

    if stream_ptr:
        with torch.cuda.stream(torch.cuda.ExternalStream(stream_ptr)):
            apply()
    else:
        apply()


def _drain(results, done: Callable[[], None]) -> None:
    """Read a 0.12 request's remaining results to its end, then call ``done``."""
    try:
        for _ in results:
            pass
    except Exception:  # noqa: BLE001 - an error ends the request just as well
        pass
    finally:
        done()


# -- public entry points ----------------------------------------------------------------------------


def build_engine(job: EngineBuildJob) -> Dict[str, Any]:
    """Build an engine into ``job.out_dir`` with the installed TensorRT-LLM; return facts for the
    build manifest. Raises BackendUnavailable when TensorRT-LLM is not usable here."""
    version = tensorrt_llm_version()
    line = api_line_for_version(version)
    facts = _api_for(line).build(job)
    return {"tensorrt_llm": version, "api_line": line, **facts}


class TrtLlmRuntime:
    """A TensorRT-LLM engine loaded for generation, one request at a time."""

    def __init__(self, engine_dir: str, kv_cache_fraction: float = DEFAULT_KV_CACHE_FRACTION) -> None:
        """Load ``engine_dir``. Raises BackendUnavailable (no usable TensorRT-LLM), ConfigError (bad
        fraction) or ModelLoadError (wrong engine version, the library failed to load it)."""
        if not 0.0 < kv_cache_fraction < 1.0:
            raise ConfigError(f"kv_cache_fraction must be in (0, 1), got {kv_cache_fraction!r}")
        info = read_engine_config(engine_dir)
        self.version = tensorrt_llm_version()
        self.api_line = api_line_for_version(self.version)
        if info.version and info.version != self.version:
            # A TensorRT engine only deserializes with the library (and TensorRT) that built it.
            raise ModelLoadError(
                f"engine {engine_dir} was built with TensorRT-LLM {info.version}, this is "
                f"{self.version}: rebuild it (the engine builder does when its cache key changes)")
        self.info = info
        self.kv_cache_fraction = kv_cache_fraction
        self._api = _api_for(self.api_line)
        self._slots = LogitsSlots()
        try:
            self._llm = self._api.load_llm(engine_dir, kv_cache_fraction, self._slots.processors())
        except (RuntimeError, ValueError, OSError, KeyError) as exc:
            raise ModelLoadError(
                f"TensorRT-LLM {self.version} could not load engine {engine_dir}: "
                f"{type(exc).__name__}: {exc}") from exc

    @property
    def constraint_route(self) -> str:
        """How a constrained request must be given: ``"guide"`` (1.x guided decoding) or
        ``"allowed_tokens"`` (0.12 logits post-processor)."""
        return "guide" if self.api_line == API_1X else "allowed_tokens"

    def stream(self, job: StreamJob) -> StreamEnd:
        """Run ``job``, handing each new token id to ``job.emit``; blocks until the stream ends."""
        if self._llm is None:
            raise ModelLoadError("the TensorRT-LLM engine was closed")
        if job.allowed_tokens is None or self.api_line != API_012:
            return self._api.stream(self._llm, job)
        name = self._slots.acquire(job.allowed_tokens, job.end_id)
        end = None
        try:
            end = self._api.stream(self._llm, dataclasses.replace(job, processor_name=name))
            return end
        finally:
            if end is not None and end.running is not None:
                # 0.12 cannot cancel: the request runs on, and keeps calling its post-processor,
                # until max_new_tokens. The slot is reused only after that.
                self._slots.detach(name)
                threading.Thread(target=_drain, args=(end.running, lambda: self._slots.release(name)),
                                 name="slm-trtllm-drain", daemon=True).start()
            else:
                self._slots.release(name)

    @property
    def processor_errors(self) -> List[str]:
        """Errors raised inside 0.12 logits post-processors (caught there: an exception would fail
        every active request), oldest first."""
        return self._slots.errors

    def close(self) -> None:
        """Shut the executor down and release the engine (idempotent)."""
        llm, self._llm = self._llm, None
        if llm is not None:
            self._api.close_llm(llm)
