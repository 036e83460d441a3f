"""The project's own demo data: synthetic instruction tasks a tiny model can learn on a CPU in minutes.

Every record is generated from a seeded RNG, so the same call always writes the same files. Tasks:
reverse a word, add two small numbers, upper-case a word, and repeat a word twice. The held-out split
draws from the same generator after the training records, so no (task, argument) pair is shared. Preference
pairs (for DPO) take the correct answer as chosen and a plausible wrong one as rejected.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, Iterator

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "po", "si", "de", "fu", "ba", "ve", "zo", "hi", "gu", "wa"]

# Each task: (name, instruction wording, solver). The instruction names the task, the input holds the argument.
TASKS: dict[str, tuple[str, Callable[[str], str]]] = {
    "reverse": ("Reverse the letters of the word.", lambda w: w[::-1]),
    "upper": ("Write the word in capital letters.", lambda w: w.upper()),
    "double": ("Repeat the word twice, separated by a space.", lambda w: f"{w} {w}"),
    "add": ("Add the two numbers.", lambda s: str(sum(int(x) for x in s.split("+")))),
}
SYSTEM_PROMPT = "You are a careful assistant. Answer with the result only."


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))


def _argument(task: str, rng: random.Random) -> str:
    if task == "add":
        return f"{rng.randint(0, 49)}+{rng.randint(0, 49)}"
    return _word(rng)


def generate_examples(n: int, seed: int = 1234, tasks: tuple[str, ...] = tuple(TASKS)) -> Iterator[dict]:
    """Yield `n` distinct examples as {"task", "instruction", "input", "output"}."""
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    while len(seen) < n:
        task = rng.choice(tasks)
        arg = _argument(task, rng)
        if (task, arg) in seen:
            continue
        seen.add((task, arg))
        instruction, solve = TASKS[task]
        yield {"task": task, "instruction": instruction, "input": arg, "output": solve(arg)}


def to_alpaca(example: dict) -> dict:
    return {"instruction": example["instruction"], "input": example["input"], "output": example["output"],
            "system": SYSTEM_PROMPT}


def wrong_answer(example: dict, rng: random.Random) -> str:
    """A plausible wrong answer: another word task applied to the same word, or a sum off by 1 to 3."""
    if example["task"] == "add":
        total, delta = int(example["output"]), rng.choice([-3, -2, -1, 1, 2, 3])
        return str(total + delta if total + delta >= 0 else total - delta)
    others = [t for t in TASKS if t not in ("add", example["task"])]
    return TASKS[rng.choice(others)][1](example["input"])


def to_pairwise(example: dict, rng: random.Random) -> dict:
    """The example as an Alpaca pairwise record (AlpacaStylePairwiseHandler's instruction/input/chosen/rejected)."""
    return {"instruction": example["instruction"], "input": example["input"], "chosen": example["output"],
            "rejected": wrong_answer(example, rng)}


def to_sharegpt(examples: list[dict]) -> dict:
    """Several examples as one multi-turn ShareGPT conversation."""
    turns = []
    for ex in examples:
        turns.append({"from": "human", "value": f"{ex['instruction']}\n{ex['input']}"})
        turns.append({"from": "gpt", "value": ex["output"]})
    return {"conversations": turns, "system": SYSTEM_PROMPT}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def write_demo_data(out_dir: str | Path, n_train: int = 2000, n_test: int = 200, seed: int = 1234) -> dict[str, Path]:
    """Write alpaca_{train,test}.jsonl, sharegpt_{train,test}.jsonl (2-3 turns each), prompts_test.jsonl
    (held-out requests for inference.py, with the expected answers) under `out_dir`; and the tasks in
    BIG-Bench-Hard's layout for evaluation.py: bbh/demo_{task}.json (held out) and alpaca_bbh_train.jsonl (a
    quarter of the training examples asked the way evaluation.py asks BBH questions); and preference pairs
    pairwise_{train,test}.jsonl, the held-out pairs keeping only arguments (words, sums) absent from training."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    examples = list(generate_examples(n_train + n_test, seed))
    splits = {"train": examples[:n_train], "test": examples[n_train:]}
    rng = random.Random(seed + 1)
    paths = {}
    for split, rows in splits.items():
        alpaca = out / f"alpaca_{split}.jsonl"
        _write_jsonl(alpaca, [to_alpaca(ex) for ex in rows])
        conversations, i = [], 0
        while i < len(rows):
            k = rng.randint(2, 3)
            conversations.append(to_sharegpt(rows[i:i + k]))
            i += k
        sharegpt = out / f"sharegpt_{split}.jsonl"
        _write_jsonl(sharegpt, conversations)
        paths[f"alpaca_{split}"] = alpaca
        paths[f"sharegpt_{split}"] = sharegpt
    seen = {ex["input"] for ex in splits["train"]}
    pair_splits = {"train": splits["train"], "test": [ex for ex in splits["test"] if ex["input"] not in seen]}
    for split, rows in pair_splits.items():
        paths[f"pairwise_{split}"] = out / f"pairwise_{split}.jsonl"
        _write_jsonl(paths[f"pairwise_{split}"], [to_pairwise(ex, rng) for ex in rows])
    prompts = out / "prompts_test.jsonl"
    _write_jsonl(prompts, [to_prompt(ex) for ex in splits["test"]])
    paths["prompts_test"] = prompts
    paths["alpaca_bbh_train"] = out / "alpaca_bbh_train.jsonl"
    _write_jsonl(paths["alpaca_bbh_train"], [to_bbh_alpaca(ex) for ex in splits["train"][::4]])
    paths["bbh"] = out / "bbh"
    paths["bbh"].mkdir(exist_ok=True)
    for task in TASKS:
        examples = [{"input": bbh_input(ex), "target": ex["output"]} for ex in splits["test"] if ex["task"] == task]
        tmp = paths["bbh"] / f"demo_{task}.json.tmp"
        tmp.write_text(json.dumps({"examples": examples}, ensure_ascii=False), encoding="utf-8")
        tmp.replace(paths["bbh"] / f"demo_{task}.json")
    return paths


def bbh_input(example: dict) -> str:
    """The example as a BIG-Bench-Hard `input`: the instruction, then the argument."""
    return f"{example['instruction']}\n{example['input']}"


def to_bbh_alpaca(example: dict) -> dict:
    """The example as evaluation.py asks a BBH question without chain of thought (`Q: input\nA:` as the user
    turn, no system text), in Alpaca form."""
    return {"instruction": f"Q: {example['instruction']}", "input": f"{example['input']}\nA:",
            "output": example["output"]}


def to_prompt(example: dict) -> dict:
    """A held-out request for `inference.py --input-file`, carrying the expected answer and task name."""
    return {"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                         {"role": "user", "content": f"{example['instruction']}\n{example['input']}"}],
            "expected": example["output"], "task": example["task"]}


def score(answers: list[dict]) -> dict[str, float]:
    """Exact-match accuracy per task and overall, from `inference.py` output lines (response vs expected)."""
    hits: dict[str, list[int]] = {}
    for row in answers:
        ok = int(row["response"].strip() == row["expected"])
        for key in (row["task"], "all"):
            hits.setdefault(key, []).append(ok)
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}


def corpus(n: int = 3000, seed: int = 99) -> list[str]:
    """Plain text used to train the tiny tokenizer: the task texts plus a little generic English."""
    lines = []
    for ex in generate_examples(n, seed):
        lines += [ex["instruction"], ex["input"], ex["output"]]
    lines += [SYSTEM_PROMPT, "You are a helpful assistant.", "Hello, how are you? I am fine, thank you.",
              "The quick brown fox jumps over the lazy dog.", "0 1 2 3 4 5 6 7 8 9 10 100 1000",
              "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz", '{"name": "get_weather", "arguments": {}}']
    return lines
