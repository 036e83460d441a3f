"""Rank 0's output: progress with rate and ETA, per-subject lines and table, the JSON results file."""
from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any



class ProgressLog:
    """`{task}: done/total items (pct), rate items/s, ETA` at most every `every` seconds and at the end.

    Each replica counts its own items; with `replicas` data-parallel replicas working at the same pace the
    whole run has done about `replicas` times as many.
    """

    def __init__(self, task: str, total: int, replicas: int, enabled: bool, every: float = 10.0) -> None:
        self.task, self.total, self.replicas, self.enabled, self.every = task, total, replicas, enabled, every
        self.done = 0
        self.start = self.last = time.monotonic()

    def __call__(self, n: int) -> None:
        self.done = min(self.total, self.done + n * self.replicas)
        now = time.monotonic()
        if not self.enabled or (now - self.last < self.every and self.done < self.total):
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        print(f"{self.task}: {self.done}/{self.total} items ({100 * self.done / max(self.total, 1):.0f}%), "
              f"{rate:.2f} items/s, ETA {_clock(eta)}", flush=True)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def summarize(task: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-subject and overall accuracy of `records` ({subject, correct, ...}), subjects in first-seen order."""
    subjects: "OrderedDict[str, list[int]]" = OrderedDict()
    for r in records:
        counts = subjects.setdefault(r["subject"], [0, 0])
        counts[0] += int(r["correct"])
        counts[1] += 1
    correct = sum(c for c, _ in subjects.values())
    total = sum(n for _, n in subjects.values())
    return {"task": task, "correct": correct, "total": total, "accuracy": correct / total if total else 0.0,
            "subjects": {s: {"correct": c, "total": n, "accuracy": c / n} for s, (c, n) in subjects.items()},
            "items": records}


def log_summary(summary: dict[str, Any], seconds: float) -> None:
    """The reference's lines: one per subject, `{task} acc = K/N=acc`, a subject/question_n/acc table."""
    task = summary["task"]
    for subject, s in summary["subjects"].items():
        print(f"{subject} has {s['correct']} corrects in {s['total']} questions, with accuracy {s['accuracy']}",
              flush=True)
    print(f"{task} acc = {summary['correct']}/{summary['total']}={summary['accuracy']}", flush=True)
    rows = [(s, str(v["total"]), f"{v['accuracy']:.4f}") for s, v in summary["subjects"].items()]
    rows.append(("total", str(summary["total"]), f"{summary['accuracy']:.4f}"))
    width = max(len("subject"), *(len(r[0]) for r in rows))
    lines = [f"{'subject':<{width}}  question_n  acc"] + [f"{s:<{width}}  {n:>10}  {a}" for s, n, a in rows]
    print("\n".join(lines), flush=True)
    print(f"{task.upper()} Running Time: {seconds:.2f} s", flush=True)


def write_results(path: str, summaries: list[dict[str, Any]]) -> None:
    """All tasks in one JSON file, written under a temporary name and renamed when complete."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    payload = {"tasks": {s["task"]: s for s in summaries}}
    tmp.write_text(json.dumps(payload, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    print(f"wrote evaluation results to {path}", flush=True)
