"""Runs several `inference.py` command lines after importing the heavy libraries once (each case in a forked
child, so each is a fresh single-process run). Usage: python tests/infer_cli_cases.py CASES.json OUT.json
CASES.json: [{"name", "argv": [...], "stdin"?: "..."}]; OUT.json: {name: {"rc", "stdout", "stderr"}}."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_case(argv: list[str], stdin: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: Path(tmp) / name for name in ("in", "out", "err")}
        paths["in"].write_text(stdin)
        pid = os.fork()
        if pid == 0:
            for fd, name, mode in ((0, "in", os.O_RDONLY), (1, "out", os.O_WRONLY | os.O_CREAT),
                                   (2, "err", os.O_WRONLY | os.O_CREAT)):
                os.dup2(os.open(paths[name], mode), fd)
            sys.stdin = open(0, closefd=False)
            code = 1
            try:
                from mindspeed_llm.inference.main import run

                run(argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        return {"rc": os.waitstatus_to_exitcode(status), "stdout": paths["out"].read_text(),
                "stderr": paths["err"].read_text()}


def main(cases_file: str, out_file: str) -> None:
    import megatron.core.models.gpt  # noqa: F401  (imported once, before forking)
    import transformers  # noqa: F401

    import mindspeed_llm.inference.main  # noqa: F401

    cases = json.loads(Path(cases_file).read_text())
    results = {case["name"]: run_case(case["argv"], case.get("stdin", "")) for case in cases}
    Path(out_file).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
