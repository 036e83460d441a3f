"""The project's own demo data: synthetic instruction tasks a tiny model can learn on a CPU in minutes.

Every record is generated from a seeded RNG, so the same call always writes the same files. Tasks, on 3 to 6
spaced symbols: reverse letters, write them in capitals, repeat them twice, sort digits. The held-out split
draws from the same generator after the training records, so no (task, argument) pair is shared. Preference
pairs (for DPO) take the correct answer as chosen and a plausible wrong one as rejected.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, Iterable, Iterator

# The arguments are short sequences written one symbol at a time, separated by spaces: the tiny byte-level BPE
# tokenizer then gives every letter or digit a token of its own (`a`, ` a`), so reversing, capitalising, copying
# or sorting is an operation on tokens that a tiny model can learn, not a question of how a word was split.
LETTERS = "abcdefghijklmnop"
DIGITS = "0123456789"
MIN_SYMBOLS, MAX_SYMBOLS = 3, 6


def _spaced(symbols: Iterable[str]) -> str:
    return " ".join(symbols)


def _sorted_digits(arg: str) -> str:
    return _spaced(sorted(arg.split()))


# Each task: (name, instruction wording, solver). The instruction names the task, the input holds the argument.
TASKS: dict[str, tuple[str, Callable[[str], str]]] = {
    "reverse": ("Reverse the letters.", lambda s: _spaced(s.split()[::-1])),
    "upper": ("Write the letters in capitals.", lambda s: s.upper()),
    "double": ("Repeat the letters twice.", lambda s: f"{s} {s}"),
    "sort": ("Sort the digits.", _sorted_digits),
}
SYSTEM_PROMPT = "You are a careful assistant. Answer with the result only."


def _argument(task: str, rng: random.Random) -> str:
    alphabet = DIGITS if task == "sort" else LETTERS
    return _spaced(rng.choice(alphabet) for _ in range(rng.randint(MIN_SYMBOLS, MAX_SYMBOLS)))


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
    """A plausible wrong answer: another letter task applied to the same letters; for digits, the input left
    unsorted, sorted in descending order, or sorted with its largest digit lost."""
    if example["task"] == "sort":
        digits = example["output"].split()
        candidates = [example["input"], _spaced(digits[::-1]), _spaced(digits[:-1])]
        return rng.choice([c for c in candidates if c != example["output"]])
    others = [t for t in TASKS if t not in ("sort", example["task"])]
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
    BIG-Bench-Hard's layout for evaluation.py: bbh/demo_{task}.json (held out) and alpaca_bbh_train.jsonl (the
    training examples asked the way evaluation.py asks BBH questions, as prompts_test.jsonl asks them too); and
    preference pairs pairwise_{train,test}.jsonl, the held-out pairs keeping only arguments absent from training."""
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
    # in the order evaluation.py reads bbh/demo_{task}.json (files by name): equal prompts then share batches too
    by_task = sorted(splits["test"], key=lambda ex: ex["task"])
    _write_jsonl(prompts, [to_prompt(ex) for ex in by_task])
    paths["prompts_test"] = prompts
    paths["alpaca_bbh_train"] = out / "alpaca_bbh_train.jsonl"
    _write_jsonl(paths["alpaca_bbh_train"], [to_bbh_alpaca(ex) for ex in splits["train"]])
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


def bbh_question(example: dict) -> str:
    """The user turn evaluation.py makes of a BBH example without chain of thought: `Q: input\nA:`."""
    return f"Q: {bbh_input(example)}\nA:"


def to_bbh_alpaca(example: dict) -> dict:
    """The example as evaluation.py asks a BBH question (one user turn, no system text), in Alpaca form."""
    return {"instruction": bbh_question(example), "input": "", "output": example["output"]}


def to_prompt(example: dict) -> dict:
    """A held-out request for `inference.py --input-file`, carrying the expected answer and task name. It is the
    user turn evaluation.py makes of the same example in bbh/ (no system text), so both score the same prompts."""
    return {"messages": [{"role": "user", "content": bbh_question(example)}],
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
