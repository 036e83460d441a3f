"""Prompt ids from text or messages (a --prompt-type template, the tokenizer's chat template, or raw text), and
the stop criteria that go with them."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from mindspeed_llm.errors import UserError
from mindspeed_llm.inference.generation import StopCriteria

_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "tool": "observation", "function_call": "function"}


class PromptBuilder:
    """How the prompt of one request becomes token ids.

    * `--prompt-type X`: template X's encoding of the history plus an empty assistant turn, prompt part only
      (for reasoning templates with thinking not enabled, the empty `<think>` block ends the prompt);
    * `--hf-chat-template`: `tokenizer.apply_chat_template(..., add_generation_prompt=True)`;
    * neither: plain text is encoded as is (no special tokens added), as the reference scripts do; message
      lists then use the tokenizer's chat template when it has one.
    """

    def __init__(self, tokenizer, template=None, hf_chat_template: bool = False,
                 enable_thinking: Optional[bool] = None) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.hf_chat_template = hf_chat_template
        self.enable_thinking = enable_thinking

    @property
    def templated(self) -> bool:
        return self.template is not None or self.hf_chat_template

    def from_text(self, text: str) -> list[int]:
        if self.templated:
            return self.from_messages([{"role": "user", "content": text}])
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def from_messages(self, messages: list[dict[str, Any]]) -> list[int]:
        messages = _check_messages(messages)
        if self.template is not None:
            return self._template_ids(messages)
        if self.hf_chat_template or getattr(self.tokenizer, "chat_template", None):
            return self._hf_ids(messages)
        raise UserError("a message list needs a chat template: pass --prompt-type or --hf-chat-template (the "
                        "tokenizer has no chat template of its own)")

    def _template_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        system = ""
        if messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        turns = [dict(m, role=_ROLE_ALIASES.get(m["role"], m["role"])) for m in messages]
        if not turns or turns[-1]["role"] not in ("user", "observation"):
            raise UserError("the last message must come from the user (the model answers it)")
        prompt, _ = self.template.encode_oneturn(self.tokenizer, turns + [{"role": "assistant", "content": ""}],
                                                 system)
        return list(prompt)

    def _hf_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        kwargs = {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}
        try:
            out = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, **kwargs)
        except Exception as exc:   # jinja errors carry the template's own message
            raise UserError(f"the tokenizer's chat template failed on these messages: {exc}") from None
        if hasattr(out, "keys") and "input_ids" in out:
            out = out["input_ids"]
        if out and isinstance(out[0], list):
            out = out[0]
        return list(out)


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise UserError("messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"message {i} must be an object with string \"role\" and \"content\"")
    return messages


def stop_criteria(tokenizer, template=None) -> StopCriteria:
    """Stop at the tokenizer's eos, the model's generation_config eos ids, and the template's stop words."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    ids.update(_generation_config_eos(getattr(tokenizer, "name_or_path", "")))
    sequences = []
    for word in (template.stop_words if template is not None else []):
        encoded = tokenizer.encode(word, add_special_tokens=False)
        if len(encoded) == 1:
            ids.add(int(encoded[0]))
        elif encoded:
            sequences.append(tuple(encoded))
    if not ids and not sequences:
        raise UserError("the tokenizer has no eos token and no stop word is configured; pass --prompt-type")
    return StopCriteria(frozenset(ids), tuple(sequences))


def _generation_config_eos(path: str) -> list[int]:
    """eos ids of `generation_config.json` next to the tokenizer (Qwen3 lists <|im_end|> and <|endoftext|>)."""
    file = Path(path) / "generation_config.json" if path else None
    if file is None or not file.is_file():
        return []
    try:
        eos = json.loads(file.read_text()).get("eos_token_id")
    except (OSError, ValueError):
        return []
    if isinstance(eos, int):
        return [eos]
    return [int(e) for e in eos] if isinstance(eos, list) else []
