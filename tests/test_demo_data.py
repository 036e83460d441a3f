"""The quickstart's demo tasks: every symbol a token of its own under the tiny tokenizer (so the tasks are
operations on tokens a tiny model can learn), held-out questions never trained on, and inference.py's held-out
requests the very prompts evaluation.py makes of the BIG-Bench-Hard-layout copies (same prompts, same answers)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mindspeed_llm.demo_data import write_demo_data
from mindspeed_llm.evaluation.more_tasks import load_bbh
from mindspeed_llm.tiny import build_tokenizer


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    return write_demo_data(tmp_path_factory.mktemp("demo"), n_train=400, n_test=120)


def test_every_symbol_is_one_token(demo, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(build_tokenizer(tmp_path / "tok"))
    rows = read_jsonl(demo["alpaca_train"])
    for text in [row["input"] for row in rows] + [row["output"] for row in rows]:
        pieces = [tokenizer.decode([i]) for i in tokenizer.encode(text, add_special_tokens=False)]
        # a symbol's token may carry the space before it; spaces may also be tokens of their own
        assert [p.strip() for p in pieces if p.strip()] == text.split(), (text, pieces)


def test_held_out_questions_are_not_trained_on(demo):
    trained = {row["instruction"] for row in read_jsonl(demo["alpaca_bbh_train"])}
    held_out = [row["messages"][-1]["content"] for row in read_jsonl(demo["prompts_test"])]
    assert len(trained) == 400 and len(set(held_out)) == 120
    assert not trained & set(held_out)


def test_inference_requests_are_the_evaluation_prompts(demo):
    items = load_bbh(demo["bbh"], None, cot=False)
    requests = read_jsonl(demo["prompts_test"])
    # evaluation.py wraps each prompt as the only (user) turn; inference.py renders the request's messages
    assert [[{"role": "user", "content": i.prompt}] for i in items] == [r["messages"] for r in requests]
    assert [(i.subject, i.answer) for i in items] == [(f"demo_{r['task']}", r["expected"]) for r in requests]
