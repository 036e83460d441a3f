"""HumanEval (openai/human-eval HumanEval.jsonl: task_id, prompt, test, entry_point): greedy completion of the
function, cut at the next top-level statement, then the prompt + completion + the task's tests run in a separate
Python process with a timeout; never in this process."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from mindspeed_llm.errors import UserError
from mindspeed_llm.evaluation.items import GenerationItem, limit, read_jsonl

# human-eval's stop sequences: the completion ends where the next top-level statement begins
STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
TIMEOUT_S = 10.0
# printed after check() returns: an early exit(0) in the completion then does not count as a pass
PASSED = "__evaluation_tests_passed__"


def load_humaneval(root: Path, max_samples: Optional[int]) -> list[GenerationItem]:
    path = root if root.is_file() else next(iter(sorted(root.rglob("*.jsonl"))), None)
    if path is None:
        raise UserError(f"--task-data-path {root}: no HumanEval.jsonl found (--task human_eval)")
    keys = ("task_id", "prompt", "test", "entry_point")
    return [GenerationItem("human_eval", i, ex["prompt"], "pass",
                           {"task_id": ex["task_id"], "test": ex["test"], "entry_point": ex["entry_point"]})
            for i, ex in enumerate(limit(read_jsonl(path, keys), max_samples))]


def truncate(completion: str) -> str:
    cut = min((i for i in (completion.find(s) for s in STOPS) if i >= 0), default=len(completion))
    return completion[:cut]


def passes(prompt: str, completion: str, test: str, entry_point: str, timeout: float = TIMEOUT_S) -> bool:
    """Whether the tests pass: a fresh `python` in an empty temporary directory, killed after `timeout`."""
    program = f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\nprint({PASSED!r})\n"
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "program.py"
        script.write_text(program, encoding="utf-8")
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"}
        try:
            proc = subprocess.run([sys.executable, "-I", str(script)], cwd=tmp, env=env, capture_output=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return False
    lines = proc.stdout.decode("utf-8", "replace").strip().splitlines()
    return proc.returncode == 0 and bool(lines) and lines[-1] == PASSED


def passes_all(cases: list[tuple[str, str, str, str]], workers: int = 4) -> list[bool]:
    """`passes` of each (prompt, completion, test, entry_point), a few subprocesses at a time."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda case: passes(*case), cases))
