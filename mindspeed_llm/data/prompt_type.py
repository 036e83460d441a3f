"""`--prompt-type NAME`: the template object of an entry of `configs/finetune/templates.json` (a `ChatTemplate`, or
the `DeepSeek4Template` that builds on it)."""
from __future__ import annotations

from pathlib import Path

from mindspeed_llm.data.deepseek4 import DeepSeek4Template
from mindspeed_llm.data.templates import (DEFAULT_TEMPLATES_PATH, DEFAULT_THOUGHT_WORDS, ChatTemplate, TemplateError,
                                          entry_slots, load_templates)


def get_template(name: str, path: str | Path = DEFAULT_TEMPLATES_PATH, enable_thinking: bool | None = None,
                 reasoning_effort: str | None = None, drop_thinking: bool = True) -> ChatTemplate:
    """The template NAME of PATH; `reasoning_effort` and `drop_thinking` apply to DeepSeek4Template only."""
    entries = load_templates(path)
    if name not in entries:
        raise TemplateError(f"--prompt-type {name!r} is not in {path}; valid: {', '.join(sorted(entries))}")
    entry = entries[name]
    system = entry.get("default_system", "")
    function = entry.get("format_function") or {}
    fields = dict(
        name=name,
        template_class=entry.get("template_class", "Template"),
        format_user=entry_slots(entry, "format_user") or ["{{content}}"],
        format_assistant=entry_slots(entry, "format_assistant"),
        format_system=entry_slots(entry, "format_system"),
        format_function=entry_slots(entry, "format_function"),
        function_tool_format=function.get("tool_format", "default"),
        format_observation=entry_slots(entry, "format_observation"),
        tool_format=(entry.get("format_tools") or {}).get("tool_format", "default"),
        format_separator=entry_slots(entry, "format_separator") or [],
        format_prefix=entry_slots(entry, "format_prefix") or [],
        default_system="".join(system) if isinstance(system, list) else system,
        stop_words=list(entry.get("stop_words", [])),
        efficient_eos=bool(entry.get("efficient_eos", False)),
        replace_eos=bool(entry.get("replace_eos", False)),
        thought_words=tuple(entry.get("thought_words", DEFAULT_THOUGHT_WORDS)),
        enable_thinking=enable_thinking,
    )
    if fields["template_class"] == "DeepSeek4Template":
        return DeepSeek4Template(**fields, reasoning_effort=reasoning_effort, drop_thinking=drop_thinking)
    return ChatTemplate(**fields)
