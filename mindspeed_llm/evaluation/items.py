"""What a benchmark loader hands the scorer: prompt texts with their options or reference answers."""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mindspeed_llm.errors import UserError

log = logging.getLogger("mindspeed_llm.evaluation")


@dataclass
class ChoiceItem:
    """Answered by the option label whose next token is most likely after `prompt` (e.g. "A".."D", "Yes"/"No")."""

    subject: str
    index: int
    prompt: str
    labels: tuple[str, ...]
    answer: str


@dataclass
class GenerationItem:
    """Answered by greedy generation; `answer` is compared with what `extract` pulls out of the output."""

    subject: str
    index: int
    prompt: str
    answer: str
    extra: dict[str, Any] = field(default_factory=dict)


def read_csv(path: Path, header: bool, columns: int) -> list[tuple[int, list[str]]]:
    """(row number counting the header, fields) of each non-empty row of a benchmark csv (header skipped), each
    checked to have `columns` fields."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read it ({exc})") from None
    first = 2 if header else 1
    rows = rows[1:] if header else rows
    out = []
    for n, row in enumerate(rows, start=first):
        if not row:
            continue
        if len(row) < columns:
            raise UserError(f"{path}:{n}: expected {columns} comma-separated fields, found {len(row)}")
        out.append((n, row))
    return out


LINE = "__line__"      # each object read by read_jsonl records its line number here, for the error messages


def read_jsonl(path: Path, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """Objects of a JSON-lines file, each checked to carry `keys` (and given its line number under LINE)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read it ({exc})") from None
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise UserError(f"{path}:{n}: not valid JSON") from None
        missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
        if missing:
            raise UserError(f"{path}:{n}: expected keys {', '.join(keys)}; missing {', '.join(missing)}")
        obj[LINE] = n
        out.append(obj)
    return out


def check_answer(answer: str, labels: tuple[str, ...], path: Path, row: int) -> str:
    answer = answer.strip()
    if answer not in labels:
        raise UserError(f"{path}:{row}: answer {answer!r} is not one of {', '.join(labels)}")
    return answer


def limit(items: list, max_samples: Optional[int]) -> list:
    return items if max_samples is None else items[:max_samples]


def check_subject_files(root: Path, task: str, rows: dict[Path, int]) -> None:
    """Given the number of rows read from each subject file of a benchmark directory: one warning line per empty
    file (its subject would otherwise vanish from the results unnoticed); every file empty is an error."""
    empty = [path for path, n in rows.items() if n == 0]
    if not empty:
        return
    if len(empty) == len(rows):
        names = ", ".join(p.name for p in empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
        raise UserError(f"--task-data-path {root}: all {len(rows)} subject files of --task {task} are empty "
                        f"({names})")
    scored = len(rows) - len(empty)
    for path in empty:
        log.warning(f"warning: {path}: empty, no questions; --task {task} scores the other {scored} of "
                    f"{len(rows)} subjects")
