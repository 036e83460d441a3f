"""Bad input through the entry scripts: one `error: ...` line on stderr and exit status 2, in one format for every
usage error; under torchrun one line per distinct error, not one per rank."""
from __future__ import annotations

import re

import pytest

from tests.conftest import run_cli, run_torchrun
from tests.train_fixtures import model_flags, train_flags

# The flags each script requires, so that argparse gets as far as the flag under test.
REQUIRED = {"preprocess_data.py": ["--input", "x.jsonl", "--output-prefix", "out"],
            "convert_ckpt.py": ["--load-dir", "a", "--save-dir", "b"],
            "convert_ckpt_v2.py": ["--load-dir", "a", "--save-dir", "b"],
            "posttrain_gpt.py": [], "inference.py": [], "evaluation.py": []}
MALFORMED = {"convert_ckpt.py": (["--target-tensor-parallel-size", "0"], "argument --target-tensor-parallel-size: "
                                                                           "expected a positive integer, got 0"),
             "convert_ckpt_v2.py": (["--verify-threshold", "abc"], "argument --verify-threshold: invalid float "
                                                                     "value: 'abc'")}
SEQ_LENGTH_NOT_INT = (["--seq-length", "abc"], "argument --seq-length: invalid int value: 'abc'")
PROG = {"convert_ckpt_v2.py": "convert_ckpt.py"}          # the alias shares convert_ckpt.py's parser


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


@pytest.mark.parametrize("case", ["unknown flag", "malformed value"])
@pytest.mark.parametrize("script", list(REQUIRED))
def test_usage_error_is_one_line_with_exit_status_2(script, case):
    if case == "unknown flag":
        extra, message = ["--bogus-flag", "1"], "unknown flag --bogus-flag"
    else:
        extra, message = MALFORMED.get(script, SEQ_LENGTH_NOT_INT)
    proc = run_cli(script, *REQUIRED[script], *extra, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and proc.stderr.splitlines() == [
        f"error: {message} (see {PROG.get(script, script)} --help)"], proc.stderr


@pytest.mark.parametrize("script, typo, meant", [("posttrain_gpt.py", "--micro-batch-sze", "--micro-batch-size"),
                                                ("preprocess_data.py", "--tokenizer-name-or-pth",
                                                 "--tokenizer-name-or-path"),
                                                ("inference.py", "--max-new-token", "--max-new-tokens")])
def test_misspelled_flag_suggests_the_closest(script, typo, meant):
    proc = run_cli(script, *REQUIRED[script], typo, "4", check=False)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"error: unknown flag {typo} (did you mean {meant}?) (see {script} --help)"], proc.stderr


def test_stray_words_are_named_as_values_without_a_flag():
    proc = run_cli("inference.py", *REQUIRED["inference.py"], "--load", "my", "ckpt", check=False)
    assert proc.returncode == 2 and "unexpected argument(s) ckpt (a value without a flag" in proc.stderr


# ---- under torchrun: every rank parses the same flags and reads the same files --------------------------------------

@pytest.mark.distributed
def test_usage_error_under_torchrun_is_printed_once():
    proc = run_torchrun("posttrain_gpt.py", "--bogus-flag", "1", check=False)
    assert _error_lines(proc.stderr) == [
        "error: unknown flag --bogus-flag (see posttrain_gpt.py --help)"], proc.stderr[-3000:]
    assert re.search(r"exitcode\s*: 2 ", proc.stderr) and proc.returncode != 0, proc.stderr[-3000:]


@pytest.mark.distributed
def test_missing_data_under_torchrun_is_printed_once(tiny_qwen3):
    proc = run_torchrun("posttrain_gpt.py", *model_flags(tiny_qwen3), *train_flags(2), "--distributed-backend",
                        "gloo", "--data-path", "/nonexistent/prefix", check=False)
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: --data-path /nonexistent/prefix: no dataset files"), \
        proc.stderr[-3000:]
    assert re.search(r"exitcode\s*: 2 ", proc.stderr), proc.stderr[-3000:]


@pytest.mark.distributed
@pytest.mark.parametrize("mode,expected", [
    ("all", ["error: --data-path /nonexistent/prefix: no dataset files"]),     # raised by both ranks: once
    ("rank1", ["error: rank 1: its own shard is missing"]),                   # raised by one rank: still printed
])
def test_one_line_per_distinct_error(mode, expected):
    proc = run_torchrun("tests/dist_errors.py", mode, check=False)
    assert _error_lines(proc.stderr) == expected, proc.stderr[-3000:]
    assert re.search(r"exitcode\s*: 2 ", proc.stderr), proc.stderr[-3000:]
