"""BBH (generation, exact match), AGIEval and HellaSwag (option letters scored by the next token), in their
public layouts."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

from mindspeed_llm.errors import UserError
from mindspeed_llm.evaluation.items import LINE, ChoiceItem, GenerationItem, check_subject_files, limit, read_jsonl

LETTERS = "ABCDEFGHIJ"
# AGIEval's Chinese datasets (the rest are English); their prompts are in Chinese
AGIEVAL_ZH = ("gaokao", "logiqa-zh", "jec-qa")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read it ({exc})") from None
    except ValueError:
        raise UserError(f"{path}: not valid JSON") from None


def _dir(root: Path, flag: str) -> Path:
    if not root.is_dir():
        raise UserError(f"--task-data-path {root}: not a directory ({flag})")
    return root


# --- BBH (suzgun/BIG-Bench-Hard: bbh/{task}.json {"examples": [{input, target}]}, cot-prompts/{task}.txt) -----

def load_bbh(root: Path, max_samples: Optional[int], cot: bool) -> list[GenerationItem]:
    """`Q: input\\nA:` after the task's few-shot chain-of-thought prompt with --chain-of-thought, zero-shot
    otherwise."""
    files = sorted(p for p in _dir(root, "--task bbh").rglob("*.json"))
    if not files:
        raise UserError(f"--task-data-path {root}: no {{task}}.json files found (--task bbh)")
    items, counts = [], {}
    for path in files:
        data = _read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
            raise UserError(f"{path}: expected {{\"examples\": [{{\"input\": ..., \"target\": ...}}, ...]}}")
        counts[path] = len(data["examples"])
        shots = _bbh_shots(root, path.stem) if cot else ""
        for i, ex in enumerate(limit(data["examples"], max_samples)):
            if not isinstance(ex, dict) or "input" not in ex or "target" not in ex:
                raise UserError(f"{path}: example {i} needs \"input\" and \"target\"")
            tail = "A: Let's think step by step." if cot else "A:"
            items.append(GenerationItem(path.stem, i, f"{shots}Q: {ex['input']}\n{tail}", str(ex["target"]).strip(),
                                        {"cot": cot}))
    check_subject_files(root, "bbh", counts)
    return items


def _bbh_shots(root: Path, task: str) -> str:
    """cot-prompts/{task}.txt without its canary header (everything up to the `-----` line)."""
    found = sorted(root.rglob(f"cot-prompts/{task}.txt"))
    if not found:
        raise UserError(f"--task-data-path {root}: --chain-of-thought needs cot-prompts/{task}.txt (--task bbh)")
    text = found[0].read_text(encoding="utf-8")
    if "-----" in text:
        text = text.split("-----", 1)[1]
    return text.strip() + "\n\n"


def bbh_answer(output: str, cot: bool) -> str:
    """The chain-of-thought answer after "So the answer is", else the first line; a final period dropped."""
    if cot:
        found = re.findall(r"answer is (.*?)(?:\.\s|\.$|\n|$)", output)
        text = found[0] if found else output
    else:
        text = output.strip().split("\n")[0]
    return text.strip().rstrip(".").strip()


# --- AGIEval (ruixiangcui/AGIEval data/v1/{dataset}.jsonl: passage, question, options ["(A)..."], label) ----

def load_agieval(root: Path, max_samples: Optional[int]) -> tuple[list[ChoiceItem], int]:
    """Single-answer multiple-choice items in AGIEval's zero-shot format, and the count of items left out
    (cloze and multi-answer questions have no option to score)."""
    files = sorted(_dir(root, "--task agieval").rglob("*.jsonl"))
    if not files:
        raise UserError(f"--task-data-path {root}: no {{dataset}}.jsonl files found (--task agieval)")
    items, skipped, counts = [], 0, {}
    for path in files:
        zh = path.stem.startswith(AGIEVAL_ZH)
        kept = 0
        rows = read_jsonl(path, ("question",))
        counts[path] = len(rows)
        for i, ex in enumerate(rows):
            options, label = ex.get("options") or [], ex.get("label")
            if not options or not isinstance(label, str) or len(label) != 1:
                skipped += 1
                continue
            labels = tuple(LETTERS[:len(options)])
            if label not in labels:
                raise UserError(f"{path}:{ex[LINE]}: label {label!r} is not one of {', '.join(labels)}")
            if max_samples is not None and kept >= max_samples:
                break
            kept += 1
            passage = ex.get("passage") or ""
            choices = " ".join(str(o) for o in options)
            if zh:
                prompt = f"问题：{passage}{ex['question']} 选项：{choices}\n答案：从A到{labels[-1]}, 我们应选择"
            else:
                prompt = (f"Q: {passage}{ex['question']} Answer Choices: {choices}\n"
                          f"A: Among A through {labels[-1]}, the answer is")
            items.append(ChoiceItem(path.stem, i, prompt, labels, label))
    check_subject_files(root, "agieval", counts)
    return items, skipped


# --- HellaSwag (rowanz/hellaswag data/hellaswag_val.jsonl: ctx, endings[4], label, activity_label) -----------

def load_hellaswag(root: Path, max_samples: Optional[int]) -> list[ChoiceItem]:
    path = root if root.is_file() else next(iter(sorted(root.rglob("*val*.jsonl"))), None)
    if path is None:
        raise UserError(f"--task-data-path {root}: no hellaswag_val.jsonl found (--task hellaswag)")
    items = []
    for i, ex in enumerate(limit(read_jsonl(path, ("ctx", "endings", "label")), max_samples)):
        endings = ex["endings"]
        if not isinstance(endings, list) or len(endings) != 4 or str(ex["label"]) not in "0123":
            raise UserError(f"{path}:{ex[LINE]}: expected 4 \"endings\" and a \"label\" 0-3")
        options = "".join(f"\n{LETTERS[j]}. {e}" for j, e in enumerate(endings))
        prompt = f"{ex['ctx']}\nWhich ending is the most plausible?{options}\nAnswer:"
        items.append(ChoiceItem(str(ex.get("activity_label") or "hellaswag"), i, prompt, tuple(LETTERS[:4]),
                                LETTERS[int(ex["label"])]))
    return items
