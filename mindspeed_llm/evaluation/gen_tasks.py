"""GSM8K (greedy generation, last number of the output against the number after `####`) and BoolQ (Yes/No by
the next-token log-probabilities, as the reference compares them)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from mindspeed_llm.errors import UserError
from mindspeed_llm.evaluation.items import LINE, ChoiceItem, GenerationItem, limit, read_jsonl

COT_SHOTS = 8
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_PROMPTS = {"en": ("Question: ", "\nAnswer:"), "zh": ("问题：", "\n答案：")}


def gold_number(answer: str, where: str) -> str:
    """The reference answer of a GSM8K solution: the text after `####`, commas dropped."""
    if "####" not in answer:
        raise UserError(f"{where}: the answer has no '#### <number>' line")
    return normalize_number(answer.split("####")[-1].strip(), where)


def normalize_number(text: str, where: str = "") -> str:
    cleaned = text.replace(",", "").strip().rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        raise UserError(f"{where}: {text!r} is not a number") from None
    return str(int(value)) if value == int(value) else str(value)


def last_number(output: str) -> Optional[str]:
    """The last number in a generated answer (commas dropped), or None."""
    found = _NUMBER.findall(output)
    if not found:
        return None
    try:
        return normalize_number(found[-1])
    except UserError:
        return None


def _jsonl(root: Path, names: tuple[str, ...], flag: str) -> Path:
    if root.is_file():
        return root
    for name in names:
        hit = sorted(root.rglob(name))
        if hit:
            return hit[0]
    raise UserError(f"--task-data-path {root}: no {' or '.join(names)} found ({flag})")


def load_gsm8k(root: Path, max_samples: Optional[int], language: str, cot: bool) -> list[GenerationItem]:
    test = _jsonl(root, ("test.jsonl", "*test*.jsonl"), "--task gsm8k")
    head, tail = _PROMPTS[language]
    shots = ""
    if cot:
        train = _jsonl(root, ("train.jsonl", "*train*.jsonl"), "--task gsm8k --chain-of-thought")
        for ex in read_jsonl(train, ("question", "answer"))[:COT_SHOTS]:
            steps = re.sub(r"<<[^>]*>>", "", ex["answer"].split("####")[0]).strip()
            shots += (f"{head}{ex['question']}{tail} {steps} The answer is "
                      f"{gold_number(ex['answer'], f'{train}:{ex[LINE]}')}.\n\n")
    items = []
    for i, ex in enumerate(limit(read_jsonl(test, ("question", "answer")), max_samples)):
        items.append(GenerationItem("gsm8k", i, f"{shots}{head}{ex['question']}{tail}",
                                    gold_number(ex["answer"], f"{test}:{ex[LINE]}")))
    return items


def load_boolq(root: Path, max_samples: Optional[int], language: str) -> list[ChoiceItem]:
    path = _jsonl(root, ("dev.jsonl", "val.jsonl", "validation.jsonl", "*.jsonl"), "--task boolq")
    question = "问题" if language == "zh" else "Question"
    items = []
    for i, ex in enumerate(limit(read_jsonl(path, ("question", "passage", "answer")), max_samples)):
        if not isinstance(ex["answer"], bool):
            raise UserError(f"{path}:{ex[LINE]}: \"answer\" must be true or false, found {ex['answer']!r}")
        q = ex["question"].strip()
        q = q[0].upper() + q[1:] if q else q
        items.append(ChoiceItem("boolq", i, f"{ex['passage']}\n{question}: {q}?\nAnswer:", ("Yes", "No"),
                                "Yes" if ex["answer"] else "No"))
    return items
