"""Templates that must render as MindSpeed-LLM's `configs/finetune/templates.json` defines them.

Each expectation is written by hand from MindSpeed-LLM's entry (slots, default system, eos handling) and compared
with what `encode_instruction` builds on the tiny Qwen-style tokenizer: the decoded ids and the decoded trained
tokens (labels != -100). glm4_moe and deepseek4 are also compared token for token with MindSpeed-LLM HEAD's own
entries (shared/reference/mindspeed_templates_head_extra.json beside the checkout).
"""
import json
import re

import pytest
from transformers import AutoTokenizer

from mindspeed_llm.data.encode import EncodeOptions, encode_instruction
from mindspeed_llm.data.handlers import Conversation
from mindspeed_llm.data.prompt_type import get_template
from mindspeed_llm.data.templates import IGNORE_INDEX
from mindspeed_llm.errors import UserError
from mindspeed_llm.tokenizer import build_tokenizer
from tests.conftest import REPO

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
R1_USER = ("<|im_start|>user\nA conversation between User and Assistant. The user asks a question, and the Assistant "
           "solves it. The assistant first thinks about the reasoning process in the mind and then provides the user "
           "with the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
           "</answer> tags, respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>"
           "Put your final answer within \\\\boxed{{}}. {}<|im_end|>\n<|im_start|>assistant\n")

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
    # qwen_r1: the R1 instruction ends `</answer>Put your final answer within \\boxed{}. ` (two backslashes: the
    # JSON text of MindSpeed-LLM's entry has four); tool results are `tool` turns as in qwen
    ("qwen_r1", TOOL_TURNS, "",
     IM.format("system", "You are a helpful assistant.") + R1_USER.format("Q") + "A<|im_end|>\n"
     + IM.format("tool", "R") + "<|im_start|>assistant\nB<|im_end|>", "A<|im_end|>B<|im_end|>"),
    ("qwen_r1", TWO_TURNS, "S",
     IM.format("system", "S") + R1_USER.format("Q") + "A<|im_end|>\n" + R1_USER.format("Q2") + "B<|im_end|>",
     "A<|im_end|>B<|im_end|>"),
    ("minicpm3", TWO_TURNS, "S",
     "S\n\nUser: Q\n\nAssistant:A{eos}User: Q2\n\nAssistant:B{eos}", "A{eos}B{eos}"),
    ("intern2", TWO_TURNS, "S",
     IM.format("system", "S") + IM.format("user", "Q") + "<|im_start|>assistant\nA<|im_end|>\n"
     + IM.format("user", "Q2") + "<|im_start|>assistant\nB<|im_end|>\n", "A<|im_end|>\nB<|im_end|>\n"),
    ("hunyuan", TWO_TURNS, "", "You are a helpful assistant.QAQ2B", "AB"),
    ("trl", TWO_TURNS, "S", "SQAQ2B", "AB"),
    # plm: MindSpeed-LLM's default system; no separator; a tool result renders with the user slot
    ("plm", TOOL_TURNS, "",
     IM.format("system", "You are a helpful assistant.") + IM.format("user", "Q") + "<|im_start|>assistant\n"
     "A<|im_end|>\n" + IM.format("user", "R") + "<|im_start|>assistant\nB<|im_end|>\n", "A<|im_end|>\nB<|im_end|>\n"),
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


@pytest.mark.parametrize("name,messages,system,text,trained", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
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


# ---- glm4 / glm4_moe --------------------------------------------------------------------------------------------
GLM_CASES = [
    ("glm4", TWO_TURNS, "S", None,
     "[gMASK]<sop><|system|>\nS<|user|>\nQ<|assistant|>\nA<|user|>\nQ2<|assistant|>\nB{eos}", "\nA{eos}\nB{eos}"),
    ("glm4_moe", TWO_TURNS[:2], "", None,
     "[gMASK]<sop><|user|>\nQ<|assistant|><think>\n\n</think>\n\n\nA{eos}", "\nA{eos}"),
    ("glm4_moe", TWO_TURNS[:2], "", True,
     "[gMASK]<sop><|user|>\nQ<|assistant|><think>\n\n</think>\n\n\nA{eos}", "<think>\n\n</think>\n\n\nA{eos}"),
]


@pytest.mark.parametrize("name,messages,system,thinking,text,trained", GLM_CASES,
                         ids=["glm4", "glm4_moe-none", "glm4_moe-true"])
def test_glm4_renders_as_mindspeed(tiny_qwen3, name, messages, system, thinking, text, trained):
    """Slots as MindSpeed-LLM's entries; efficient eos (one eos closes the sample, a later turn's first prompt token
    is labelled eos); glm4_moe adds the empty thought (to the prompt, or to the answer with thinking on)."""
    template = get_template(name, enable_thinking=thinking)
    tok = build_tokenizer(str(tiny_qwen3), template=template)
    enc = encode_instruction(Conversation(messages, system, ""), template, tok, EncodeOptions())
    assert tok.decode(enc.fields["input_ids"]) == text.replace("{eos}", tok.eos_token)
    trained_ids = [t for t in enc.fields["labels"] if t != IGNORE_INDEX]
    assert tok.decode(trained_ids) == trained.replace("{eos}", tok.eos_token)


@pytest.mark.parametrize("name,thought", [("glm4", ""), ("glm4_moe", EMPTY_THOUGHT)])
def test_glm4_function_call_and_stop_words(tiny_qwen3, name, thought):
    """A call is `name\narguments` with no eos; without replace_eos every stop word is added as a special token
    (MindSpeed-LLM's tokenizer fix), so `<|user|>` and `<|observation|>` are one id each. glm4_moe (thinking
    none) ends each prompt with the empty thought, a call's prompt too."""
    tok, text, trained = _render(tiny_qwen3, name, CALL_TURNS, "", "")
    for word in ("<|user|>", "<|observation|>"):
        assert len(tok.encode(word, add_special_tokens=False)) == 1
    call = 'get_weather\n{"city": "Paris"}'
    assert text == ("[gMASK]<sop><|user|>\nQ<|assistant|>" + thought + call + "<|observation|>\n21<|assistant|>"
                    + thought + "\nB" + tok.eos_token)
    assert trained == call + tok.eos_token + "\nB" + tok.eos_token


# ---- deepseek4 ------------------------------------------------------------------------------------------------
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
U, AS = "<｜User｜>", "<｜Assistant｜>"
DS_TURNS = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>\nr\n</think>\n\nA"},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "<think>r2</think>B"}]
EFFORT = ("Reasoning Effort: Absolute maximum with no shortcuts permitted.\nYou MUST be very thorough in your thinking "
          "and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic "
          "against all potential paths, edge cases, and adversarial scenarios.\nExplicitly write out your entire "
          "deliberation process, documenting every intermediate step, considered alternative, and rejected "
          "hypothesis to ensure absolutely no assumption is left unchecked.\n\n")
WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
WEATHER_LINE = ('{"name": "get_weather", "description": "Weather of a city", "parameters": {"type": "object", '
                '"properties": {"city": {"type": "string"}}}}')


def ds_tools(schema_line: str) -> str:
    """DeepSeek-V4's tool section, as MindSpeed-LLM's DeepSeek4Template writes it."""
    return ('\n\n## Tools\n\nYou have access to a set of tools to help answer the user\'s question. You can invoke '
            'tools by writing a "<｜DSML｜tool_calls>" block like the following:\n\n<｜DSML｜tool_calls>\n'
            '<｜DSML｜invoke name="$TOOL_NAME">\n<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">'
            '$PARAMETER_VALUE</｜DSML｜parameter>\n...\n</｜DSML｜invoke>\n<｜DSML｜invoke name="$TOOL_NAME2">\n...\n'
            '</｜DSML｜invoke>\n</｜DSML｜tool_calls>\n\nString parameters should be specified as is and set '
            '`string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format '
            'and set `string="false"`.\n\nIf thinking_mode is enabled (triggered by <think>), you MUST output your '
            'complete reasoning inside <think>...</think> BEFORE any tool calls or final response.\n\nOtherwise, '
            'output directly after </think> with tool calls or final response.\n\n### Available Tool Schemas\n\n'
            f'{schema_line}\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke '
            'tool calls.\n')


def _ds(tok_dir, conv: Conversation, thinking=None, seq_length=None, **options):
    template = get_template("deepseek4", enable_thinking=thinking, **options)
    tok = build_tokenizer(str(tok_dir), template=template)
    enc = encode_instruction(conv, template, tok, EncodeOptions(seq_length))
    ids, labels = enc.fields["input_ids"], enc.fields["labels"]
    return tok.decode(ids), tok.decode([t for t in labels if t != IGNORE_INDEX]), ids


DS_CASES = [  # thinking, options, full text, trained text
    (None, {}, f"{BOS}S{U}Q{AS}</think>A{EOS}{U}Q2{AS}</think>B{EOS}", f"A{EOS}B{EOS}"),
    (False, {}, f"{BOS}S{U}Q{AS}</think>A{EOS}{U}Q2{AS}</think>B{EOS}", f"A{EOS}B{EOS}"),
    # drop_thinking (default): only the answer after the last user message keeps its reasoning
    (True, {}, f"{BOS}S{U}Q{AS}</think>A{EOS}{U}Q2{AS}<think>r2</think>B{EOS}", f"A{EOS}r2</think>B{EOS}"),
    (True, {"drop_thinking": False, "reasoning_effort": "max"},
     f"{BOS}{EFFORT}S{U}Q{AS}<think>r</think>A{EOS}{U}Q2{AS}<think>r2</think>B{EOS}",
     f"r</think>A{EOS}r2</think>B{EOS}"),
    (True, {"reasoning_effort": "high"}, f"{BOS}S{U}Q{AS}</think>A{EOS}{U}Q2{AS}<think>r2</think>B{EOS}",
     f"A{EOS}r2</think>B{EOS}"),
]


@pytest.mark.parametrize("thinking,options,text,trained", DS_CASES,
                         ids=["none", "false", "true", "true-keep-max", "true-high"])
def test_deepseek4_thinking_modes(tiny_qwen3, thinking, options, text, trained):
    got_text, got_trained, _ = _ds(tiny_qwen3, Conversation(DS_TURNS, "S", ""), thinking, **options)
    assert (got_text, got_trained) == (text, trained)


def test_deepseek4_openai_tool_calls(tiny_qwen3):
    """OpenAI data: tools listed after the system text, reasoning_content and the reply text before a DSML call
    block, the tool result as a user turn. With tools, SFT data keeps every turn's reasoning."""
    from mindspeed_llm.data.handlers import build_handler, to_conversation

    call = {"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}
    record = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                           {"role": "assistant", "content": "Let me check.", "reasoning_content": "need data",
                            "tool_calls": [call]},
                           {"role": "tool", "tool_call_id": "c1", "content": "21"},
                           {"role": "assistant", "content": "<think>\nok\n</think>\n\nIt is 21."}],
              "tools": [{"type": "function", "function": WEATHER}]}
    conv = to_conversation(build_handler("OpenAIInstructionHandler", None), record)
    dsml = ('\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
            '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
    text, trained, _ = _ds(tiny_qwen3, conv, thinking=True)
    first = f"need data</think>Let me check.{dsml}{EOS}"
    assert text == (f"{BOS}S{ds_tools(WEATHER_LINE)}{U}Q{AS}<think>" + first
                    + f"{U}<tool_result>21</tool_result>{AS}<think>ok</think>It is 21.{EOS}")
    assert trained == first + f"ok</think>It is 21.{EOS}"
    text, trained, _ = _ds(tiny_qwen3, conv, thinking=None)
    assert trained == f"Let me check.{dsml}{EOS}It is 21.{EOS}"
    assert text.endswith(f"{U}<tool_result>21</tool_result>{AS}</think>It is 21.{EOS}")


def test_deepseek4_pairwise_drops_history_reasoning_even_with_tools(tiny_qwen3):
    """Pairwise data (one prompt, two answers) follows drop_thinking whether or not tools are given."""
    from mindspeed_llm.data.encode import encode_pairwise

    template = get_template("deepseek4", enable_thinking=True)
    tok = build_tokenizer(str(tiny_qwen3), template=template)
    tools = json.dumps([WEATHER])   # a bare schema is taken as the function
    conv = Conversation(DS_TURNS[:3], "", tools, chosen={"role": "assistant", "content": "<think>c</think>C"},
                        rejected={"role": "assistant", "content": "D"})
    f = encode_pairwise(conv, template, tok, EncodeOptions()).fields
    prompt = f"{BOS}{ds_tools(WEATHER_LINE)}{U}Q{AS}</think>A{EOS}{U}Q2{AS}<think>"
    assert tok.decode(f["chosen_input_ids"]) == prompt + f"c</think>C{EOS}"
    assert tok.decode(f["rejected_input_ids"]) == prompt + f"</think>D{EOS}"
    assert tok.decode([t for t in f["rejected_labels"] if t != IGNORE_INDEX]) == f"</think>D{EOS}"


def test_deepseek4_generation_prompt_and_truncation(tiny_qwen3):
    from mindspeed_llm.inference.prompts import PromptBuilder

    template = get_template("deepseek4")
    tok = build_tokenizer(str(tiny_qwen3), template=template)
    assert tok.decode(PromptBuilder(tok, template).from_text("Q")) == f"{BOS}{U}Q{AS}</think>"
    # LLaMA-Factory 0.9 truncation: a short answer is kept whole and the long prompt is cut
    long_turn = [{"role": "user", "content": "kalomi " * 60}, {"role": "assistant", "content": "A"}]
    text, trained, ids = _ds(tiny_qwen3, Conversation(long_turn, "", ""), seq_length=64)
    assert trained == f"A{EOS}" and len(ids) == 64   # the answer is 2 tokens; the old rule would keep 1


def test_deepseek4_reasoning_effort_needs_thinking_on_the_command_line(tmp_path):
    from mindspeed_llm.arguments import parse_preprocess_args

    base = ["--input", "x.json", "--output-prefix", str(tmp_path / "o"), "--prompt-type", "deepseek4"]
    with pytest.raises(UserError, match="--reasoning-effort requires --enable-thinking true"):
        parse_preprocess_args(base + ["--reasoning-effort", "max"])
    args = parse_preprocess_args(base + ["--reasoning-effort", "max", "--enable-thinking", "true",
                                         "--drop-thinking", "false"])
    assert (args.reasoning_effort, args.drop_thinking) == ("max", False)


# ---- MindSpeed-LLM HEAD's own glm4_moe and deepseek4 entries --------------------------------------------------------
HEAD_EXTRA = REPO.parent / "shared" / "reference" / "mindspeed_templates_head_extra.json"
GLM_CONVERSATIONS = {  # system, messages: thoughts spelled with the full thought words, a call and its result
    "plain": ("S", TWO_TURNS),
    "thought": ("S", [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>\nr\n</think>\n\nA"},
                      {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "B"}]),
    "call": ("", CALL_TURNS),
}


@pytest.fixture(scope="module")
def head_entries() -> dict[str, dict]:
    if not HEAD_EXTRA.is_file():
        pytest.skip(f"{HEAD_EXTRA} is absent: MindSpeed-LLM HEAD's extra entries live in shared/reference beside the "
                    "checkout")
    return {entry["name"]: entry for entry in json.loads(HEAD_EXTRA.read_text(encoding="utf-8"))["templates"]}


def mindspeed_slot_turns(entry: dict, messages: list[dict], system: str, thinking) -> list[tuple[list, list]]:
    """(prompt pieces, answer pieces) per turn as MindSpeed-LLM renders a slot entry with string slots: the first
    `{{content}}` of a slot replaced, a call's `{{name}}` and `{{arguments}}` taken from its JSON, no tool text for a
    format other than `default`, and a ReasoningTemplate's empty thought (thought words with their newlines) added
    to the prompt, or with thinking on to the answer, of every turn whose answer has none."""
    def fill(key: str, content: str) -> list[str]:
        slots = entry[key]["slots"]
        assert all(isinstance(slot, str) for slot in slots)
        return [slot.replace("{{content}}", content, 1) for slot in slots]

    first, second = entry.get("thought_words", ["<think>\n", "\n</think>\n\n"])
    reasoning = entry.get("template_class") == "ReasoningTemplate"
    thought = re.compile(re.escape(first) + ".*?" + re.escape(second), re.DOTALL)
    turns = []
    for i in range(0, len(messages), 2):
        question, answer = messages[i], messages[i + 1]
        prompt = []
        if i == 0:
            prompt += entry["format_prefix"]["slots"] + (fill("format_system", system) if system else [])
        prompt += fill("format_user" if question["role"] == "user" else "format_observation", question["content"])
        content = answer["content"]
        if answer["role"] == "function":
            call = json.loads(content)
            arguments = json.dumps(call["arguments"], ensure_ascii=False)
            reply = [slot.replace("{{name}}", call["name"]).replace("{{arguments}}", arguments)
                     for slot in entry["format_function"]["slots"]]
        else:
            if reasoning and thinking is False:
                content = thought.sub("", content).lstrip("\n")
            reply = fill("format_assistant", content)
        if reasoning and first not in content and second not in content:
            if thinking:
                reply = [first + second] + reply
            else:
                prompt = prompt + [first + second]
        turns.append((prompt, reply))
    return turns


@pytest.mark.parametrize("conversation", list(GLM_CONVERSATIONS))
@pytest.mark.parametrize("thinking", [None, True, False], ids=["none", "true", "false"])
def test_glm4_moe_tokens_as_mindspeed_head_entry(tiny_qwen3, head_entries, conversation, thinking):
    """Our glm4_moe gives, token for token, what MindSpeed-LLM HEAD's entry defines: each slot piece tokenized on
    its own, prompts masked, efficient eos (the later prompts' first label and one closing eos)."""
    head = head_entries["glm4_moe"]
    assert head["efficient_eos"] and "default_system" not in head
    template = get_template("glm4_moe", enable_thinking=thinking)
    assert (template.stop_words, template.format_prefix) == (head["stop_words"], head["format_prefix"]["slots"])
    tok = build_tokenizer(str(tiny_qwen3), template=template)
    system, messages = GLM_CONVERSATIONS[conversation]
    ids, labels = [], []
    for turn, (prompt, reply) in enumerate(mindspeed_slot_turns(head, messages, system, thinking)):
        prompt_ids = [t for piece in prompt for t in tok.encode(piece, add_special_tokens=False)]
        reply_ids = [t for piece in reply for t in tok.encode(piece, add_special_tokens=False)]
        ids += prompt_ids + reply_ids
        labels += ([tok.eos_token_id] if turn else [IGNORE_INDEX]) + [IGNORE_INDEX] * (len(prompt_ids) - 1) + reply_ids
    ids, labels = ids + [tok.eos_token_id], labels + [tok.eos_token_id]
    enc = encode_instruction(Conversation(messages, system, ""), template, tok, EncodeOptions())
    assert tok.decode(enc.fields["input_ids"]) == tok.decode(ids)
    assert (enc.fields["input_ids"], enc.fields["labels"]) == (ids, labels)


@pytest.mark.parametrize("thinking", [None, True], ids=["chat", "thinking"])
def test_deepseek4_tokens_as_mindspeed_head_entry(tiny_qwen3, head_entries, thinking):
    """Our deepseek4 entry is MindSpeed-LLM HEAD's: its stop word (the end-of-sentence text) is added as one special
    token without replacing the tokenizer's eos, and the thinking marks are its thought words. Each prompt and each
    answer is one text; history reasoning is dropped."""
    head = head_entries["deepseek4"]
    assert (head["replace_eos"], head["efficient_eos"]) == (False, False)
    (stop,), (opens, closes) = head["stop_words"], head["thought_words"]
    template = get_template("deepseek4", enable_thinking=thinking)
    assert (template.stop_words, list(template.thought_words)) == (head["stop_words"], head["thought_words"])
    assert (template.replace_eos, template.efficient_eos) == (False, False)
    tok = build_tokenizer(str(tiny_qwen3), template=template)
    assert tok.eos_token == AutoTokenizer.from_pretrained(str(tiny_qwen3)).eos_token
    stop_id = tok.convert_tokens_to_ids(stop)
    assert stop in tok.all_special_tokens and stop_id != tok.unk_token_id

    def encode(text: str) -> list[int]:   # the stop word is one id wherever it stands
        pieces = [tok.encode(piece, add_special_tokens=False) for piece in text.split(stop)]
        return [t for k, piece in enumerate(pieces) for t in ([stop_id] if k else []) + piece]

    texts = [f"{BOS}S{U}Q{AS}{closes}", f"A{stop}"]   # the history answer: chat form, its reasoning dropped
    texts += [f"{U}Q2{AS}{opens}", f"r2{closes}B{stop}"] if thinking else [f"{U}Q2{AS}{closes}", f"B{stop}"]
    enc = encode_instruction(Conversation(DS_TURNS, "S", ""), template, tok, EncodeOptions())
    ids = [t for text in texts for t in encode(text)]
    labels = [label for k, text in enumerate(texts)
              for label in (encode(text) if k % 2 else [IGNORE_INDEX] * len(encode(text)))]
    assert (enc.fields["input_ids"], enc.fields["labels"]) == (ids, labels)
