"""Runs several command lines of the entry scripts after importing the heavy libraries once (each case in a
forked child, so each is a fresh single-process run of `posttrain_gpt.py`, `inference.py` or `convert_ckpt.py`).
Usage: python tests/cli_cases.py CASES.json OUT.json
CASES.json: [{"name", "script": "posttrain_gpt.py"|"pretrain_gpt.py"|"inference.py"|"convert_ckpt.py", "argv": [...]}];
OUT.json: {name: {"rc", "stdout", "stderr"}}."""
from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _entry(script: str, argv: list[str]) -> None:
    if script in ("posttrain_gpt.py", "pretrain_gpt.py"):
        from mindspeed_llm.logs import run_main

        entry = importlib.import_module(script[:-len(".py")])
        sys.argv = [script, *argv]
        run_main(entry.main)
    elif script == "inference.py":
        from mindspeed_llm.inference.main import run

        run(argv)
    elif script == "convert_ckpt.py":
        from mindspeed_llm.checkpoint.cli import main

        sys.exit(main(argv))
    else:
        raise SystemExit(f"unknown script {script}")


def run_case(script: str, argv: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "out", Path(tmp) / "err"
        pid = os.fork()
        if pid == 0:
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT), 1)
            os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT), 2)
            code = 1
            try:
                _entry(script, argv)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        return {"rc": os.waitstatus_to_exitcode(status), "stdout": out.read_text(), "stderr": err.read_text()}


def main() -> None:
    os.chdir(REPO)
    from mindspeed_llm.logs import quiet_expected_warnings

    quiet_expected_warnings()
    import megatron.core  # noqa: F401  (imported once, before forking)
    import transformers  # noqa: F401

    import mindspeed_llm.checkpoint.cli  # noqa: F401
    import mindspeed_llm.inference.main  # noqa: F401
    import mindspeed_llm.training.loop  # noqa: F401

    cases = json.loads(Path(sys.argv[1]).read_text())
    results = {c["name"]: run_case(c["script"], c["argv"]) for c in cases}
    Path(sys.argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
