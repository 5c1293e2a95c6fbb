"""PyTorch / transformers backend for vision-language models (image + text in, text out).

Any local checkpoint that ``AutoModelForImageTextToText`` knows: SmolVLM / Idefics3, LLaVA,
Qwen2-VL, PaliGemma, ... The model's own processor turns the conversation and the images into token
ids (image placeholders expanded to the number of image tokens) and pixel tensors;
:meth:`TransformersVlmBackend.apply_chat_template` returns them as a
:class:`~slm_ros.backends.base.Prompt`, and :meth:`TransformersVlmBackend.generate` streams new
tokens from ``model.generate`` on a worker thread exactly as the text backend does (same streamer,
same cancel: within one module call during the prompt's forward pass, vision tower included, then
within one token; see :mod:`slm_ros.backends.transformers_backend`).

Conversations in the engine are plain ``{"role", "content": str}`` messages; they are rewritten into
the content-parts form multimodal chat templates expect (``[{"type": "image"}, {"type": "text",
"text": ...}]``), with the images placed in the last user message. Questions without an image work
too (earlier turns of a session are text only, and so is :meth:`Backend.warmup`'s default).
Control-token strings typed in the text (``<image>``, ``<|im_end|>``, ...) are tokenized as text,
not as the tokens the template and the processor write
(:class:`~slm_ros.backends.hf_tokenizer.LiteralControlTokens`).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any, Dict, FrozenSet, Iterator, List, Mapping, Sequence

import jinja2
import numpy as np
import torch
import transformers
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from slm_ros.backends.base import Backend, BackendConfig, Prompt
from slm_ros.backends.hf_tokenizer import (
    LiteralControlTokens,
    hf_control_tokens,
    hf_encode_literal,
    hf_grammar_tokenizer,
)
from slm_ros.backends.transformers_backend import (
    logits_size,
    resolve_device,
    resolve_dtype,
    stream_generate,
)
from slm_ros.core.errors import ConfigError, ModelLoadError, RequestError
from slm_ros.core.session import Message
from slm_ros.core.types import SamplingParams

# Errors transformers raises for a checkpoint it cannot use (missing or malformed files, unknown
# model type, weights that do not fit the config).
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError)

_EXAMPLES = "e.g. SmolVLM-256M-Instruct or a llava-hf checkpoint"


@dataclasses.dataclass(frozen=True)
class VlmBackendConfig(BackendConfig):
    """:class:`BackendConfig` plus settings passed to the model's image processor on every call.

    ``image_options`` overrides the checkpoint's preprocessor settings by name. On a CPU, SmolVLM
    wants ``{"do_image_splitting": False, "size": {"longest_edge": 512}}``: one 512 px view (64
    image tokens) instead of up to 4x4 tiles plus a global view (~900 tokens for a 640x480 frame,
    over 10x the prefill), and no detour through a 2048 px resize (37 instead of 240 ms of
    preprocessing, measured on a 2-core CPU). Unknown names are refused at load.
    """

    image_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.image_options, Mapping):
            raise ConfigError(f"image_options must be a mapping of image processor settings, got "
                              f"{type(self.image_options).__name__}")
        for key in self.image_options:
            if not isinstance(key, str) or not key:
                raise ConfigError(f"image_options keys must be setting names, got {key!r}")


def _fallback_template(image_token: str) -> str:
    """A plain "User:/Assistant:" template for checkpoints whose processor ships none."""
    # Newlines are written as expressions: transformers renders with trim_blocks, which drops a
    # literal newline that follows a block tag.
    return (
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}"
        "{{ '\\n\\n' }}"
        "{% else %}{{ 'User: ' if m['role'] == 'user' else 'Assistant: ' }}"
        "{% for p in m['content'] %}{% if p['type'] == 'image' %}{% raw %}" + image_token
        + "{% endraw %}{% else %}{{ p['text'] }}{% endif %}{% endfor %}{{ '\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}")


def to_content_parts(messages: Sequence[Message], n_images: int) -> List[Dict[str, Any]]:
    """Rewrite ``{"role", "content": str}`` messages into content-parts form, with ``n_images``
    image parts before the text of the last message (which must then be the user's)."""
    if n_images and (not messages or messages[-1].get("role") != "user"):
        raise RequestError("images belong to the last user message, but the conversation does not "
                           "end with one")
    out: List[Dict[str, Any]] = []
    for i, message in enumerate(messages):
        parts: List[Dict[str, Any]] = []
        if i == len(messages) - 1:
            parts.extend({"type": "image"} for _ in range(n_images))
        content = message["content"]
        if isinstance(content, str):
            parts.append({"type": "text", "text": content})
        else:   # already content parts
            parts.extend(content)
        out.append({"role": message["role"], "content": parts})
    return out


def _to_pil(image: Any, index: int) -> Image.Image:
    """An RGB PIL image from an H x W x 3 uint8 array (or a PIL image)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
            or image.shape[2] != 3 or 0 in image.shape:
        desc = (f"array {image.dtype} {image.shape}" if isinstance(image, np.ndarray)
                else type(image).__name__)
        raise RequestError(f"image {index} must be an RGB uint8 array of shape H x W x 3, "
                           f"got {desc}")
    return Image.fromarray(np.ascontiguousarray(image))


class TransformersVlmBackend(Backend):
    """Vision-language models through ``transformers`` (PyTorch), CPU or CUDA."""

    name = "transformers"
    supports_images = True

    def __init__(self) -> None:
        self._model = None
        self._processor = None
        self._tokenizer = None
        self._grammar_tokenizer = None
        self._template = None
        self._image_options: Dict[str, Any] = {}
        self._device = "cpu"
        self._dtype = torch.float32
        self._context = 0
        self._eos: FrozenSet[int] = frozenset()
        self._literal = LiteralControlTokens({})
        self._processor_tokens: FrozenSet[str] = frozenset()
        self._info: dict = {}

    # -- loading -----------------------------------------------------------------------------------

    def load(self, config: BackendConfig) -> None:
        path = config.model
        if not os.path.isdir(path):
            raise ModelLoadError(
                f"vision-language model directory {path!r} does not exist (the transformers vision "
                f"backend loads local checkpoint directories, {_EXAMPLES}; nothing is downloaded)")
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        local = {"trust_remote_code": False, "local_files_only": True}
        try:
            hf_config = AutoConfig.from_pretrained(path, **local)
        except _LOAD_ERRORS as exc:
            raise ModelLoadError(f"cannot read the model config of {path!r} (config.json): "
                                 f"{exc}") from exc
        model_type = getattr(hf_config, "model_type", "?")
        if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
            raise ModelLoadError(
                f"{path!r}: config model_type {model_type!r} is not an image-text-to-text model "
                f"(transformers {transformers.__version__} knows "
                f"{len(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)} such types); the vision node "
                f"needs a vision-language checkpoint, {_EXAMPLES}, and text models belong to the "
                f"llm node")
        try:
            processor = AutoProcessor.from_pretrained(path, **local)
        except _LOAD_ERRORS as exc:
            raise ModelLoadError(
                f"cannot load the processor of {path!r} (processor_config.json or "
                f"preprocessor_config.json, plus tokenizer files): {exc}") from exc
        tokenizer = getattr(processor, "tokenizer", None)
        if getattr(processor, "image_processor", None) is None or tokenizer is None:
            raise ModelLoadError(
                f"{path!r}: AutoProcessor found a {type(processor).__name__}, not a processor with "
                f"an image processor and a tokenizer; is processor_config.json / "
                f"preprocessor_config.json missing?")
        options = dict(getattr(config, "image_options", None) or {})
        unknown = sorted(k for k in options if not hasattr(processor.image_processor, k))
        if unknown:
            raise ConfigError(
                f"image_options {unknown} are not settings of "
                f"{type(processor.image_processor).__name__} (the image processor of {path!r})")
        template = self._chat_template(path, processor)
        try:
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, **local)
        except _LOAD_ERRORS as exc:
            raise ModelLoadError(f"transformers could not load the {model_type} model in "
                                 f"{path!r}: {exc}") from exc
        model.to(device).eval()

        eos = set()
        for source in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
            if isinstance(source, int):
                eos.add(source)
            elif source:
                eos.update(int(t) for t in source)
        if not eos:
            raise ModelLoadError(f"{path!r} defines no end-of-sequence token (eos_token_id in "
                                 f"generation_config.json, or the tokenizer's eos_token)")
        text_config = hf_config.get_text_config()
        limit = int(getattr(text_config, "max_position_embeddings", 0) or 0) or 2048
        if config.max_context_tokens > 0:
            limit = min(limit, config.max_context_tokens)

        self._model, self._processor, self._tokenizer = model, processor, tokenizer
        controls = hf_control_tokens(tokenizer)
        self._literal = LiteralControlTokens(controls)
        # Control tokens the processor itself looks for in the text (image placeholders): never
        # the stand-in for literal text.
        self._processor_tokens = frozenset(
            v for v in vars(processor).values() if isinstance(v, str) and v in controls)
        self._template, self._image_options = template, options
        self._device, self._dtype = device, dtype
        self._context, self._eos = limit, frozenset(eos)
        self._info = {
            "backend": self.name, "model": path, "model_type": model_type,
            "architecture": type(model).__name__, "processor": type(processor).__name__,
            "image_processor": type(processor.image_processor).__name__,
            "image_token": getattr(processor, "image_token", None), "image_options": options,
            "device": device, "dtype": str(dtype).replace("torch.", ""), "context_length": limit,
            "parameters": sum(p.numel() for p in model.parameters()),
            "torch": torch.__version__, "transformers": transformers.__version__,
        }

    @staticmethod
    def _chat_template(path: str, processor) -> Any:
        """The chat template to render with (None = the processor's own); refuses one that drops
        the images."""
        image_token = getattr(processor, "image_token", None)
        template = None
        if not getattr(processor, "chat_template", None):
            if not image_token:
                raise ModelLoadError(f"{path!r} has no chat template (chat_template.jinja) and its "
                                     f"processor names no image token to build one")
            template = _fallback_template(image_token)
        probe = to_content_parts([{"role": "user", "content": "What is this?"}], 1)
        try:
            text = processor.apply_chat_template(probe, add_generation_prompt=True, tokenize=False,
                                                 chat_template=template)
        except (jinja2.TemplateError, *_LOAD_ERRORS) as exc:
            raise ModelLoadError(f"the chat template of {path!r} fails on an image question: "
                                 f"{exc}") from exc
        if image_token and image_token not in text:
            raise ModelLoadError(f"the chat template of {path!r} does not place the image token "
                                 f"{image_token!r} for an image part: rendered {text!r}")
        return template

    # -- Backend interface -------------------------------------------------------------------------

    def apply_chat_template(self, messages: List[Message], images: Sequence[Any] = ()) -> Prompt:
        """Token ids (image placeholders expanded) plus the processor's pixel inputs.

        ``images`` (RGB uint8 arrays, H x W x 3) go into the last user message, in order.
        """
        pil = [_to_pil(image, i) for i, image in enumerate(images)]
        processor, tokenizer = self._processor, self._tokenizer
        # Control-token strings typed in the text (an image placeholder among them) stay text.
        conversation, brackets = self._literal.mark(to_content_parts(messages, len(pil)))
        try:
            text = processor.apply_chat_template(conversation, add_generation_prompt=True,
                                                 tokenize=False, chat_template=self._template)
        except jinja2.TemplateError as exc:
            # e.g. templates that accept no system message or require alternating roles
            raise RequestError(f"the chat template of {self._info.get('model')} refused the "
                               f"conversation: {exc}") from exc
        # Templates that write the BOS token themselves must not get a second one.
        bos = tokenizer.bos_token
        kwargs: Dict[str, Any] = {"add_special_tokens": not (bos and text.startswith(bos))}
        if pil:
            kwargs.update(self._image_options)
        inputs: Dict[str, Any] = {}

        def encode(prompt: str) -> List[int]:
            # The processor expands the image placeholders and makes the pixel inputs.
            try:
                out = processor(text=prompt, images=pil or None, return_tensors="pt", **kwargs)
            except (ValueError, TypeError, RuntimeError) as exc:
                sizes = ", ".join(f"{im.width}x{im.height}" for im in pil) or "none"
                raise RequestError(
                    f"the {type(processor).__name__} of {self._info.get('model')} could not "
                    f"prepare the prompt (images: {sizes}): {exc}") from exc
            out.pop("attention_mask", None)   # one unpadded sequence: generate() makes it all ones
            ids = out.pop("input_ids")[0].tolist()
            inputs.update(out)
            return ids

        ids = self._literal.encode(text, brackets, encode,
                                   encode_literal=lambda t: hf_encode_literal(tokenizer, t),
                                   avoid=self._processor_tokens)
        return Prompt(ids, inputs)

    def count_tokens(self, text: str) -> int:
        return len(hf_encode_literal(self._tokenizer, text))

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                 cancel: threading.Event) -> Iterator[int]:
        model = self._model
        input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self._device)
        extra = {name: self._to_device(value)
                 for name, value in getattr(prompt_ids, "inputs", {}).items()}
        return stream_generate(model, input_ids, params, self._eos, cancel,
                               name="slm-transformers-vlm-generate", **extra)

    def grammar_tokenizer(self):
        if self._grammar_tokenizer is None:
            self._grammar_tokenizer = hf_grammar_tokenizer(
                self._tokenizer, self._eos, logits_size(self._model, self._tokenizer))
        return self._grammar_tokenizer

    def _to_device(self, value: Any) -> Any:
        """Processor outputs onto the model's device; pixel tensors also in the model's dtype."""
        if not isinstance(value, torch.Tensor):
            return value
        if value.is_floating_point():
            return value.to(self._device, dtype=self._dtype)
        return value.to(self._device)

    def warmup(self) -> None:
        """One tiny generation with a small grey image, so the vision tower is warmed up too."""
        grey = np.full((64, 64, 3), 128, dtype=np.uint8)
        prompt = self.apply_chat_template([{"role": "user", "content": "Hi"}], images=(grey,))
        for _ in self.generate(prompt, SamplingParams(max_new_tokens=2), threading.Event()):
            pass

    def describe(self) -> dict:
        return dict(self._info)

    def close(self) -> None:
        self._model = None
        self._processor = None
        self._tokenizer = None
        self._grammar_tokenizer = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
