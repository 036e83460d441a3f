"""MMLU, C-Eval and CMMLU: subject csv files in each benchmark's public layout, k-shot prompts from the dev split
in the format each benchmark's own evaluation code uses."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from mindspeed_llm.errors import UserError
from mindspeed_llm.evaluation.items import ChoiceItem, check_answer, check_subject_files, limit, read_csv

LETTERS = ("A", "B", "C", "D")
SHOTS = 5


def _options(question: str, options: list[str]) -> str:
    return question + "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, options))


# --- MMLU (hendrycks/test data.tar: test/{subject}_test.csv, dev/{subject}_dev.csv, no header) ---------------

def mmlu_block(question: str, options: list[str], answer: str = "") -> str:
    return f"{_options(question, options)}\nAnswer:" + (f" {answer}\n\n" if answer else "")


def mmlu_header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def load_mmlu(root: Path, max_samples: Optional[int]) -> list[ChoiceItem]:
    """One item per test row: the first 5 dev rows of the subject as shots, then the question."""
    tests = _files(root, "_test.csv", "--task mmlu")
    devs = _dev_files(root)
    items, counts = [], {}
    for path in tests:
        subject = path.name[:-len("_test.csv")]
        shots = ""
        if subject in devs:
            for n, row in read_csv(devs[subject], header=False, columns=6)[:SHOTS]:
                shots += mmlu_block(row[0], row[1:5], check_answer(row[5], LETTERS, devs[subject], n))
        rows = read_csv(path, header=False, columns=6)
        counts[path] = len(rows)
        for i, (n, row) in enumerate(limit(rows, max_samples)):
            items.append(ChoiceItem(subject, i, mmlu_header(subject) + shots + mmlu_block(row[0], row[1:5]),
                                    LETTERS, check_answer(row[5], LETTERS, path, n)))
    check_subject_files(root, "mmlu", counts)
    return items


# --- C-Eval (ceval-exam: val/{subject}_val.csv, dev/{subject}_dev.csv; header id,question,A,B,C,D,answer,...) --

def ceval_block(question: str, options: list[str], answer: str = "") -> str:
    return f"{_options(question, options)}\n答案：" + (f"{answer}\n\n" if answer else "")


def ceval_header(subject: str) -> str:
    return f"以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"


def load_ceval(root: Path, max_samples: Optional[int]) -> list[ChoiceItem]:
    """Scored on the val split (the test split's answers are not public); dev rows are the shots."""
    names = _ceval_names(root)
    vals = _files(root, "_val.csv", "--task ceval")
    devs = _dev_files(root)
    items, counts = [], {}
    for path in vals:
        subject = path.name[:-len("_val.csv")]
        shots = ""
        if subject in devs:
            for n, row in read_csv(devs[subject], header=True, columns=7)[:SHOTS]:
                shots += ceval_block(row[1], row[2:6], check_answer(row[6], LETTERS, devs[subject], n))
        rows = read_csv(path, header=True, columns=7)
        counts[path] = len(rows)
        head = ceval_header(names.get(subject, subject.replace("_", " ")))
        for i, (n, row) in enumerate(limit(rows, max_samples)):
            items.append(ChoiceItem(subject, i, head + shots + ceval_block(row[1], row[2:6]), LETTERS,
                                    check_answer(row[6], LETTERS, path, n)))
    check_subject_files(root, "ceval", counts)
    return items


def _ceval_names(root: Path) -> dict[str, str]:
    """Chinese subject names from the dataset's subject_mapping.json ({subject: [en, zh, category]}), if any."""
    found = sorted(root.rglob("subject_mapping.json"))
    if not found:
        return {}
    try:
        mapping = json.loads(found[0].read_text(encoding="utf-8"))
        return {k: v[1] for k, v in mapping.items() if isinstance(v, list) and len(v) > 1}
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{found[0]}: expected a JSON object {{subject: [english, chinese, category]}}") from None


# --- CMMLU (haonan-li/CMMLU: test/{subject}.csv, dev/{subject}.csv; header ,Question,A,B,C,D,Answer) ---------

def cmmlu_block(question: str, options: list[str], answer: str = "") -> str:
    return f"题目：{_options(question, options)}\n答案是：" + (f"{answer}\n\n" if answer else "")


def cmmlu_header(subject: str) -> str:
    return f"以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n"


def load_cmmlu(root: Path, max_samples: Optional[int]) -> list[ChoiceItem]:
    test_dir, dev_dir = root / "test", root / "dev"
    if not test_dir.is_dir():
        raise UserError(f"--task-data-path {root}: expected CMMLU's layout, test/{{subject}}.csv (and dev/)")
    tests = sorted(test_dir.glob("*.csv"))
    if not tests:
        raise UserError(f"--task-data-path {root}: test/ holds no .csv files")
    items, counts = [], {}
    for path in tests:
        subject = path.stem
        shots = ""
        dev = dev_dir / path.name
        if dev.is_file():
            for n, row in read_csv(dev, header=True, columns=7)[:SHOTS]:
                shots += cmmlu_block(row[1], row[2:6], check_answer(row[6], LETTERS, dev, n))
        rows = read_csv(path, header=True, columns=7)
        counts[path] = len(rows)
        for i, (n, row) in enumerate(limit(rows, max_samples)):
            items.append(ChoiceItem(subject, i, cmmlu_header(subject.replace("_", " ")) + shots +
                                    cmmlu_block(row[1], row[2:6]), LETTERS, check_answer(row[6], LETTERS, path, n)))
    check_subject_files(root, "cmmlu", counts)
    return items


def _dev_files(root: Path) -> dict[str, Path]:
    """{subject}_dev.csv under the data path, or in the `dev/` beside it (recipes point at `data/test/`)."""
    found = sorted(root.rglob("*_dev.csv")) or sorted((root.parent / "dev").glob("*_dev.csv"))
    return {p.name[:-len("_dev.csv")]: p for p in found}


def _files(root: Path, suffix: str, flag: str) -> list[Path]:
    if not root.is_dir():
        raise UserError(f"--task-data-path {root}: not a directory ({flag} reads its *{suffix} files)")
    found = sorted(root.rglob(f"*{suffix}"), key=lambda p: p.name)
    if not found:
        raise UserError(f"--task-data-path {root}: no *{suffix} files found ({flag})")
    return found


LOADERS: dict[str, Callable[[Path, Optional[int]], list[ChoiceItem]]] = {
    "mmlu": load_mmlu, "ceval": load_ceval, "cmmlu": load_cmmlu,
}
