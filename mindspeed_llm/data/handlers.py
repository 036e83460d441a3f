"""Handlers: one raw record -> a `Conversation` (messages, system, tools), or a `Skip` with a reason.

The handler names are the ones recipes pass as `--handler-name`. Column and tag names default to the
Alpaca/ShareGPT conventions and are remapped with `--map-keys` (a JSON object):
- Alpaca: prompt, query, response, history, system, chosen, rejected (a falsy value disables a column);
- ShareGPT: messages, system, tools, chosen, rejected, and `tags` {role_tag, content_tag, user_tag,
  assistant_tag, observation_tag, function_tag, system_tag} (tags not given keep their defaults).
ShareGPT data that holds OpenAI-style `messages` with role/content (and no `conversations` column) is
recognised without any mapping.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from mindspeed_llm.errors import UserError

INSTRUCTION_HANDLERS = ("AlpacaStyleInstructionHandler", "SharegptStyleInstructionHandler", "OpenAIInstructionHandler")
PAIRWISE_HANDLERS = ("AlpacaStylePairwiseHandler", "SharegptStylePairwiseHandler")
PRETRAIN_HANDLERS = ("GeneralPretrainHandler",)
HANDLERS = PRETRAIN_HANDLERS + INSTRUCTION_HANDLERS + PAIRWISE_HANDLERS

ALPACA_KEYS = {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
               "system": "system", "chosen": "chosen", "rejected": "rejected"}
SHAREGPT_KEYS = {"messages": "conversations", "system": "system", "tools": "tools", "chosen": "chosen",
                 "rejected": "rejected"}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "observation_tag": "tool", "function_tag": "function_call", "system_tag": "system"}


class Skip(Exception):
    """The record cannot become a training sample; `reason` is counted in the summary."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Conversation:
    """`messages` alternate user/observation (even) and assistant/function (odd) roles.

    Instruction data ends with one answer; pairwise data ends with the prompt and keeps both answers in
    `chosen` and `rejected`. OpenAI messages may also carry `reasoning_content` and, on a function turn made
    from `tool_calls`, `text` (the reply written beside the calls); only the deepseek4 template reads them.
    """
    messages: list[dict]
    system: str = ""
    tools: str = ""
    chosen: dict | None = None
    rejected: dict | None = None


@dataclass
class HandlerSpec:
    name: str
    style: str                      # "alpaca" | "sharegpt" | "pretrain"
    pairwise: bool
    keys: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)

    @property
    def output_fields(self) -> list[str]:
        if self.style == "pretrain":
            return []
        if self.pairwise:
            return ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"]
        return ["input_ids", "attention_mask", "labels"]


def build_handler(name: str, map_keys: dict | None) -> HandlerSpec:
    """Validate `--handler-name` and `--map-keys` together."""
    if name not in HANDLERS:
        raise UserError(f"--handler-name {name!r} is unknown; valid: {', '.join(HANDLERS)}")
    map_keys = dict(map_keys or {})
    if name in PRETRAIN_HANDLERS:
        if map_keys:
            raise UserError("--map-keys applies to the instruction and pairwise handlers, not GeneralPretrainHandler "
                            "(use --json-keys)")
        return HandlerSpec(name, "pretrain", False)
    pairwise = name in PAIRWISE_HANDLERS
    if name.startswith("Alpaca"):
        keys = dict(ALPACA_KEYS)
        _merge_keys(keys, map_keys, name)
        return HandlerSpec(name, "alpaca", pairwise, keys=keys)
    keys = dict(SHAREGPT_KEYS)
    tags = dict(OPENAI_TAGS if name == "OpenAIInstructionHandler" else SHAREGPT_TAGS)
    if name == "OpenAIInstructionHandler":
        keys["messages"] = "messages"
    tag_map = map_keys.pop("tags", None)
    _merge_keys(keys, map_keys, name)
    if tag_map is not None:
        if not isinstance(tag_map, dict):
            raise UserError(f"--map-keys 'tags' must be an object with keys from {sorted(SHAREGPT_TAGS)}")
        unknown = sorted(set(tag_map) - set(SHAREGPT_TAGS))
        if unknown:
            raise UserError(f"--map-keys tags {unknown} are unknown; valid: {', '.join(SHAREGPT_TAGS)}")
        tags.update(tag_map)
    return HandlerSpec(name, "sharegpt", pairwise, keys=keys, tags=tags)


def _merge_keys(keys: dict, map_keys: dict, handler: str) -> None:
    unknown = sorted(set(map_keys) - set(keys))
    if unknown:
        raise UserError(f"--map-keys {unknown} are not keys of {handler}; valid: {', '.join(keys)}")
    keys.update(map_keys)


def check_columns(spec: HandlerSpec, columns: list[str], source: str) -> HandlerSpec:
    """Fail early, naming the missing column, the columns found and the fix; auto-detect OpenAI messages."""
    found = ", ".join(columns)
    if spec.style == "alpaca":
        required = ["prompt"] + (["chosen", "rejected"] if spec.pairwise else ["response"])
        missing = [k for k in required if spec.keys.get(k) and spec.keys[k] not in columns]
        if missing:
            names = ", ".join(f"{spec.keys[k]!r} ({k})" for k in missing)
            mapping = ", ".join(f'"{k}": "<column>"' for k in missing)
            raise UserError(f"{source}: column {names} not found; columns are [{found}]; "
                            f"map with --map-keys '{{{mapping}}}'")
    elif spec.style == "sharegpt":
        col = spec.keys["messages"]
        if col not in columns:
            if col == SHAREGPT_KEYS["messages"] and "messages" in columns:
                spec.keys["messages"] = "messages"
                if spec.tags == SHAREGPT_TAGS:
                    spec.tags = dict(OPENAI_TAGS)
            else:
                raise UserError(f"{source}: column {col!r} (messages) not found; columns are [{found}]; "
                                f"map it with --map-keys '{{\"messages\": \"<column>\"}}'")
        if spec.pairwise:
            for key in ("chosen", "rejected"):
                if spec.keys[key] not in columns:
                    raise UserError(f"{source}: column {spec.keys[key]!r} ({key}) not found; columns are [{found}]; "
                                    f"map it with --map-keys '{{\"{key}\": \"<column>\"}}'")
    return spec


def _text(value) -> str:
    return "" if value is None else str(value)


def to_conversation(spec: HandlerSpec, record: dict) -> Conversation:
    if spec.style == "alpaca":
        return _alpaca(spec, record)
    return _sharegpt(spec, record)


def _alpaca(spec: HandlerSpec, record: dict) -> Conversation:
    keys = spec.keys
    messages: list[dict] = []
    history = record.get(keys["history"]) if keys.get("history") else None
    if isinstance(history, list):
        for turn in history:
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
                raise Skip("bad_history")
            messages += [{"role": "user", "content": _text(turn[0])},
                         {"role": "assistant", "content": _text(turn[1])}]
    parts = [_text(record.get(keys[k])) for k in ("prompt", "query") if keys.get(k)]
    query = "\n".join(p for p in parts if p)
    if not query:
        raise Skip("empty_prompt")
    messages.append({"role": "user", "content": query})
    system = _text(record.get(keys["system"])) if keys.get("system") else ""
    if spec.pairwise:
        chosen, rejected = record.get(keys["chosen"]), record.get(keys["rejected"])
        if isinstance(chosen, list):  # the old layout "output": [chosen, rejected]
            chosen, rejected = chosen[0], rejected[1] if isinstance(rejected, list) else chosen[1]
        if chosen is None or rejected is None:
            raise Skip("missing_chosen_or_rejected")
        return _pairwise(messages, system, "", {"role": "assistant", "content": _text(chosen)},
                         {"role": "assistant", "content": _text(rejected)})
    response = record.get(keys["response"])
    if isinstance(response, list):
        if len(response) != 1:
            raise Skip("multiple_responses")
        response = response[0]
    if response is None:
        raise Skip("empty_response")
    messages.append({"role": "assistant", "content": _text(response)})
    return Conversation(messages, system)


def _pairwise(messages: list[dict], system: str, tools: str, chosen: dict, rejected: dict) -> Conversation:
    """A preference pair, unless it cannot teach a preference: identical answers give DPO a zero gradient,
    and an empty rejected answer is a malformed record."""
    if not rejected["content"].strip():
        raise Skip("empty_rejected")
    if chosen == rejected:
        raise Skip("chosen_equals_rejected")
    return Conversation(messages, system, tools, chosen=chosen, rejected=rejected)


_EVEN_ROLES = ("user", "observation")
_ODD_ROLES = ("assistant", "function")


def _sharegpt(spec: HandlerSpec, record: dict) -> Conversation:
    keys, tags = spec.keys, spec.tags
    raw = record.get(keys["messages"])
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise Skip("messages_not_a_list") from None
    if not isinstance(raw, list) or not raw:
        raise Skip("empty_conversation")
    role_of = {tags.get("user_tag"): "user", tags.get("assistant_tag"): "assistant",
               tags.get("observation_tag"): "observation", tags.get("function_tag"): "function",
               tags.get("system_tag"): "system"}
    role_of.pop(None, None)
    system = ""
    first = raw[0] if isinstance(raw[0], dict) else {}
    if tags.get("system_tag") and first.get(tags["role_tag"]) == tags["system_tag"]:
        system = _text(first.get(tags["content_tag"]))
        raw = raw[1:]
    elif keys.get("system"):
        system = _text(record.get(keys["system"]))
    messages = []
    for msg in raw:
        if not isinstance(msg, dict):
            raise Skip("message_not_an_object")
        role = role_of.get(msg.get(tags["role_tag"]))
        content = msg.get(tags["content_tag"])
        if role is None or role == "system":
            raise Skip("unknown_role")
        extra = {}
        if role == "assistant" and isinstance(msg.get("reasoning_content"), str):
            extra["reasoning_content"] = msg["reasoning_content"]   # OpenAI reasoning; read by deepseek4 only
        if role == "assistant" and msg.get("tool_calls"):  # OpenAI tool calls become a function turn
            if content:
                extra["text"] = _text(content)   # the reply written beside the calls; read by deepseek4 only
            role, content = "function", json.dumps(
                [c.get("function", c) for c in msg["tool_calls"]], ensure_ascii=False)
        if isinstance(content, (dict, list)):
            content = json.dumps(content, ensure_ascii=False)
        messages.append({"role": role, "content": _text(content), **extra})
    for i, msg in enumerate(messages):
        if msg["role"] not in (_EVEN_ROLES if i % 2 == 0 else _ODD_ROLES):
            raise Skip("bad_role_order")
    tools = record.get(keys["tools"]) if keys.get("tools") else None
    if isinstance(tools, (list, dict)):
        tools = json.dumps(tools, ensure_ascii=False)
    tools = _text(tools)
    if spec.pairwise:
        if len(messages) % 2 != 1:
            raise Skip("pairwise_prompt_not_odd")
        answers = []
        for key in ("chosen", "rejected"):
            ans = record.get(keys[key])
            if not isinstance(ans, dict):
                raise Skip(f"{key}_not_a_message")
            role = role_of.get(ans.get(tags["role_tag"]), "assistant")
            answers.append({"role": role if role in _ODD_ROLES else "assistant",
                            "content": _text(ans.get(tags["content_tag"]))})
        return _pairwise(messages, system, tools, answers[0], answers[1])
    if len(messages) % 2 != 0:
        raise Skip("odd_message_count")
    return Conversation(messages, system, tools)
