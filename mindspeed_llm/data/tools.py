"""Tool descriptions and function calls rendered in the formats chat templates name (`tool_format`).

- `default`: ReAct text ("You have access to the following tools: ..." / "Action: ... Action Input: ...");
- `qwen`: Qwen2.5/Qwen3 `<tools>` JSON in the system prompt and `<tool_call>` JSON blocks;
- `glm4`: GLM-4 "# 可用工具" sections and "name\\narguments" calls;
- `ling`: Ling/Bailing: the Qwen prompt without its leading blank lines, ending "detailed thinking off"; Qwen calls.
Tools arrive as the JSON text of a list of function schemas; calls as the JSON text of one call or a list.
"""
from __future__ import annotations

import json
import re

from mindspeed_llm.errors import UserError

TOOL_FORMATS = ("default", "qwen", "glm4", "ling")

REACT_PROMPT = (
    "You have access to the following tools:\n{tool_text}"
    "Use the following format if using a tool:\n"
    "```\n"
    "Action: tool name (one of [{tool_names}]).\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    '(e.g. ```{{"input": "hello world", "num_beams": 5}}```).\n'
    "```\n"
)
QWEN_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, '
    '"arguments": <args-json-object>}}\n</tool_call>'
)
GLM4_PROMPT = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。# 可用工具{tool_text}"
)


class ToolFormatError(UserError):
    pass


def _check_format(tool_format: str) -> None:
    if tool_format not in TOOL_FORMATS:
        raise ToolFormatError(f"tool_format {tool_format!r} is not one of {TOOL_FORMATS}")


def format_tools(tools_json: str, tool_format: str) -> str:
    """The tool section appended to the system prompt."""
    _check_format(tool_format)
    try:
        tools = json.loads(tools_json)
    except json.JSONDecodeError as exc:
        raise ToolFormatError(f"tools is not valid JSON ({exc.msg}): {tools_json[:80]!r}") from None
    if not tools:
        return ""
    if tool_format in ("qwen", "ling"):
        text = ""
        for tool in tools:
            wrapped = tool if tool.get("type") == "function" else {"type": "function", "function": tool}
            text += "\n" + json.dumps(wrapped, ensure_ascii=False)
        prompt = QWEN_PROMPT.format(tool_text=text)
        return prompt if tool_format == "qwen" else prompt.lstrip("\n") + "\ndetailed thinking off"
    if tool_format == "glm4":
        text = ""
        for tool in tools:
            tool = tool.get("function", tool) if tool.get("type") == "function" else tool
            text += (f"\n\n## {tool['name']}\n\n{json.dumps(tool, indent=4, ensure_ascii=False)}\n"
                     "在调用上述函数时，请使用 Json 格式表示调用的参数。")
        return GLM4_PROMPT.format(tool_text=text)
    text, names = "", []
    for tool in tools:
        tool = tool.get("function", "") if tool.get("type") == "function" else tool
        params = ""
        schema = tool.get("parameters", {}) or {}
        for name, param in (schema.get("properties") or {}).items():
            required = ", required" if name in schema.get("required", []) else ""
            enum = ", should be one of [{}]".format(", ".join(param["enum"])) if param.get("enum") else ""
            items = ", where each item should be {}".format(param["items"].get("type", "")) if param.get("items") else ""
            params += f"  - {name} ({param.get('type', '')}{required}): {param.get('description', '')}{enum}{items}\n"
        text += f"> Tool Name: {tool['name']}\nTool Description: {tool.get('description', '')}\nTool Args:\n{params}\n"
        names.append(tool["name"])
    return REACT_PROMPT.format(tool_text=text, tool_names=", ".join(names))


def parse_function_calls(content: str) -> list[tuple[str, str]]:
    """[(name, arguments as JSON text)] from a function-call message."""
    try:
        calls = json.loads(content)
    except json.JSONDecodeError:
        raise ToolFormatError(f"function call is not valid JSON: {content[:80]!r}") from None
    calls = calls if isinstance(calls, list) else [calls]
    try:
        return [(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in calls]
    except (KeyError, TypeError):
        raise ToolFormatError(f"function call needs 'name' and 'arguments': {content[:80]!r}") from None


def format_function_calls(content: str, tool_format: str) -> str:
    """The text of an assistant's function-call turn. A leading <think>...</think> block is kept in front."""
    _check_format(tool_format)
    thought = re.search(r"<think>(.*?)</think>", content, re.DOTALL)
    if thought:
        content = content.replace(thought.group(0), "")
    calls = parse_function_calls(content)
    if tool_format in ("qwen", "ling"):
        texts = [json.dumps({"name": n, "arguments": json.loads(a)}, ensure_ascii=False) for n, a in calls]
        text = "\n".join(f"<tool_call>\n{t}\n</tool_call>" for t in texts)
    elif tool_format == "glm4":
        if len(calls) > 1:
            raise ToolFormatError("the glm4 tool format takes one function call per turn")
        text = f"{calls[0][0]}\n{calls[0][1]}"
    else:
        text = "\n".join(f"Action: {n}\nAction Input: {a}" for n, a in calls)
    return (thought.group(0) + text) if thought else text
