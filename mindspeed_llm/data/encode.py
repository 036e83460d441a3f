"""A conversation -> token ids and labels, the part of preprocessing that runs in the worker processes.

Labels are unshifted copies of the ids on supervised tokens and -100 elsewhere: every assistant turn,
its end-of-turn token included, is trained; prompts, system text and tool results are not. The model
shifts labels by one when it computes the loss.
"""
from __future__ import annotations

from dataclasses import dataclass

from mindspeed_llm.data.handlers import Conversation, HandlerSpec, Skip, to_conversation
from mindspeed_llm.data.templates import IGNORE_INDEX, ChatTemplate
from mindspeed_llm.data.tools import ToolFormatError


@dataclass
class EncodeOptions:
    seq_length: int | None = None  # the budget; None: no truncation
    append_eod: bool = False
    pack: bool = False              # packed rows reserve one token for padding, as LLaMA-Factory does


@dataclass
class Encoded:
    fields: dict[str, list[int]]
    truncated: bool
    supervised: int


def _budget(template: ChatTemplate, opts: EncodeOptions) -> int | None:
    """Tokens the template may use, so the finished sample (eos, eod, pad reserve) fits in --seq-length."""
    if opts.seq_length is None:
        return None
    reserve = int(template.efficient_eos) + int(opts.append_eod) + int(opts.pack)
    return opts.seq_length - reserve


def encode_instruction(conv: Conversation, template: ChatTemplate, tokenizer, opts: EncodeOptions) -> Encoded:
    pairs = template.encode_multiturn(tokenizer, conv.messages, conv.system, conv.tools)
    budget = _budget(template, opts)
    truncated = False
    if budget is not None:
        pairs, truncated = template.truncate(pairs, budget)
    input_ids: list[int] = []
    labels: list[int] = []
    eos = tokenizer.eos_token_id
    for turn, (source, target) in enumerate(pairs):
        input_ids += source + target
        labels += template.source_labels(turn, len(source), eos) + target
    if template.efficient_eos:
        input_ids.append(eos)
        labels.append(eos)
    if opts.append_eod:
        input_ids.append(eos)
        labels.append(eos)
    supervised = len(labels) - labels.count(IGNORE_INDEX)
    if supervised == 0:
        raise Skip("no_supervised_tokens")
    return Encoded({"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels},
                   truncated, supervised)


def encode_pairwise(conv: Conversation, template: ChatTemplate, tokenizer, opts: EncodeOptions) -> Encoded:
    fields: dict[str, list[int]] = {}
    # The shared prompt is the one encoded with the chosen answer (it decides where an empty think block goes).
    prompt_ids, chosen = template.encode_oneturn(tokenizer, conv.messages + [conv.chosen], conv.system, conv.tools)
    _, rejected = template.encode_oneturn(tokenizer, conv.messages + [conv.rejected], conv.system, conv.tools)
    answers = {"chosen": chosen, "rejected": rejected}
    if template.efficient_eos:
        answers = {k: v + [tokenizer.eos_token_id] for k, v in answers.items()}
    truncated = False
    budget = _budget(template, opts)
    if budget is not None:
        longest = max(len(a) for a in answers.values())
        s, t = _pair_budget(template, len(prompt_ids), longest, budget)
        truncated = s < len(prompt_ids) or t < longest
        prompt_ids = prompt_ids[:s]
        answers = {k: v[:t] for k, v in answers.items()}
    for name, answer in answers.items():
        fields[f"{name}_input_ids"] = prompt_ids + answer
        fields[f"{name}_labels"] = [IGNORE_INDEX] * len(prompt_ids) + answer
    return Encoded(fields, truncated, len(answers["chosen"]) + len(answers["rejected"]))


def _pair_budget(template: ChatTemplate, source: int, target: int, budget: int) -> tuple[int, int]:
    pairs, _ = template.truncate([([0] * source, [0] * target)], budget)
    return (len(pairs[0][0]), len(pairs[0][1])) if pairs else (0, 0)


def encode_record(record: dict, spec: HandlerSpec, template: ChatTemplate | None, tokenizer,
                  opts: EncodeOptions, json_keys: list[str]) -> Encoded:
    """Raises `Skip` for records that cannot be a sample."""
    if spec.style == "pretrain":
        return encode_pretrain(record, tokenizer, opts, json_keys)
    conv = to_conversation(spec, record)
    try:
        if spec.pairwise:
            return encode_pairwise(conv, template, tokenizer, opts)
        return encode_instruction(conv, template, tokenizer, opts)
    except ToolFormatError:
        raise Skip("bad_tool_json") from None


def encode_pretrain(record: dict, tokenizer, opts: EncodeOptions, json_keys: list[str]) -> Encoded:
    fields = {}
    for key in json_keys:
        text = record.get(key)
        if not text:
            raise Skip(f"empty_{key}")
        ids = tokenizer(str(text))["input_ids"]  # with special tokens, e.g. a BOS for Llama tokenizers
        if opts.append_eod:
            ids.append(tokenizer.eos_token_id)
        fields[key] = ids
    return Encoded(fields, False, sum(len(v) for v in fields.values()))
