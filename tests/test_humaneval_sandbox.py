"""HumanEval's sandbox (`humaneval.passes`): what a completion forks dies with it, on a timeout and after a normal
exit, and resource limits stop runaway memory and output without failing normal programs."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from mindspeed_llm.evaluation import humaneval

PROMPT = "def add(a, b):\n    \"\"\"Sum.\"\"\"\n"
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n"

posix = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process groups from Linux /proc")
needs_resource = pytest.mark.skipif(getattr(humaneval, "resource", None) is None,
                                    reason="no resource limits without the resource module")


def run(completion: str, timeout: float = 10.0) -> bool:
    return humaneval.passes(PROMPT, completion, TEST, "add", timeout)


def forking(record: Path, then: str) -> str:
    """A completion that forks a child sleeping for a minute, records its process group, then runs `then`."""
    return ("    import os, time\n"
            "    if os.fork() == 0:\n"
            "        time.sleep(60)\n"
            "        os._exit(0)\n"
            f"    open({str(record)!r}, 'w').write(str(os.getpgid(0)))\n"
            f"{then}")


def live_members(pgid: int) -> list[int]:
    """Processes of process group `pgid` that are not zombies (a killed orphan waits for init to reap it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:                     # exited while we looked
            continue
        state, _ppid, group = stat[stat.rindex(")") + 2:].split()[:3]
        if int(group) == pgid and state != "Z":
            pids.append(int(entry.name))
    return pids


def survivors(record: Path) -> list[int]:
    """Live processes left in the program's process group, allowing a moment for SIGKILL to take effect."""
    pgid = int(record.read_text())
    assert pgid != os.getpgid(0)            # the program ran in a process group of its own
    deadline = time.monotonic() + 3
    while live_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return live_members(pgid)


@posix
def test_a_passing_program_leaves_no_process_behind(tmp_path):
    record = tmp_path / "pgid"
    assert run(forking(record, "    return a + b\n"))
    assert survivors(record) == []


@posix
def test_a_timeout_fails_and_kills_the_whole_group(tmp_path):
    record = tmp_path / "pgid"
    start = time.monotonic()
    assert not run(forking(record, "    while True:\n        pass\n"), timeout=1.0)
    assert time.monotonic() - start < 5
    assert survivors(record) == []


@needs_resource
def test_resource_limits_stop_runaway_programs_only():
    # an address-space reservation over the limit (never touched, so harmless without the limit) fails ...
    assert not run(f"    import mmap\n    mmap.mmap(-1, {2 * humaneval.MEMORY_LIMIT_BYTES})\n    return a + b\n")
    # ... one well within it, and ordinary work, still pass
    assert run("    import mmap, json\n    mmap.mmap(-1, 64 << 20)\n    json.dumps(list(range(10**5)))\n"
               "    return a + b\n")
    # output beyond the file-size limit ends the program
    assert not run(f"    import sys\n    sys.stdout.write('x' * {2 * humaneval.FILE_SIZE_LIMIT_BYTES})\n"
                   "    return a + b\n")
    assert run("    print('some output')\n    return a + b\n")


@needs_resource
def test_the_limits_are_hard_limits_the_program_cannot_raise():
    want = {"RLIMIT_AS": humaneval.MEMORY_LIMIT_BYTES, "RLIMIT_FSIZE": humaneval.FILE_SIZE_LIMIT_BYTES,
            "RLIMIT_CPU": 11}                                           # the timeout (10 s) rounded up, plus 1
    checks = "".join(f"    assert resource.getrlimit(resource.{name}) == ({value}, {value})\n"
                     for name, value in want.items())
    if sys.platform.startswith("linux"):
        checks += "    assert resource.getrlimit(resource.RLIMIT_NPROC)[1] != resource.RLIM_INFINITY\n"
    assert run(f"    import resource\n{checks}    return a + b\n")
    raise_again = "    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n"
    assert not run(f"    import resource\n{raise_again}    return a + b\n")
