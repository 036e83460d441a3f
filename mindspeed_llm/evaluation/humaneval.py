"""HumanEval (openai/human-eval HumanEval.jsonl: task_id, prompt, test, entry_point): greedy completion of the
function, cut at the next top-level statement, then the prompt + completion + the task's tests run in a separate
Python process with a timeout; never in this process.

The program is untrusted: it runs in a session (process group) of its own that is killed as a whole when it ends
or times out, so processes it forks do not outlive the scoring, and on POSIX under hard resource limits (CPU
seconds, address space, processes, file size) it cannot raise again."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from mindspeed_llm.errors import UserError
from mindspeed_llm.evaluation.items import GenerationItem, limit, read_jsonl

try:
    import resource
except ImportError:          # absent on Windows: there the program runs without resource limits
    resource = None

# human-eval's stop sequences: the completion ends where the next top-level statement begins
STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
TIMEOUT_S = 10.0
# printed after check() returns: an early exit(0) in the completion then does not count as a pass
PASSED = "__evaluation_tests_passed__"
# Limits of the program and everything it starts. HumanEval's tests need a few MiB; an address space of 4 GiB
# leaves room for any normal program while a runaway allocation fails with MemoryError.
MEMORY_LIMIT_BYTES = 4 << 30
FILE_SIZE_LIMIT_BYTES = 16 << 20         # also bounds what the program prints (stdout goes to a file)
EXTRA_PROCESSES = 64                     # processes/threads the program may add to what is running now

# Run by the child interpreter before the program: it sets the limits on itself (hard limits, which the
# program cannot raise again) and then runs the program as __main__. Done in the child rather than in a
# preexec_fn because `passes_all` starts programs from several threads, where a preexec_fn may deadlock.
_BOOTSTRAP = """\
import resource, runpy, sys
for name, value in {limits!r}:
    kind = getattr(resource, name)
    hard = resource.getrlimit(kind)[1]
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(kind, (value, value))
program = sys.argv[1]
sys.argv = [program]
runpy.run_path(program, run_name="__main__")
"""


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
    """Whether the tests pass: a fresh `python` in an empty temporary directory, under resource limits, killed
    with everything it started after `timeout` seconds (a failure) or once it has exited."""
    program = f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\nprint({PASSED!r})\n"
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "program.py"
        script.write_text(program, encoding="utf-8")
        output = Path(tmp) / "stdout.txt"
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"}
        limits = _limits(timeout)
        command = ([sys.executable, "-I", "-c", _BOOTSTRAP.format(limits=limits), str(script)] if limits
                   else [sys.executable, "-I", str(script)])
        with open(output, "wb") as out:
            # a new session: the program and all it forks share one process group, killed together below
            proc = subprocess.Popen(command, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                returncode = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                _kill_group(proc)
        lines = output.read_bytes().decode("utf-8", "replace").strip().splitlines()
    return returncode == 0 and bool(lines) and lines[-1] == PASSED


def _limits(timeout: float) -> tuple[tuple[str, int], ...]:
    """(RLIMIT name, value) pairs for the program; none where the `resource` module is missing."""
    if resource is None:
        return ()
    limits = [("RLIMIT_CPU", math.ceil(timeout) + 1), ("RLIMIT_AS", MEMORY_LIMIT_BYTES),
              ("RLIMIT_FSIZE", FILE_SIZE_LIMIT_BYTES)]
    running = _tasks_running()
    if running is not None and hasattr(resource, "RLIMIT_NPROC"):
        # RLIMIT_NPROC counts all of the user's processes and threads: allow a margin over what runs now
        limits.append(("RLIMIT_NPROC", running + EXTRA_PROCESSES))
    return tuple((name, value) for name, value in limits if hasattr(resource, name))


def _tasks_running() -> Optional[int]:
    """Processes and threads on the machine now (Linux /proc/loadavg), or None where it cannot be read."""
    try:
        return int(Path("/proc/loadavg").read_text().split()[3].split("/")[1])
    except (OSError, IndexError, ValueError):
        return None


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the program's process group (what it forked included), and reap the program itself."""
    if hasattr(os, "killpg"):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:       # the group is already empty
            pass
    else:
        proc.kill()
    proc.wait()


def passes_all(cases: list[tuple[str, str, str, str]], workers: int = 4) -> list[bool]:
    """`passes` of each (prompt, completion, test, entry_point), a few subprocesses at a time."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda case: passes(*case), cases))
