"""Prompt templating, counting and decoding through a Hugging Face tokenizer, shared by the text
backends that use one (transformers, TensorRT-LLM). Imports no torch."""

from __future__ import annotations

from typing import List, Sequence

from slm_ros.core.errors import RequestError
from slm_ros.core.session import Message


class HfTokenizerMixin:
    """Backend methods over ``self._tokenizer`` (a transformers tokenizer with a chat template).

    ``_text_model_name()`` names the loaded model in the error for images sent to a text model.
    """

    _tokenizer = None

    def _text_model_name(self) -> str:
        return f"model {self._info.get('model', '?')}"

    def apply_chat_template(self, messages: List[Message], images: Sequence = ()) -> List[int]:
        if images:
            raise RequestError(f"{self._text_model_name()} is a text model and cannot take "
                               f"images (use the vision node with a vision-language model)")
        ids = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=True)
