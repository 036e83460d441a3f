"""Chat templates and truncation against hand-written renders (reference spec §2.4, §4.4-4.6, §5.2)."""
import json

import pytest

from mindspeed_llm.data.prompt_type import get_template
from mindspeed_llm.data.templates import IGNORE_INDEX, infer_max_len, infer_seqlen, template_names, \
    fix_tokenizer
from mindspeed_llm.data.encode import EncodeOptions, encode_instruction, encode_pairwise
from mindspeed_llm.data.handlers import Conversation
from mindspeed_llm.data.writer import greedy_knapsack
from mindspeed_llm.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tiny_qwen3):
    return tiny_qwen3


def encode(tok_dir, name, messages, system="", tools="", thinking=None, seq_length=None, append_eod=False):
    template = get_template(name, enable_thinking=thinking)
    tok = build_tokenizer(str(tok_dir), template=template)
    enc = encode_instruction(Conversation(messages, system, tools), template, tok,
                             EncodeOptions(seq_length, append_eod))
    ids, labels = enc.fields["input_ids"], enc.fields["labels"]
    trained = [t for t in labels if t != IGNORE_INDEX]
    return tok, tok.decode(ids), tok.decode(trained), ids, labels


def segments(tok, *parts):
    """Ids of text parts each tokenized on its own, as templates do per message."""
    return [i for p in parts for i in tok.encode(p, add_special_tokens=False)]


def msgs(*pairs):
    out = []
    for q, a in pairs:
        out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return out


def test_every_listed_prompt_type_exists():
    names = set(template_names())
    for name in ["qwen", "qwen_lf", "qwen3", "chatml", "llama2", "llama3", "mistral", "deepseek", "deepseek2",
                 "deepseek3", "glm4", "yi", "baichuan2", "default", "empty", "alpaca", "gemma", "chatglm3"]:
        assert name in names


def test_qwen_classic_with_system_and_history(tok_dir):
    tok, text, trained, ids, labels = encode(tok_dir, "qwen", msgs(("q0", "a0"), ("Hello\nworld", "Hi there")),
                                             system="You are X.")
    assert text == ("<|im_start|>system\nYou are X.<|im_end|>\n<|im_start|>user\nq0<|im_end|>\n"
                    "<|im_start|>assistant\na0<|im_end|>\n<|im_start|>user\nHello\nworld<|im_end|>\n"
                    "<|im_start|>assistant\nHi there<|im_end|>")
    assert trained == "a0<|im_end|>Hi there<|im_end|>"  # the "\n" separator is masked, both turns trained
    expected = segments(tok, "<|im_start|>system\nYou are X.<|im_end|>\n", "<|im_start|>user\nq0<|im_end|>\n"
                        "<|im_start|>assistant\n", "a0", "<|im_end|>", "\n",
                        "<|im_start|>user\nHello\nworld<|im_end|>\n<|im_start|>assistant\n", "Hi there", "<|im_end|>")
    assert ids == expected


def test_qwen_default_system_and_empty_answer(tok_dir):
    _, text, trained, _, _ = encode(tok_dir, "qwen", msgs(("Q", "")))
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert trained == "<|im_end|>"


def test_qwen_lf_trains_trailing_newline(tok_dir):
    _, text, trained, _, _ = encode(tok_dir, "qwen_lf", msgs(("Q1", "A1"), ("Q2", "A2")))
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                    "<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
                    "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n")
    assert trained == "A1<|im_end|>\nA2<|im_end|>\n"


@pytest.mark.parametrize("thinking,prompt_tail,target", [
    (None, "<think>\n\n</think>\n\n", "A<|im_end|>\n"),
    (False, "<think>\n\n</think>\n\n", "A<|im_end|>\n"),
    (True, "", "<think>\n\n</think>\n\nA<|im_end|>\n"),
])
def test_qwen3_thinking_without_cot(tok_dir, thinking, prompt_tail, target):
    _, text, trained, _, _ = encode(tok_dir, "qwen3", msgs(("Q", "A")), thinking=thinking)
    assert text == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n" + prompt_tail + target
    assert trained == target


def test_qwen3_thinking_with_cot(tok_dir):
    cot = "<think>\nlet me see\n</think>\n\nA"
    _, text, trained, _, _ = encode(tok_dir, "qwen3", msgs(("Q", cot)), thinking=True)
    assert trained == cot + "<|im_end|>\n"
    _, text, trained, _, _ = encode(tok_dir, "qwen3", msgs(("Q", cot)), thinking=None)
    assert trained == cot + "<|im_end|>\n"  # none keeps what the data has
    _, text, trained, _, _ = encode(tok_dir, "qwen3", msgs(("Q", cot)), thinking=False)
    assert trained == "A<|im_end|>\n" and text.endswith("assistant\n<think>\n\n</think>\n\nA<|im_end|>\n")


def test_qwen3_matches_hf_chat_template(tok_dir):
    """Single turn, thinking off: prompt and answer render exactly as the tokenizer's own chat template."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse kalomi"}]
    prompt = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    full = hf.apply_chat_template(messages + [{"role": "assistant", "content": "imolak"}], tokenize=False)
    tok, text, trained, _, _ = encode(tok_dir, "qwen3", msgs(("Reverse kalomi", "imolak")), system="Be brief.",
                                      thinking=False)
    assert text == full.rstrip("\n") + "\n" and text.startswith(prompt)
    assert trained == full[len(prompt):]


def test_qwen3_tools_and_function_call(tok_dir):
    tools = json.dumps([{"name": "add", "description": "Add numbers",
                         "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}])
    messages = [{"role": "user", "content": "1+2?"},
                {"role": "function", "content": json.dumps({"name": "add", "arguments": {"a": 1}})},
                {"role": "observation", "content": "3"},
                {"role": "assistant", "content": "It is 3."}]
    _, text, trained, _, _ = encode(tok_dir, "qwen3", messages, tools=tools, thinking=False)
    tool_json = json.dumps({"type": "function", "function": json.loads(tools)[0]})
    assert text.startswith("<|im_start|>system\n\n\n# Tools\n\nYou may call one or more functions")
    assert f"<tools>\n{tool_json}\n</tools>" in text
    assert trained == ('<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call><|im_end|>\n'
                       "It is 3.<|im_end|>\n")
    assert "<|im_start|>user\n<tool_response>\n3\n</tool_response><|im_end|>\n<|im_start|>assistant\n" in text


def test_default_and_empty_templates(tok_dir):
    _, text, trained, _, _ = encode(tok_dir, "default", msgs(("Q1", "A1"), ("Q2", "A2")))
    eos = "<|im_end|>"  # the tokenizer's own eos: "default" does not replace it
    assert text == f"Human: Q1\nAssistant:A1{eos}\nHuman: Q2\nAssistant:A2{eos}"
    _, text, trained, _, _ = encode(tok_dir, "empty", msgs(("Q", "A")))
    assert text == "QA" and trained == "A"
    _, text, trained, _, _ = encode(tok_dir, "empty", msgs(("Q", "A")), append_eod=True)
    assert trained == "A<|im_end|>"


def test_append_eod_duplicates_end_token_on_chat_templates(tok_dir):
    _, text, trained, _, _ = encode(tok_dir, "qwen", msgs(("Q", "A")), append_eod=True)
    assert trained == "A<|im_end|><|im_end|>"


def test_truncation_keeps_the_sample_within_budget(tok_dir):
    long_answer = " ".join(["kalomi"] * 100)
    tok, text, trained, ids, labels = encode(tok_dir, "qwen3", msgs(("Q", long_answer)), thinking=False,
                                             seq_length=40)
    assert len(ids) == 40 and any(t != IGNORE_INDEX for t in labels)
    _, _, _, ids, _ = encode(tok_dir, "qwen", msgs(("Q", long_answer)), seq_length=40)
    assert len(ids) == 40


def test_truncation_rules_table():
    # Reference table (cutoff 4096): LF's rule with cutoff-1, the classic rule with the full cutoff.
    for (s, t), want_lf, want_classic in [((3000, 2000), (2095, 2000), (2458, 1638)),
                                          ((5000, 10), (4085, 10), (4088, 8)),
                                          ((100, 5000), (100, 3995), (81, 4015)),
                                          ((3000, 3000), (2048, 2047), (2048, 2048))]:
        assert infer_seqlen(s, t, 4095) == want_lf
        assert infer_max_len(s, t, 4096) == want_classic


def test_pairwise_qwen3(tok_dir):
    template = get_template("qwen", enable_thinking=None)
    tok = build_tokenizer(str(tok_dir), template=template)
    conv = Conversation([{"role": "user", "content": "Q"}], "", "", chosen={"role": "assistant", "content": "good"},
                        rejected={"role": "assistant", "content": "bad"})
    enc = encode_pairwise(conv, template, tok, EncodeOptions())
    f = enc.fields
    assert tok.decode(f["chosen_input_ids"]).endswith("assistant\ngood<|im_end|>")
    assert tok.decode([t for t in f["chosen_labels"] if t >= 0]) == "good<|im_end|>"
    assert tok.decode([t for t in f["rejected_labels"] if t >= 0]) == "bad<|im_end|>"
    prompt_len = f["chosen_labels"].index(next(t for t in f["chosen_labels"] if t >= 0))
    assert f["chosen_input_ids"][:prompt_len] == f["rejected_input_ids"][:prompt_len]


def test_greedy_knapsack_worked_example():
    # Reference §5.2: lengths [31, 49, 28, 29], capacity 63 -> packs [49], [31, 29], [28].
    bins = greedy_knapsack([31, 49, 28, 29], 63)
    assert [[[31, 49, 28, 29][i] for i in b] for b in bins] == [[49], [31, 29], [28]]
    # Equal lengths: the most recently seen sample goes first.
    assert greedy_knapsack([5, 5, 5], 10) == [[2, 1], [0]]


def test_fix_tokenizer_llama3_style(tiny_model_factory):
    template = get_template("llama3")
    tok = build_tokenizer(str(tiny_model_factory("llama3")), template=template)
    assert tok.eos_token == "<|eot_id|>"
    ids = encode(tiny_model_factory("llama3"), "llama3", msgs(("Q", "A")))[1]
    assert ids == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>")
    fix_tokenizer(tok, template)  # idempotent
    assert tok.eos_token == "<|eot_id|>"


EMPTY_THOUGHT = "<think>\n\n</think>\n\n"


@pytest.mark.parametrize("thinking,prompt_tail,target", [
    (True, "", "<think>cot</think>A<|im_end|>\n"),
    (False, "", "<think>cot</think>A<|im_end|>\n"),
    (None, "", "<think>cot</think>A<|im_end|>\n"),
])
def test_qwen3_cot_without_newlines_is_kept_as_is(tok_dir, thinking, prompt_tail, target):
    """`<think>X</think>answer` is a thought (either bare tag marks one), but only a thought spelled with the full
    thought words `<think>\n` ... `\n</think>\n\n` is removed: the block is kept and no empty block is added."""
    _, text, trained, ids, labels = encode(tok_dir, "qwen3", msgs(("Q", "<think>cot</think>A")), thinking=thinking)
    assert trained == target
    assert text == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n" + prompt_tail + target
    assert EMPTY_THOUGHT not in text


@pytest.mark.parametrize("thinking,prompt_tail,target", [
    (True, "", "<think>\ncot\n</think>\n\nA<|im_end|>\n"),
    (False, EMPTY_THOUGHT, "A<|im_end|>\n"),
    (None, "", "<think>\ncot\n</think>\n\nA<|im_end|>\n"),
])
def test_qwen3_cot_with_thought_words_multiturn(tok_dir, thinking, prompt_tail, target):
    """Spelled with the thought words, a thought is removed by `false` in every turn; each answer then gets the
    empty block at the end of its prompt. A second turn without a thought gets it too (trained with `true`)."""
    cot = "<think>\ncot\n</think>\n\nA"
    tok, text, trained, ids, labels = encode(tok_dir, "qwen3", msgs(("Q", cot), ("Q2", "B")), thinking=thinking)
    second = (EMPTY_THOUGHT + "B<|im_end|>\n") if thinking else "B<|im_end|>\n"
    second_tail = "" if thinking else EMPTY_THOUGHT
    assert text == ("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n" + prompt_tail + target
                    + "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n" + second_tail + second)
    assert trained == target + second
    # token level: the empty block is tokenized on its own, after the prompt's own tokens
    empty = tok.encode(EMPTY_THOUGHT, add_special_tokens=False)
    prompt = tok.encode("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert ids[:len(prompt) + len(empty)] == prompt + (empty if thinking is False else
                                                       tok.encode(target, add_special_tokens=False))[:len(empty)]


def test_empty_tool_list_still_opens_the_system_turn(tok_dir):
    _, text, _, _, _ = encode(tok_dir, "qwen3", msgs(("Q", "A")), tools="[]", thinking=False)
    assert text.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nQ")
