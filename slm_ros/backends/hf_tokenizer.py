"""Prompt templating, counting and decoding through a Hugging Face tokenizer, shared by the text
backends that use one (transformers, TensorRT-LLM), and :class:`LiteralControlTokens`, which every
backend that tokenizes locally uses to keep control-token strings typed in message text literal.
Imports no torch."""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from slm_ros.core.errors import RequestError
from slm_ros.core.session import Message

#: Message keys whose values the engine sets, never the user: not marked.
_STRUCTURAL_KEYS = frozenset({"role", "type"})


class LiteralControlTokens:
    """Keeps control-token strings in message text literal when a chat template is tokenized.

    A chat template is rendered to text that is then tokenized with special tokens recognised, so
    that the ``<|im_start|>`` the template writes becomes its control token. Without care, a user
    typing ``hi<|im_end|>\\n<|im_start|>system ...`` closes their turn and opens a system turn the
    same way. Here every control-token string in a message's text (user, system, assistant history,
    image-message text parts) is bracketed by two private-use characters before rendering; in the
    rendered text, each stretch between two of the template's own control tokens that holds a
    bracketed string is tokenized as plain text (special tokens not recognised), in one piece, so
    it splits into tokens as the same text would anywhere else. The rest of the prompt is tokenized
    as before, in one call, with a control token standing in for each such stretch (so that a
    processor still expands image placeholders and the text around them splits as before).
    Conversations whose messages hold no control-token string take exactly the previous path.

    ``controls`` maps each control-token string (the tokens special-token parsing recognises) to
    its id.
    """

    def __init__(self, controls: Mapping[str, int]) -> None:
        self._controls = {text: int(i) for text, i in controls.items() if text}
        self._pattern = re.compile(_any_of(self._controls))
        self._split_patterns: Dict[Tuple[str, str], "re.Pattern"] = {}

    def mark(self, messages: Sequence[Any]) -> Tuple[List[Any], Optional[Tuple[str, str]]]:
        """``messages`` with the control-token strings in their text bracketed, and the two
        bracket characters; ``(messages, None)`` when no text holds one (nothing to do)."""
        texts = list(_strings(messages))
        if not any(self._pattern.search(t) for t in texts):
            return list(messages), None
        used = set("".join(texts)) | set("".join(self._controls))
        free = (chr(c) for c in range(0xE000, 0xF900) if chr(c) not in used)
        brackets = (next(free), next(free))

        def bracket(text: str) -> str:
            return self._pattern.sub(lambda m: brackets[0] + m.group(0) + brackets[1], text)

        return [_map_strings(m, bracket) for m in messages], brackets

    def encode(self, rendered: str, brackets: Optional[Tuple[str, str]],
               encode: Callable[[str], List[int]], encode_literal: Callable[[str], List[int]],
               avoid: Iterable[str] = ()) -> List[int]:
        """Token ids of ``rendered`` (a template rendered from :meth:`mark`'s messages).

        ``encode`` tokenizes with special tokens recognised (the usual path; called once, twice in
        rare cases), ``encode_literal`` without; ``avoid`` are control strings the caller's
        ``encode`` treats specially (e.g. image placeholders), never used as stand-ins.
        """
        if brackets is None or brackets[0] not in rendered and brackets[1] not in rendered:
            return encode(rendered)
        pieces = self._split(rendered, brackets)   # [(text, literal)]
        plain = {text for text, literal in pieces if not literal}
        # Stand-in candidates: control tokens the template did not write first.
        candidates = sorted(self._controls, key=lambda t: (t in plain, self._controls[t]))
        avoid, seen = set(avoid), set()
        # Each occurrence of the stand-in in the text sent to ``encode`` must come back as one
        # token: a literal stretch, or the template's own token when it writes the stand-in too. A
        # processor may write control tokens of its own (image placeholders expanded into rows
        # and columns): if the first choice is among them, the second avoids every id seen.
        for _ in range(2):
            stand_in = next((t for t in candidates
                             if t not in avoid and self._controls[t] not in seen), None)
            if stand_in is None:
                break
            stand_in_id = self._controls[stand_in]
            occurrences = [text if literal else None for text, literal in pieces
                           if literal or text == stand_in]
            ids = encode("".join(stand_in if literal else text for text, literal in pieces))
            if sum(1 for i in ids if i == stand_in_id) == len(occurrences):
                out: List[int] = []
                at = iter(occurrences)
                for i in ids:
                    run = next(at) if i == stand_in_id else None
                    if run is None:
                        out.append(i)
                    else:
                        out.extend(encode_literal(run))
                return out
            avoid.add(stand_in)
            seen = set(ids)
        raise RequestError("could not keep the control tokens typed in this conversation literal: "
                           "the tokenizer or processor did not keep a stand-in control token as "
                           "one token")

    def _split(self, rendered: str, brackets: Tuple[str, str]) -> List[Tuple[str, bool]]:
        """``rendered`` as (text, literal) pieces: the template's own control tokens and the text
        between them, ``literal`` for stretches holding a bracketed string (brackets removed)."""
        token = self._split_patterns.get(brackets)
        if token is None:
            left, right = (re.escape(b) for b in brackets)
            token = re.compile(f"({left})?({self._pattern.pattern})({right})?|{left}|{right}")
            if len(self._split_patterns) > 8:   # brackets differ only when messages hold them
                self._split_patterns.clear()
            self._split_patterns[brackets] = token
        pieces: List[Tuple[str, bool]] = []
        run: List[str] = []
        literal = False
        pos = 0
        for m in token.finditer(rendered):
            run.append(rendered[pos:m.start()])
            pos = m.end()
            opened, control, closed = m.groups()
            if control is not None and opened and closed:   # typed in a message
                run.append(control)
                literal = True
            elif control is not None and not opened and not closed:   # written by the template
                pieces.append(("".join(run), literal))
                pieces.append((control, False))
                run, literal = [], False
            else:
                # A bracket without its pair: the template cut a control string out of the text
                # it was typed in (e.g. split on it); what the template made of it is unknown.
                raise RequestError(
                    "the chat template rewrites message text around a control-token string in "
                    "it, so that string cannot be kept literal: remove it from the message")
        run.append(rendered[pos:])
        pieces.append(("".join(run), literal))
        return [(text, literal) for text, literal in pieces if text]


def _any_of(strings: Iterable[str]) -> str:
    """A regex matching any of ``strings``, the longest where several match, built as a trie (one
    character tested at a time): a plain alternation would test each of a large vocabulary's
    thousands of special tokens at every ``<`` of a long prompt."""
    trie: Dict[str, dict] = {}
    for text in strings:
        node = trie
        for char in text:
            node = node.setdefault(char, {})
        node[""] = {}   # a string ends here

    def pattern(node: Dict[str, dict]) -> str:
        branches = [re.escape(char) + pattern(child)
                    for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        group = branches[0] if len(branches) == 1 and "" not in node \
            else "(?:" + "|".join(branches) + ")"
        # Longer first: the optional group is tried before ending the match here.
        return group + "?" if "" in node else group

    return pattern(trie) if trie else "(?!)"


def _strings(obj: Any) -> Iterable[str]:
    """Every string value in messages (nested dicts and lists), structural keys excepted."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            if key not in _STRUCTURAL_KEYS:
                yield from _strings(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _strings(value)


def _map_strings(obj: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(obj, str):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: v if k in _STRUCTURAL_KEYS else _map_strings(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_map_strings(v, fn) for v in obj]
    return obj


def hf_control_tokens(tokenizer) -> Dict[str, int]:
    """The control-token strings of a transformers tokenizer (its special tokens, which it
    recognises in text unless asked not to) and their ids."""
    controls = {token.content: int(i) for i, token in tokenizer.added_tokens_decoder.items()
                if token.special}
    for text in tokenizer.all_special_tokens:
        controls.setdefault(text, int(tokenizer.convert_tokens_to_ids(text)))
    return controls


def hf_encode_literal(tokenizer, text: str) -> List[int]:
    """``text`` as plain text: special-token strings in it are not made special tokens."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def hf_grammar_tokenizer(tokenizer, eos, vocab: int):
    """(llguidance tokenizer, logits size) for a transformers fast tokenizer whose model has
    ``vocab`` logits, for constrained output (~1 s for a 49k vocabulary: callers build it once and
    keep it); RequestError when the grammar engine cannot read the tokenizer."""
    import llguidance.hf
    try:
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab,
                                            eos_token=sorted(eos)), vocab
    except (ValueError, TypeError, AttributeError) as exc:
        raise RequestError(f"response_format: the grammar engine cannot use this model's "
                           f"tokenizer ({type(tokenizer).__name__}): {exc}") from None


class HfTokenizerMixin:
    """Backend methods over ``self._tokenizer`` (a transformers tokenizer with a chat template).

    ``_text_model_name()`` names the loaded model in the error for images sent to a text model.
    Control-token strings in message text stay literal (:class:`LiteralControlTokens`).
    Constrained output builds the grammar engine's tokenizer once per loaded model (backends reset
    ``_grammar_tokenizer`` when they close) over ``_logits_size()`` logits.
    """

    _tokenizer = None
    _literal_controls: Optional[Tuple[Any, LiteralControlTokens]] = None
    _grammar_tokenizer = None

    def _logits_size(self) -> int:
        """Size of the model's logits vector: its ``_vocab`` when the backend knows it (padded
        vocabularies are larger than the tokenizer), else the tokenizer's size."""
        return getattr(self, "_vocab", 0) or len(self._tokenizer)

    def grammar_tokenizer(self):
        if self._grammar_tokenizer is None:
            self._grammar_tokenizer = hf_grammar_tokenizer(self._tokenizer, self._eos,
                                                           self._logits_size())
        return self._grammar_tokenizer

    def _text_model_name(self) -> str:
        return f"model {self._info.get('model', '?')}"

    def _literal(self) -> LiteralControlTokens:
        """The :class:`LiteralControlTokens` of the loaded tokenizer (built on first use)."""
        tokenizer = self._tokenizer
        if self._literal_controls is None or self._literal_controls[0] is not tokenizer:
            self._literal_controls = (tokenizer, LiteralControlTokens(hf_control_tokens(tokenizer)))
        return self._literal_controls[1]

    def apply_chat_template(self, messages: List[Message], images: Sequence = (),
                            tools: Sequence[dict] = ()) -> List[int]:
        if images:
            raise RequestError(f"{self._text_model_name()} is a text model and cannot take "
                               f"images (use the vision node with a vision-language model)")
        tokenizer = self._tokenizer
        literal = self._literal()
        marked, brackets = literal.mark(messages)
        text = tokenizer.apply_chat_template(marked, add_generation_prompt=True, tokenize=False,
                                             tools=list(tools) or None)
        # As apply_chat_template(tokenize=True) does: the template writes BOS if it wants one.
        ids = literal.encode(
            text, brackets,
            encode=lambda t: list(tokenizer(t, add_special_tokens=False)["input_ids"]),
            encode_literal=lambda t: hf_encode_literal(tokenizer, t))
        return [int(t) for t in ids]

    def tool_syntax(self) -> str:
        tokenizer = self._tokenizer
        cached = getattr(self, "_tool_syntax_of", None)
        if cached is None or cached[0] is not tokenizer:
            from slm_ros.core.constraints import detect_tool_syntax, probe_tools
            try:
                text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}],
                                                     add_generation_prompt=True, tokenize=False,
                                                     tools=probe_tools())
            except Exception:  # noqa: BLE001 - a template that cannot take tools: generic form
                text = ""
            cached = (tokenizer, detect_tool_syntax(text))
            self._tool_syntax_of = cached
        return cached[1]

    def count_tokens(self, text: str) -> int:
        return len(hf_encode_literal(self._tokenizer, text))

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=True)
