"""Templates that must render as MindSpeed-LLM's `configs/finetune/templates.json` defines them.

Each expectation is written by hand from MindSpeed-LLM's entry (slots, default system, eos handling) and compared
with what `encode_instruction` builds on the tiny Qwen-style tokenizer: the decoded ids and the decoded trained
tokens (labels != -100).
"""
import json

import pytest

from mindspeed_llm.data.encode import EncodeOptions, encode_instruction
from mindspeed_llm.data.handlers import Conversation
from mindspeed_llm.data.templates import IGNORE_INDEX, get_template
from mindspeed_llm.tokenizer import build_tokenizer

IM = "<|im_start|>{}\n{}<|im_end|>\n"
TWO_TURNS = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
             {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "B"}]
TOOL_TURNS = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
              {"role": "observation", "content": "R"}, {"role": "assistant", "content": "B"}]
MAGISTRAL_SYSTEM = (
    "system_prompt\n\nA user will ask you to solve a task. You should first draft your thinking process (inner "
    "monologue) until you have derived the final answer. Afterwards, write a self-contained summary of your thoughts "
    "(i.e. your summary should be succinct but contain all the critical steps you needed to reach the conclusion). You "
    "should use Markdown to format your response. Write both your thoughts and summary in the same language as the "
    "task posed by the user. NEVER use \\boxed{} in your response.\nYour thinking process must follow the template "
    "below:\n<think>\nYour thoughts or/and draft, like working through an exercise on scratch paper. Be as casual and "
    "as long as you want until you are confident to generate a correct answer.\n</think>\nHere, provide a concise "
    "summary that reflects your reasoning and presents a clear final answer to the user. Don't mention that this is a "
    "summary.\n\nProblem:\n\n")
EMPTY_THOUGHT = "<think>\n\n</think>\n\n"

# name, messages, system, expected full text, expected trained text ({eos}: the tokenizer's eos after the fix)
CASES = [
    ("qwen", TOOL_TURNS, "",
     IM.format("system", "You are a helpful assistant.") + IM.format("user", "Q") + "<|im_start|>assistant\nA<|im_end|>"
     + "\n" + IM.format("tool", "R") + "<|im_start|>assistant\nB<|im_end|>", "A<|im_end|>B<|im_end|>"),
    ("chatml", TOOL_TURNS, "",
     IM.format("user", "Q") + "<|im_start|>assistant\nA<|im_end|>\n" + IM.format("tool", "R")
     + "<|im_start|>assistant\nB<|im_end|>", "A<|im_end|>B<|im_end|>"),
    ("chatml_de", TOOL_TURNS[:2], "",
     IM.format("system", "Du bist ein freundlicher und hilfsbereiter KI-Assistent.") + IM.format("user", "Q")
     + "<|im_start|>assistant\nA<|im_end|>", "A<|im_end|>"),
    ("qwen_math_r1", TOOL_TURNS, "S",
     IM.format("system", "S") + IM.format("user", "Q") + "<|im_start|>assistant\nA<|im_end|>\n" + IM.format("tool", "R")
     + "<|im_start|>assistant\nB<|im_end|>", "A<|im_end|>B<|im_end|>"),
    ("qwen_r1", TWO_TURNS[:2], "",
     IM.format("system", "You are a helpful assistant.") + "<|im_start|>user\nA conversation between User and "
     "Assistant. The user asks a question, and the Assistant solves it. The assistant first thinks about the reasoning "
     "process in the mind and then provides the user with the answer. The reasoning process and answer are enclosed "
     "within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process here "
     "</think><answer> answer here </answer>. User: Q<|im_end|>\n<|im_start|>assistant\nA<|im_end|>",
     "A<|im_end|>"),
    ("minicpm3", TWO_TURNS, "S",
     "S\n\nUser: Q\n\nAssistant:A{eos}User: Q2\n\nAssistant:B{eos}", "A{eos}B{eos}"),
    ("intern2", TWO_TURNS, "S",
     IM.format("system", "S") + IM.format("user", "Q") + "<|im_start|>assistant\nA<|im_end|>\n"
     + IM.format("user", "Q2") + "<|im_start|>assistant\nB<|im_end|>\n", "A<|im_end|>\nB<|im_end|>\n"),
    ("hunyuan", TWO_TURNS, "", "You are a helpful assistant.QAQ2B", "AB"),
    ("trl", TWO_TURNS, "S", "SQAQ2B", "AB"),
    ("plm", TWO_TURNS[:2], "S",
     IM.format("system", "S") + IM.format("user", "Q") + "<|im_start|>assistant\nA<|im_end|>\n", "A<|im_end|>\n"),
    ("magistral", TWO_TURNS[:2], "",
     f"[SYSTEM_PROMPT]{MAGISTRAL_SYSTEM}[/SYSTEM_PROMPT][INST]Q[/INST]{EMPTY_THOUGHT}A{{eos}}", "A{eos}"),
    ("gpt_oss", TWO_TURNS[:2], "",
     "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.<|end|>"
     "<|start|>user<|message|>Q<|end|><|start|>assistant"
     "<|channel|>analysis<|message|><|end|><|start|>assistant<|channel|>final<|message|>A<|end|>{eos}",
     "A<|end|>{eos}"),
    ("bailing_mini", TOOL_TURNS, "S",
     "<role>SYSTEM</role>S<|role_end|><role>HUMAN</role>Q<|role_end|><role>ASSISTANT</role>A<|role_end|>"
     "<role>OBSERVATION</role>\n<tool_response>\nR\n</tool_response><|role_end|><role>ASSISTANT</role>B<|role_end|>"
     "{eos}", "A<|role_end|>{eos}B<|role_end|>{eos}"),
]


@pytest.mark.parametrize("name,messages,system,text,trained", CASES, ids=[c[0] for c in CASES])
def test_renders_as_mindspeed(tiny_qwen3, name, messages, system, text, trained):
    template = get_template(name)
    tok = build_tokenizer(str(tiny_qwen3), template=template)
    enc = encode_instruction(Conversation(messages, system, ""), template, tok, EncodeOptions())
    ids, labels = enc.fields["input_ids"], enc.fields["labels"]
    assert tok.decode(ids) == text.replace("{eos}", tok.eos_token)
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == trained.replace("{eos}", tok.eos_token)


def test_chatglm3_system_opens_with_gmask_sop_in_the_system_turn(tiny_qwen3):
    """chatglm3_system has no prefix: [gMASK] and sop are the first tokens of its system slot (always present,
    the entry has a default system)."""
    template = get_template("chatglm3_system")
    tok = build_tokenizer(str(tiny_qwen3), template=template)
    tok.add_special_tokens({"additional_special_tokens": ["[gMASK]", "sop", "<|system|>", "<|user|>",
                                                          "<|assistant|>"]}, replace_extra_special_tokens=False)
    assert "<|observation|>" in tok.all_special_tokens  # the second stop word, added by the template fix
    enc = encode_instruction(Conversation(TWO_TURNS[:2], "", ""), template, tok, EncodeOptions())
    assert tok.decode(enc.fields["input_ids"]) == (
        "[gMASK]sop<|system|>\nYou are ChatGLM3, a large language model trained by Zhipu.AI. Follow the user's "
        "instructions carefully. Respond using markdown.<|user|>\nQ<|assistant|>\nA" + tok.eos_token)
    assert template.format_prefix == []
    enc = encode_instruction(Conversation(CALL_TURNS, "", ""), template, tok, EncodeOptions())
    text = tok.decode(enc.fields["input_ids"])
    assert '<|assistant|>get_weather\n{"city": "Paris"}<|observation|>\n21<|assistant|>\nB' in text


TOOLS = json.dumps([{"name": "get_weather", "description": "Weather of a city",
                     "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "name"}},
                                    "required": ["city"]}}])
CALL = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
CALL_TURNS = [{"role": "user", "content": "Q"}, {"role": "function", "content": CALL},
              {"role": "observation", "content": "21"}, {"role": "assistant", "content": "B"}]


def _render(tok_dir, name, messages, system, tools):
    template = get_template(name)
    tok = build_tokenizer(str(tok_dir), template=template)
    enc = encode_instruction(Conversation(messages, system, tools), template, tok, EncodeOptions())
    return tok, tok.decode(enc.fields["input_ids"]), tok.decode([t for t in enc.fields["labels"] if t != IGNORE_INDEX])


def test_qwen_react_tools_and_call(tiny_qwen3):
    """MindSpeed-LLM's default tool text (LLaMA-Factory 0.8 wording) and `Action: {{name}}\\nAction Input:
    {{arguments}}` + eos for a function call."""
    _, text, trained = _render(tiny_qwen3, "qwen", CALL_TURNS, "", TOOLS)
    tool_text = ("You have access to the following tools:\n> Tool Name: get_weather\nTool Description: Weather of a "
                 "city\nTool Args:\n  - city (string, required): name\n\nUse the following format if using a tool:\n"
                 "```\nAction: tool name (one of [get_weather]).\nAction Input: the input to the tool, in a JSON "
                 'format representing the kwargs (e.g. ```{"input": "hello world", "num_beams": 5}```).\n```\n')
    call = 'Action: get_weather\nAction Input: {"city": "Paris"}<|im_end|>'
    assert text == (IM.format("system", "You are a helpful assistant." + tool_text) + IM.format("user", "Q")
                    + "<|im_start|>assistant\n" + call + "\n" + IM.format("tool", "21")
                    + "<|im_start|>assistant\nB<|im_end|>")
    assert trained == call + "B<|im_end|>"


def test_bailing_mini_ling_tools_and_call(tiny_qwen3):
    tok, text, trained = _render(tiny_qwen3, "bailing_mini", CALL_TURNS, "S", TOOLS)
    tool = json.dumps({"type": "function", "function": json.loads(TOOLS)[0]})
    tool_text = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
                 f"with function signatures within <tools></tools> XML tags:\n<tools>\n{tool}\n</tools>\n\nFor each "
                 "function call, return a json object with function name and arguments within <tool_call></tool_call>"
                 ' XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
                 "\ndetailed thinking off")
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|role_end|>'
    assert text == (f"<role>SYSTEM</role>S{tool_text}<|role_end|><role>HUMAN</role>Q<|role_end|><role>ASSISTANT</role>"
                    f"{call}<role>OBSERVATION</role>\n<tool_response>\n21\n</tool_response><|role_end|>"
                    f"<role>ASSISTANT</role>B<|role_end|>{tok.eos_token}")
    assert trained == call + tok.eos_token + "B<|role_end|>" + tok.eos_token
