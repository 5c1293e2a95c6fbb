"""Tiny random-weight vision-language models built offline, for tests.

No VLM weights can be downloaded here, so the tests exercise the real loading and generation code
(``AutoProcessor`` + ``AutoModelForImageTextToText``) on miniature checkpoints of two families:

* :func:`build_tiny_llava` - LLaVA (CLIP vision tower + projector + Llama), ``LlavaProcessor``.
* :func:`build_tiny_idefics3` - Idefics3, the architecture of SmolVLM-256M/500M-Instruct
  (SigLIP-style vision tower, pixel-shuffle connector, Llama), ``Idefics3Processor``.

Both share a byte-level BPE tokenizer trained in a few milliseconds on a handful of sentences, with
the chat and image special tokens each family needs, and a chat template that takes the standard
``[{"type": "image"}, {"type": "text", "text": ...}]`` message content. Each directory is well under
1 MB and builds in about a second; ``AutoProcessor.from_pretrained(dir)`` and
``AutoModelForImageTextToText.from_pretrained(dir)`` load it like a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

try:   # transformers 5.23 names its PIL (torchvision-free) image processors explicitly
    from transformers.models.clip.image_processing_pil_clip import (
        CLIPImageProcessorPil as CLIPImageProcessor)
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil as Idefics3ImageProcessor)
except ImportError:
    from transformers import CLIPImageProcessor, Idefics3ImageProcessor

PathLike = Union[str, Path]

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
IMAGE = "<image>"
FAKE_AROUND_IMAGE, GLOBAL_IMAGE, END_OF_UTTERANCE = (
    "<fake_token_around_image>", "<global-img>", "<end_of_utterance>")

_CORPUS = [
    "The robot sees a red cup on the table next to a blue box.",
    "What is in front of the camera? A person is standing near the door.",
    "Describe the image. There is a green plant, a chair and a window.",
    "Is the path clear? Yes, the corridor is empty and well lit.",
    "How many objects are on the shelf? I count three bottles and one book.",
]

# ChatML turns; image parts become the processor's image placeholder, text parts their text.
_LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# SmolVLM's turn layout: "User:<image>question<end_of_utterance>\nAssistant:".
_IDEFICS3_TEMPLATE = (
    "{{ '<|im_start|>' }}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}{{ ':' }}"
    "{% if message['content'] is string %}{{ ' ' + message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ ' ' + part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<end_of_utterance>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def build_tiny_tokenizer(special_tokens: Sequence[str], vocab_size: int = 400,
                         bos_token: Optional[str] = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences, with ``special_tokens`` added.

    The first special token is the end-of-sequence token; every byte is in the vocabulary, so any
    text round-trips through encode/decode. ``bos_token`` (one of the special tokens) is only
    declared, never added automatically: chat templates write it.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    eos = special_tokens[0]
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos,
                                   bos_token=bos_token,
                                   additional_special_tokens=list(special_tokens[1:]))


def _text_config(tokenizer: PreTrainedTokenizerFast, eos_id: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=2048, bos_token_id=eos_id, eos_token_id=eos_id,
                       pad_token_id=eos_id, tie_word_embeddings=False, initializer_range=0.2)


def _save(model: torch.nn.Module, processor, eos_id: int, out_dir: PathLike) -> str:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=eos_id,
                                               bos_token_id=eos_id)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


def build_tiny_llava(out_dir: PathLike, seed: int = 0) -> str:
    """Write a tiny LLaVA checkpoint (CLIP 32x32 px, 8 px patches: 16 image tokens) to ``out_dir``.

    Returns the directory as a string.
    """
    tokenizer = build_tiny_tokenizer([IM_END, IM_START, IMAGE])
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=32, patch_size=8),
        text_config=_text_config(tokenizer, eos_id),
        image_token_id=image_id, vision_feature_select_strategy="default",
        vision_feature_layer=-1, projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32},
                                         crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=_LLAVA_TEMPLATE)
    return _save(model, processor, eos_id, out_dir)


def build_tiny_idefics3(out_dir: PathLike, seed: int = 0) -> str:
    """Write a tiny Idefics3 / SmolVLM-style checkpoint to ``out_dir`` (32x32 px, 8 px patches,
    pixel shuffle 2 → 4 image tokens per image, no image splitting). Returns the directory."""
    specials: List[str] = [END_OF_UTTERANCE, IM_START, FAKE_AROUND_IMAGE, IMAGE, GLOBAL_IMAGE]
    specials += [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    # SmolVLM's tokenizer declares <|im_start|> as BOS and its template writes it.
    tokenizer = build_tiny_tokenizer(specials, bos_token=IM_START)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    eos_id = tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE)
    torch.manual_seed(seed)
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4,
                                           image_size=32, patch_size=8),
        text_config=_text_config(tokenizer, eos_id),
        image_token_id=image_id, scale_factor=2, tie_word_embeddings=False, initializer_range=0.2)
    model = Idefics3ForConditionalGeneration(config)
    image_processor = Idefics3ImageProcessor(
        do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_len=4, chat_template=_IDEFICS3_TEMPLATE)
    return _save(model, processor, eos_id, out_dir)


def build_tiny_text_model(out_dir: PathLike, seed: int = 0) -> str:
    """Write a tiny text-only Llama (ChatML template) to ``out_dir``: what the vision backend must
    refuse and the text backend loads. Returns the directory."""
    tokenizer = build_tiny_tokenizer([IM_END, IM_START])
    tokenizer.chat_template = (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_text_config(tokenizer, eos_id))
    return _save(model, tokenizer, eos_id, out_dir)
