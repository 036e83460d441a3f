"""Chat templates: a conversation (list of messages) -> per-turn (source ids, target ids).

Templates are data, read from `configs/finetune/templates.json` (see docs/templates.md). Each entry gives
slots per role; a slot element is a string with `{{content}}`/`{{idx}}`/`{{name}}`/`{{arguments}}`
placeholders, `{"token": "<x>"}` for a token by name, or `["bos_token"]`/`["eos_token"]`.

Encoding classes, selected by `template_class`:
- `Template`: the classic encoding (separator before every later user turn, proportional truncation that
  fills the budget, efficient-eos label on later turns' first source token);
- `LFDefaultTemplate`: LLaMA-Factory 0.9 encoding (no separator, `infer_seqlen` truncation);
- `ReasoningTemplate`: as LFDefaultTemplate plus the `--enable-thinking` rules for `<think>` blocks;
- `Llama2Template`: the system text is merged into the first user message;
- `DeepSeek4Template`: DeepSeek-V4 text written by its own class (`mindspeed_llm/data/deepseek4.py`).

Every message's elements are tokenized on their own (`add_special_tokens=False`) and concatenated, so token
merges never cross a message boundary.
"""
from __future__ import annotations

import functools
import inspect
import itertools
import json
import os
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mindspeed_llm.data.tools import format_function_calls, format_tools
from mindspeed_llm.errors import UserError

DEFAULT_TEMPLATES_PATH = Path(__file__).resolve().parents[2] / "configs" / "finetune" / "templates.json"
TEMPLATE_CLASSES = ("Template", "LFDefaultTemplate", "ReasoningTemplate", "Llama2Template", "DeepSeek4Template")
ROLES = ("user", "assistant", "observation", "function")
IGNORE_INDEX = -100
# The thought words of MindSpeed-LLM and LLaMA-Factory >= 0.9.4: an empty thought renders `<think>\n\n</think>\n\n`.
DEFAULT_THOUGHT_WORDS = ("<think>\n", "\n</think>\n\n")

Slots = list[Any]


class TemplateError(UserError):
    """A template definition or a conversation that the template cannot encode."""


@dataclass
class ChatTemplate:
    name: str
    template_class: str = "Template"
    format_user: Slots = field(default_factory=lambda: ["{{content}}"])
    format_assistant: Slots | None = None
    format_system: Slots | None = None
    format_function: Slots | None = None
    function_tool_format: str = "default"
    format_observation: Slots | None = None
    tool_format: str = "default"
    format_separator: Slots = field(default_factory=list)
    format_prefix: Slots = field(default_factory=list)
    default_system: str = ""
    stop_words: list[str] = field(default_factory=list)
    efficient_eos: bool = False
    replace_eos: bool = False
    thought_words: tuple[str, str] = DEFAULT_THOUGHT_WORDS
    enable_thinking: bool | None = None

    def __post_init__(self) -> None:
        if self.template_class not in TEMPLATE_CLASSES:
            raise TemplateError(f"template {self.name!r}: template_class must be one of {TEMPLATE_CLASSES}, "
                                f"got {self.template_class!r}")
        eos = [] if self.efficient_eos else [["eos_token"]]
        if self.format_assistant is None:
            self.format_assistant = ["{{content}}"] + eos
        if self.format_system is None:
            self.format_system = ["{{content}}"]
        if self.format_function is None:
            self.format_function = ["{{content}}"] + eos
        if self.format_observation is None:
            self.format_observation = list(self.format_user)

    @property
    def uses_separator(self) -> bool:
        return self.template_class != "LFDefaultTemplate"

    @property
    def lf_truncation(self) -> bool:
        return self.template_class in ("LFDefaultTemplate", "ReasoningTemplate", "DeepSeek4Template")

    # ---- elements -> ids -------------------------------------------------------------------------------
    def _apply(self, slots: Slots, **values: str) -> list:
        out = []
        for slot in slots:
            if isinstance(slot, str):
                for key, value in values.items():
                    slot = slot.replace("{{" + key + "}}", value, 1)
            out.append(slot)
        return out

    def _to_ids(self, tokenizer, elements: list) -> list[int]:
        ids: list[int] = []
        for elem in elements:
            if isinstance(elem, str):
                if elem:
                    ids += encode_text(tokenizer, elem)
            elif isinstance(elem, dict):
                token_id = tokenizer.convert_tokens_to_ids(elem["token"])
                if token_id is None or token_id == tokenizer.unk_token_id:
                    raise TemplateError(f"template {self.name!r} needs token {elem['token']!r}, which the tokenizer "
                                        f"lacks; pick the --prompt-type that matches the model")
                ids.append(token_id)
            elif isinstance(elem, list):  # ["bos_token"] / ["eos_token"]: the id if the tokenizer has one
                token_id = {"bos_token": tokenizer.bos_token_id, "eos_token": tokenizer.eos_token_id}[elem[0]]
                if token_id is not None:
                    ids.append(token_id)
            else:
                raise TemplateError(f"template {self.name!r}: bad slot element {elem!r}")
        return ids

    # ---- encoding --------------------------------------------------------------------------------------
    def _encode(self, tokenizer, messages: list[dict], system: str, tools: str) -> list[list[int]]:
        system = system or self.default_system
        tool_text = format_tools(tools, self.tool_format) if tools else ""
        # A tools string that lists no tool ("[]") still opens the system turn, as LLaMA-Factory does.
        encoded = []
        for i, message in enumerate(messages):
            elements: list = []
            role, content = message["role"], message["content"]
            if i == 0:
                elements += self.format_prefix
                if (system or tools) and self.template_class != "Llama2Template":
                    elements += self._apply(self.format_system, content=system + tool_text)
                elif (system or tools) and role == "user":
                    merged = self._apply(self.format_system, content=system + tool_text)[0]
                    content = merged + content
            if i > 0 and i % 2 == 0 and self.uses_separator:
                elements += self.format_separator
            if role == "user":
                elements += self._apply(self.format_user, content=content, idx=str(i // 2))
            elif role == "assistant":
                elements += self._apply(self.format_assistant, content=content)
            elif role == "observation":
                elements += self._apply(self.format_observation, content=content)
            elif role == "function":
                calls = format_function_calls(content, self.function_tool_format)
                elements += self._apply(self.format_function, content=calls)
            else:
                raise TemplateError(f"role {role!r} is not one of {ROLES}")
            encoded.append(self._to_ids(tokenizer, elements))
        return encoded

    def _thought_ids(self, tokenizer) -> list[int]:
        """The empty thought block: the two thought words back to back."""
        return encode_text(tokenizer, self.thought_words[0] + self.thought_words[1])

    def _has_thought(self, content: str) -> bool:
        # Either tag, without the surrounding newlines, marks a thought (LLaMA-Factory >= 0.9.4), so a thought
        # spelled `<think>X</think>answer` is kept as it is and gets no second, empty block.
        return self.thought_words[0].strip() in content or self.thought_words[1].strip() in content

    def remove_thought(self, content: str) -> str:
        """Drops thoughts spelled with the full thought words (newlines included); others stay."""
        if self.thought_words[0] not in content:  # nothing to drop (most answers): skip the regex
            return content.lstrip("\n")
        return _thought_pattern(*self.thought_words).sub("", content).lstrip("\n")

    def encode_multiturn(self, tokenizer, messages: list[dict], system: str = "", tools: str = ""
                         ) -> list[tuple[list[int], list[int]]]:
        """One (source, target) pair per user -> assistant turn; no truncation here."""
        if self.template_class == "ReasoningTemplate" and self.enable_thinking is False:
            messages = [dict(m, content=self.remove_thought(m["content"])) if i % 2 else m
                        for i, m in enumerate(messages)]
        encoded = self._encode(tokenizer, messages, system, tools)
        if self.template_class == "ReasoningTemplate":
            for i in range(0, len(messages), 2):
                if not self._has_thought(messages[i + 1]["content"]):
                    if self.enable_thinking:  # trained: the empty block belongs to the answer
                        encoded[i + 1] = self._thought_ids(tokenizer) + encoded[i + 1]
                    else:  # masked: the empty block ends the prompt
                        encoded[i] = encoded[i] + self._thought_ids(tokenizer)
        return [(encoded[i], encoded[i + 1]) for i in range(0, len(encoded), 2)]

    def encode_oneturn(self, tokenizer, messages: list[dict], system: str = "", tools: str = ""
                       ) -> tuple[list[int], list[int]]:
        """(everything before the last answer, the last answer): the pairwise encoding."""
        if self.template_class == "ReasoningTemplate":
            messages = [dict(m, content=self.remove_thought(m["content"])) if i % 2 and i < len(messages) - 1
                        else m for i, m in enumerate(messages)]
            if self.enable_thinking is False:
                messages[-1] = dict(messages[-1], content=self.remove_thought(messages[-1]["content"]))
        encoded = self._encode(tokenizer, messages, system, tools)
        prompt = [t for ids in encoded[:-1] for t in ids]
        response = encoded[-1]
        if self.template_class == "ReasoningTemplate" and not self._has_thought(messages[-1]["content"]):
            if self.enable_thinking:
                response = self._thought_ids(tokenizer) + response
            else:
                prompt = prompt + self._thought_ids(tokenizer)
        return prompt, response

    def truncate(self, pairs: list[tuple[list[int], list[int]]], cutoff: int
                 ) -> tuple[list[tuple[list[int], list[int]]], bool]:
        """Cut turns to fit `cutoff` tokens, keeping prefixes; returns (pairs, truncated?)."""
        out, total, truncated = [], 0, False
        for source, target in pairs:
            if total >= cutoff:
                truncated = True
                break
            budget = cutoff - total
            if self.lf_truncation:
                s, t = infer_seqlen(len(source), len(target), budget)
            else:
                s, t = infer_max_len(len(source), len(target), budget)
            truncated |= s < len(source) or t < len(target)
            out.append((source[:s], target[:t]))
            total += s + t
        return out, truncated

    def source_labels(self, turn: int, length: int, eos_id: int) -> list[int]:
        """Labels of a prompt span: ignored, except the efficient-eos trick (the previous answer learns to stop)."""
        if self.efficient_eos and length > 0 and turn > 0:
            return [eos_id] + [IGNORE_INDEX] * (length - 1)
        return [IGNORE_INDEX] * length


@functools.lru_cache(maxsize=None)
def _thought_pattern(open_word: str, close_word: str) -> re.Pattern:
    return re.compile(f"{re.escape(open_word)}(.*?){re.escape(close_word)}", re.DOTALL)


_CACHE_MAX_CHARS, _CACHE_MAX_ENTRIES = 512, 50_000


class _TextEncoder:
    """`encode_text` for one tokenizer, as long as its length stays the same (it changes when tokens are added).

    A fast tokenizer is called through its Rust backend, which gives the same ids as `tokenizer.encode` at a
    fraction of the per-call cost: with `encode_batch_fast` (no offsets) where the backend has it and runs
    serially, and ASCII text skips the normalizer when that is a Unicode normalization form (a no-op on ASCII)
    by going through a second backend that shares the model and added tokens but has no normalizer. Mostly-ASCII
    text of byte-level BPE tokenizers with a known split skips the Rust pipeline altogether (`_WordEncoder`).
    """

    def __init__(self, tokenizer) -> None:
        self.vocab_size = len(tokenizer)
        self.cache: dict[str, list[int]] = {}  # short texts: system prompts, slot text, empty think blocks
        backend = getattr(tokenizer, "_tokenizer", None)
        self.backend = backend if backend is not None and hasattr(backend, "encode_batch") else None
        self.ascii_backend = _without_normalizer(self.backend) if self.backend is not None else None
        self.batch_fast = (self.backend is not None and hasattr(self.backend, "encode_batch_fast")
                           and not _tokenizers_parallel())
        self.words = _WordEncoder.build(self.backend)

    def encode(self, tokenizer, text: str) -> list[int]:
        ids = self.cache.get(text)
        if ids is None:
            ids = self._encode_uncached(tokenizer, text)
            if len(text) <= _CACHE_MAX_CHARS:
                if len(self.cache) >= _CACHE_MAX_ENTRIES:
                    self.cache.clear()
                self.cache[text] = ids
        return list(ids)

    def _encode_uncached(self, tokenizer, text: str) -> list[int]:
        if self.backend is None:
            return tokenizer.encode(text, add_special_tokens=False)
        if self.words is not None:
            ids = self.words.encode(text)
            if ids is not None:
                return ids
        backend = self.ascii_backend if self.ascii_backend is not None and text.isascii() else self.backend
        if self.batch_fast:
            return backend.encode_batch_fast([text], add_special_tokens=False)[0].ids
        return backend.encode(text, add_special_tokens=False).ids


# The pre-tokenizer splits of byte-level BPE tokenizers, as `tokenizers` runs them (Oniguruma), next to a Python
# `re` pattern that splits ASCII text the same way: on ASCII, \p{L} is [A-Za-z], \p{N} is [0-9], Oniguruma's \s is
# [\t\n\v\f\r ] (as `re.ASCII`'s), and the case-insensitive contractions have no case variants outside ASCII.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTRACTIONS = r"'(?:[sS]|[tT]|[rR][eE]|[vV][eE]|[mM]|[lL][lL]|[dD])"
_ASCII_SPLITS = {
    _QWEN2_SPLIT: _CONTRACTIONS + r"|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]| ?[^\sA-Za-z0-9]+[\r\n]*|\s*[\r\n]+"
                                  r"|\s+(?!\S)|\s+",
    _LLAMA3_SPLIT: _CONTRACTIONS + r"|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]{1,3}| ?[^\sA-Za-z0-9]+[\r\n]*|\s*[\r\n]+"
                                   r"|\s+(?!\S)|\s+",
}
# GPT-2's split, which a ByteLevel pre-tokenizer with use_regex runs: the contractions are case-sensitive there.
_GPT2_ASCII_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"
_WORD_CACHE_MAX = 200_000


class _WordEncoder:
    """Text -> ids for a byte-level BPE tokenizer, mostly in Python, with the ids `backend.encode` gives.

    The Rust call costs far more per word than the BPE itself (most words are in the model's cache): one word
    cache in Python, filled through the model, makes tokenizing text several times cheaper. Text is cut as
    `tokenizers` cuts it: at the added tokens (leftmost, longest first; those matched without normalization, then
    the backend's normalizer, then those matched after it), then by the pre-tokenizer's split, whose ASCII twin
    runs in `re`. A non-ASCII character is split as an ASCII stand-in of its class (letter, digit, space, other),
    found by running the backend's own pre-tokenizer on it; characters no stand-in fits (e.g. one that case-folds
    into a contraction) send their text to the Rust pipeline, as does mostly non-ASCII text, where the words
    repeat too seldom for the cache to pay. Only built for the splits in `_ASCII_SPLITS` (and GPT-2's).
    """

    def __init__(self, backend, split: str, added: dict[str, tuple[int, bool]]) -> None:
        from tokenizers import Tokenizer, pre_tokenizers

        self.split = re.compile(split, re.ASCII)
        self.added = {content: token_id for content, (token_id, _) in added.items()}
        # `tokenizers` matches the tokens it does not normalize first, then the others in the normalized pieces
        self.raw_tokens, self.normalized_tokens = (
            re.compile("(" + "|".join(re.escape(c) for c in sorted(group, key=len, reverse=True)) + ")")
            if group else None
            for group in ([c for c, (_, n) in added.items() if not n], [c for c, (_, n) in added.items() if n]))
        self.normalizer = backend.normalizer
        self.pre_tokenizer = backend.pre_tokenizer
        self.stand_ins: dict[str, str | None] = {}
        # one word, already split: the byte-level mapping and the shared model (and its cache) only
        self.words_backend = Tokenizer(backend.model)
        self.words_backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        self.cache: dict[str, list[int]] = {}
        self.max_words = _WORD_CACHE_MAX  # bounds the memory: a few hundred bytes a word

    @classmethod
    def build(cls, backend) -> "_WordEncoder | None":
        """The encoder for `backend`, or None when its pipeline is not one this class reproduces."""
        from tokenizers import models, normalizers

        if backend is None or not hasattr(backend, "encode_batch") or not isinstance(backend.model, models.BPE) \
                or backend.model.dropout:
            return None
        if backend.normalizer is not None and not isinstance(
                backend.normalizer, (normalizers.NFC, normalizers.NFD, normalizers.NFKC, normalizers.NFKD)):
            return None  # the Unicode forms leave ASCII as it is, so ASCII text need not be normalized
        if backend.truncation is not None or backend.padding is not None or backend.encode_special_tokens:
            return None
        split = _ascii_split(backend.pre_tokenizer)
        if split is None:
            return None
        added: dict[str, tuple[int, bool]] = {}
        for token_id, token in backend.get_added_tokens_decoder().items():
            if token.lstrip or token.rstrip or token.single_word or not token.content or token.content in added:
                return None
            added[token.content] = (token_id, token.normalized)
        return cls(backend, split, added)

    def encode(self, text: str) -> list[int] | None:
        """The ids of `text`; None where the Rust pipeline has to do it."""
        ascii_text = text.isascii()
        if not ascii_text and 4 * (len(text.encode("utf-8", "surrogatepass")) - len(text)) > len(text):
            return None
        parts = _cut(text, self.raw_tokens, self.added)  # text, and the ids of the added tokens found in it
        if not ascii_text and self.normalizer is not None:
            try:
                parts = [p if type(p) is int or p.isascii() else self.normalizer.normalize_str(p) for p in parts]
            except Exception:  # e.g. a lone surrogate: the Rust pipeline decides what happens
                return None
        if self.normalized_tokens is not None:
            parts = [q for p in parts for q in ([p] if type(p) is int else _cut(p, self.normalized_tokens, self.added))]
        ids: list[int] = []
        cache = self.cache
        for part in parts:
            if type(part) is int:
                ids.append(part)
                continue
            if not part:
                continue
            if part.isascii():
                words = self.split.findall(part)
            else:
                try:
                    stand_in = _NON_ASCII.sub(self._stand_in, part)
                except _NoStandIn:
                    return None
                ends = list(itertools.accumulate(map(len, self.split.findall(stand_in))))
                words = [part[i:j] for i, j in zip([0] + ends, ends)]
            if sum(map(len, words)) != len(part):
                return None
            done = len(ids)
            try:
                ids.extend(itertools.chain.from_iterable(map(cache.__getitem__, words)))
            except KeyError:  # extend kept the ids before the unknown word
                del ids[done:]
                self._learn(words)
                ids.extend(itertools.chain.from_iterable(map(cache.__getitem__, words)))
        return ids

    def _learn(self, words: list[str]) -> None:
        """Puts every word of `words` in the cache (one Rust call for those it lacks)."""
        missing = [w for w in dict.fromkeys(words) if w not in self.cache]
        if len(self.cache) + len(missing) > self.max_words:
            self.cache.clear()
            missing = list(dict.fromkeys(words))
        batch = getattr(self.words_backend, "encode_batch_fast", self.words_backend.encode_batch)
        encodings = batch([[w] for w in missing], is_pretokenized=True, add_special_tokens=False)
        self.cache.update(zip(missing, (e.ids for e in encodings)))

    def _stand_in(self, match: re.Match) -> str:
        char = match.group()
        stand_in = self.stand_ins.get(char, "")
        if stand_in == "":
            stand_in = self.stand_ins[char] = self._find_stand_in(char)
        if stand_in is None:
            raise _NoStandIn
        return stand_in

    def _find_stand_in(self, char: str) -> str | None:
        """The ASCII character the pre-tokenizer splits as it splits `char`, in every context that tells the
        split's character classes apart (letter, digit, space, newline, the literal space, and the letters of
        the case-insensitive contractions); None when none does."""
        def cuts(text: str) -> list[int]:
            return [end for _, (_, end) in self.pre_tokenizer.pre_tokenize_str(text)]

        try:
            seen = [cuts(probe.replace("C", char)) for probe in _PROBES]
        except Exception:
            return None
        for stand_in in _STAND_INS:
            if all(cuts(probe.replace("C", stand_in)) == cut for probe, cut in zip(_PROBES, seen)):
                return stand_in
        return None


class _NoStandIn(Exception):
    pass


def _cut(text: str, tokens: "re.Pattern | None", ids: dict[str, int]) -> list:
    """`text` cut at the added tokens `tokens` matches, the tokens replaced by their ids."""
    if tokens is None:
        return [text]
    # with a group, re.split puts the tokens it cuts at in the odd places
    return [ids[piece] if i % 2 else piece for i, piece in enumerate(tokens.split(text))]


_NON_ASCII = re.compile(r"[^\x00-\x7f]")
# A letter outside the contractions, a digit, a space that is neither " " nor a newline, and punctuation; the
# probes put the character ("C") next to each class and into each contraction.
_STAND_INS = ("a", "0", "\t", "!")
_PROBES = ("C", "xCx", "CCx", "1C1", " C", "C x", " Cx", "\nC", "C\n", "C\n\n", "!C!", "'Cx", "'Cex", "'Clx",
           "'rCx", "'vCx", "'lCx", "x'C")


def _ascii_split(pre_tokenizer) -> str | None:
    """The `re` pattern that splits ASCII text as `pre_tokenizer` does, None for other pre-tokenizers."""
    if pre_tokenizer is None:
        return None
    spec = json.loads(pre_tokenizer.__getstate__())
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}
    if spec.get("type") == "ByteLevel":
        if spec.get("add_prefix_space") is False and spec.get("use_regex") is True:
            return _GPT2_ASCII_SPLIT
        return None
    if spec.get("type") != "Sequence" or len(spec.get("pretokenizers", [])) != 2:
        return None
    split, last = spec["pretokenizers"]
    if {k: last.get(k) for k in byte_level} != byte_level:
        return None
    if (split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert")
            or set(split.get("pattern", {})) != {"Regex"}):
        return None
    return _ASCII_SPLITS.get(split["pattern"]["Regex"])


def _tokenizers_parallel() -> bool:
    """Whether the Rust batch calls would hand work to a thread pool (the `tokenizers` library's default), which
    costs more than it saves on one text and makes forked processes warn."""
    value = os.environ.get("TOKENIZERS_PARALLELISM")
    return value is None or value.strip().lower() not in ("", "off", "false", "f", "no", "n", "0")


def _without_normalizer(backend):
    """A backend that encodes ASCII text as `backend` does, minus its normalizer; None when that would not hold
    or the normalizer already does nothing."""
    from tokenizers import Tokenizer, normalizers

    # the Unicode normalization forms leave ASCII text as it is
    if not isinstance(backend.normalizer, (normalizers.NFC, normalizers.NFD, normalizers.NFKC, normalizers.NFKD)):
        return None
    clone = Tokenizer(backend.model)  # the model (vocabulary, merges, BPE cache) is shared, not copied
    for part in ("pre_tokenizer", "post_processor"):
        if getattr(backend, part) is not None:
            setattr(clone, part, getattr(backend, part))
    added = backend.get_added_tokens_decoder()
    for token_id in sorted(added):
        token = added[token_id]
        (clone.add_special_tokens if token.special else clone.add_tokens)([token])
    clone.encode_special_tokens = backend.encode_special_tokens
    if backend.truncation is not None:
        clone.enable_truncation(**backend.truncation)
    if backend.padding is not None:
        clone.enable_padding(**backend.padding)
    return clone if _added_tokens(clone) == _added_tokens(backend) else None


def _added_tokens(backend) -> dict[int, tuple]:
    return {i: (t.content, t.special, t.normalized, t.lstrip, t.rstrip, t.single_word)
            for i, t in backend.get_added_tokens_decoder().items()}


_ENCODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> _TextEncoder


def encode_text(tokenizer, text: str) -> list[int]:
    """`tokenizer.encode(text, add_special_tokens=False)`, the same ids at less cost (see `_TextEncoder`).
    Short texts repeat across samples and are remembered."""
    encoder = _ENCODERS.get(tokenizer)
    if encoder is None or encoder.vocab_size != len(tokenizer):
        encoder = _ENCODERS[tokenizer] = _TextEncoder(tokenizer)
    return encoder.encode(tokenizer, text)


def infer_seqlen(source_len: int, target_len: int, cutoff: int) -> tuple[int, int]:
    """LLaMA-Factory 0.9 rule: cut only the source when the target is short, else share the budget."""
    if target_len * 2 < cutoff:
        max_target = cutoff
    elif source_len * 2 < cutoff:
        max_target = cutoff - source_len
    else:
        max_target = int(cutoff * (target_len / (source_len + target_len)))
    new_target = min(max_target, target_len)
    new_source = min(max(cutoff - new_target, 0), source_len)
    return new_source, new_target


def infer_max_len(source_len: int, target_len: int, cutoff: int) -> tuple[int, int]:
    """Classic rule: proportional split of the budget, at least one target token."""
    if source_len + target_len <= cutoff:
        return source_len, target_len
    max_target = max(int(cutoff * (target_len / (source_len + target_len))), 1)
    max_source = cutoff - min(max_target, target_len)
    return min(max_source, source_len), min(max_target, target_len)


def entry_slots(entry: dict, key: str) -> Slots | None:
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TemplateError(f"template {entry.get('name')!r}: {key} must be an object with 'slots'")
    return list(value.get("slots", []))


def load_templates(path: str | Path = DEFAULT_TEMPLATES_PATH) -> dict[str, dict]:
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TemplateError(f"cannot read templates from {path}: {exc}") from None
    return {entry["name"]: entry for entry in entries}


def template_names(path: str | Path = DEFAULT_TEMPLATES_PATH) -> list[str]:
    return sorted(load_templates(path))


def fix_tokenizer(tokenizer, template: ChatTemplate) -> None:
    """Make the tokenizer agree with the template, as MindSpeed-LLM and LLaMA-Factory do: with `replace_eos` the
    first stop word becomes eos; the other stop words (all of them without `replace_eos`) become special tokens, so
    each is one id; pad falls back to eos.

    Unlike the reference tool, existing additional special tokens are kept and an eos that is already right is
    left alone, as LLaMA-Factory does.
    """
    if template.replace_eos and template.stop_words:
        stop = template.stop_words[0]
        if tokenizer.eos_token != stop:
            tokenizer.add_special_tokens({"eos_token": stop})
    if tokenizer.eos_token_id is None:
        tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    words = template.stop_words[1:] if template.replace_eos else template.stop_words
    extra = [w for w in words if w not in tokenizer.all_special_tokens]
    if extra:
        # the keyword that keeps the existing additional special tokens was renamed in transformers 5
        params = inspect.signature(tokenizer.add_special_tokens).parameters
        keep = "replace_extra_special_tokens" if "replace_extra_special_tokens" in params else \
            "replace_additional_special_tokens"
        tokenizer.add_special_tokens({"additional_special_tokens": extra}, **{keep: False})
