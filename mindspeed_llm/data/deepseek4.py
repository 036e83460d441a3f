"""The DeepSeek-V4 chat format (`template_class: DeepSeek4Template`, entry `deepseek4`), written as MindSpeed-LLM's
DeepSeek4Template writes it. The class produces the text itself; the entry's slots are not used.

    <｜begin▁of▁sentence｜>{effort}{system}{tools}<｜User｜>{question}<｜Assistant｜>{mark}{answer}<｜end▁of▁sentence｜>
    <｜User｜><tool_result>{result}</tool_result><｜Assistant｜>{mark}{answer}<｜end▁of▁sentence｜>

Chat mode (`--enable-thinking` false or none): every mark is `</think>` and reasoning is not rendered. Thinking mode
(`--enable-thinking true`): the mark is `<think>` and an answer is `{reasoning}</think>{text}`; with `drop_thinking`
only the answer to the last user message keeps its reasoning, earlier turns get the chat-mode form. In SFT data
(`encode_multiturn`) a conversation with tools keeps every turn's reasoning.

Reasoning is the `reasoning_content` of an OpenAI message when present, else a leading `<think>...</think>` block of
the answer. Tool calls (function messages) are DSML blocks after the answer text; tools are listed after the system
text. Each prompt and each answer is tokenized as one text, as MindSpeed-LLM does.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from mindspeed_llm.data.templates import ChatTemplate, TemplateError, encode_text
from mindspeed_llm.data.tools import ToolFormatError

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK_START, THINK_END = "<think>", "</think>"
DSML = "｜DSML｜"
REASONING_EFFORTS = (None, "max", "high")
# Only "max" changes the text: this paragraph opens the first message.
EFFORT_MAX_PROMPT = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, "
    "rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)
# A thought at the start of an answer; the whitespace around its text and after it is not part of either.
_LEADING_THOUGHT = re.compile(r"^\s*<think>\s*(.*?)\s*</think>\s*", re.DOTALL)


def tools_prompt(schemas: list[dict]) -> str:
    """The tool section that follows the system text (after a blank line): usage, then one JSON schema a line."""
    listed = "\n".join(json.dumps(schema, ensure_ascii=False) for schema in schemas)
    return (
        "## Tools\n\nYou have access to a set of tools to help answer the user's question. You can invoke tools by "
        f'writing a "<{DSML}tool_calls>" block like the following:\n\n'
        f"<{DSML}tool_calls>\n"
        f'<{DSML}invoke name="$TOOL_NAME">\n'
        f'<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>\n'
        f"...\n</{DSML}invoke>\n"
        f'<{DSML}invoke name="$TOOL_NAME2">\n'
        f"...\n</{DSML}invoke>\n"
        f"</{DSML}tool_calls>\n\n"
        'String parameters should be specified as is and set `string="true"`. For all other types (numbers, '
        'booleans, arrays, objects), pass the value in JSON format and set `string="false"`.\n\n'
        f"If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning inside "
        f"{THINK_START}...{THINK_END} BEFORE any tool calls or final response.\n\n"
        f"Otherwise, output directly after {THINK_END} with tool calls or final response.\n\n"
        f"### Available Tool Schemas\n\n{listed}\n\n"
        "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
    )


def parse_tool_schemas(tools_json: str) -> list[dict]:
    """Function schemas from the tools column: OpenAI entries (`{"type": "function", "function": {...}}`) give their
    `function`; a bare schema is taken as it is. Anything but a non-empty list means no tools."""
    if not tools_json or not tools_json.strip():
        return []
    try:
        tools = json.loads(tools_json)
    except json.JSONDecodeError as exc:
        raise ToolFormatError(f"tools is not valid JSON ({exc.msg}): {tools_json[:80]!r}") from None
    if not isinstance(tools, list):
        return []
    if not all(isinstance(tool, dict) for tool in tools):
        raise ToolFormatError(f"tools must be a list of objects: {tools_json[:80]!r}")
    return [tool["function"] if "function" in tool else tool for tool in tools]


def _arguments(value) -> dict:
    # JSON text is decoded; text that is not JSON, and values that are neither text nor an object, become one
    # parameter named "arguments" (as MindSpeed-LLM does).
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        return {"arguments": value}
    try:
        decoded = json.loads(value)
    except json.JSONDecodeError:
        return {"arguments": value}
    if not isinstance(decoded, dict):
        raise ToolFormatError(f"function arguments must be a JSON object: {value[:80]!r}")
    return decoded


def dsml_calls(calls_json: str) -> str:
    """The DSML block of a function message (one call or a list of calls, each with `name` and `arguments`)."""
    try:
        calls = json.loads(calls_json)
    except json.JSONDecodeError:
        raise ToolFormatError(f"function call is not valid JSON: {calls_json[:80]!r}") from None
    invokes = []
    for call in calls if isinstance(calls, list) else [calls]:
        if not isinstance(call, dict) or "name" not in call:
            raise ToolFormatError(f"function call needs 'name' and 'arguments': {calls_json[:80]!r}")
        params = []
        for key, value in _arguments(call.get("arguments", {})).items():
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            kind = "true" if isinstance(value, str) else "false"
            params.append(f'<{DSML}parameter name="{key}" string="{kind}">{text}</{DSML}parameter>')
        invokes.append(f'<{DSML}invoke name="{call["name"]}">\n' + "\n".join(params) + f"\n</{DSML}invoke>")
    return f"\n\n<{DSML}tool_calls>\n" + "\n".join(invokes) + f"\n</{DSML}tool_calls>"


def leading_thought(text: str) -> tuple[str, str]:
    """(thought, rest of text); the thought is empty when the text does not start with one."""
    match = _LEADING_THOUGHT.match(text)
    return (match.group(1), text[match.end():]) if match else ("", text)


def split_reasoning(message: dict, text: str) -> tuple[str, str]:
    """(reasoning, rest of text): the message's `reasoning_content` when it has one, else a leading thought."""
    if "reasoning_content" in message:
        return message["reasoning_content"] or "", text
    return leading_thought(text)


@dataclass
class DeepSeek4Template(ChatTemplate):
    reasoning_effort: str | None = None   # --reasoning-effort: None, "max" or "high"
    drop_thinking: bool = True            # --drop-thinking

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reasoning_effort not in REASONING_EFFORTS:
            raise TemplateError(f"reasoning effort must be one of max, high; got {self.reasoning_effort!r}")

    @property
    def thinking(self) -> bool:
        return bool(self.enable_thinking)

    def _texts(self, messages: list[dict], system: str, tools: str, drop: bool) -> list[str]:
        """One text per message; the first also carries the bos text, the effort paragraph and the system turn.
        The entry's default system is not used (MindSpeed-LLM's class reads only the sample's)."""
        schemas = parse_tool_schemas(tools)
        last_user = (len(messages) - 1) // 2 * 2   # messages alternate: user turns are the even ones
        texts = []
        for i, message in enumerate(messages):
            role, content = message["role"], message["content"]
            if role in ("user", "observation"):
                body = content if role == "user" else f"<tool_result>{content}</tool_result>"
                opens = self.thinking and (not drop or i == last_user)
                text = USER + body + ASSISTANT + (THINK_START if opens else THINK_END)
            elif role in ("assistant", "function"):
                if role == "assistant":
                    reasoning, answer = split_reasoning(message, content)
                    calls = ""
                else:   # a tool call: optional reply text (OpenAI content), reasoning, then the DSML block
                    reasoning, answer = split_reasoning(message, message.get("text", ""))
                    thought, calls_json = leading_thought(content)   # LLaMA-Factory style: thought + JSON
                    reasoning, calls = reasoning or thought, dsml_calls(calls_json)
                keeps = self.thinking and (not drop or i > last_user)
                text = (reasoning + THINK_END if keeps else "") + answer + calls + EOS
            else:
                raise TemplateError(f"role {role!r} is not one of user, assistant, observation, function")
            texts.append(text)
        if texts:
            effort = EFFORT_MAX_PROMPT if self.thinking and self.reasoning_effort == "max" else ""
            head = system + ("\n\n" + tools_prompt(schemas) if schemas else "")
            texts[0] = BOS + effort + head + texts[0]
        return texts

    def _ids(self, tokenizer, text: str) -> list[int]:
        return encode_text(tokenizer, text) if text else []

    def encode_multiturn(self, tokenizer, messages: list[dict], system: str = "", tools: str = ""
                         ) -> list[tuple[list[int], list[int]]]:
        # SFT data: a conversation with tools keeps the reasoning of every turn.
        drop = self.drop_thinking and self.thinking and not parse_tool_schemas(tools)
        texts = self._texts(messages, system, tools, drop)
        return [(self._ids(tokenizer, texts[i]), self._ids(tokenizer, texts[i + 1]))
                for i in range(0, len(texts) - 1, 2)]

    def encode_oneturn(self, tokenizer, messages: list[dict], system: str = "", tools: str = ""
                       ) -> tuple[list[int], list[int]]:
        # Pairwise data and generation prompts: history reasoning follows drop_thinking, tools or not.
        texts = self._texts(messages, system, tools, self.drop_thinking and self.thinking)
        return self._ids(tokenizer, "".join(texts[:-1])), self._ids(tokenizer, texts[-1])
