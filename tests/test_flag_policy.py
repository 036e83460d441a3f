"""Every option of every parser is implemented (and read somewhere), a one-line notice, or an error naming it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from mindspeed_llm import flag_policy
from mindspeed_llm.arguments import build_preprocess_parser, build_train_parser, parse_train_args
from mindspeed_llm.checkpoint.cli import build_parser as build_convert_parser
from mindspeed_llm.errors import UserError
from mindspeed_llm.evaluation.args import build_parser as build_evaluation_parser
from mindspeed_llm.inference.args import build_parser as build_inference_parser

PKG = Path(flag_policy.__file__).resolve().parent
PARSERS = {"train": build_train_parser, "inference": build_inference_parser,
           "preprocess": build_preprocess_parser, "convert": build_convert_parser,
           "evaluation": build_evaluation_parser}
# Where each tool's readers live: the code that runs for it.
SCOPES = {"train": ("arguments.py", "training/", "models/", "checkpoint/", "data/", "tokenizer.py", "platform.py"),
          "inference": ("arguments.py", "inference/", "models/", "tokenizer.py", "platform.py", "data/templates.py"),
          "preprocess": ("arguments.py", "data/", "tokenizer.py"),
          "convert": ("checkpoint/", "models/"),
          "evaluation": ("arguments.py", "evaluation/", "inference/", "models/", "tokenizer.py", "platform.py",
                         "data/templates.py")}


def _sources(tool: str) -> str:
    files = [p for p in PKG.rglob("*.py") if p.name != "flag_policy.py"
             and any(str(p.relative_to(PKG)).startswith(s) for s in SCOPES[tool])]
    return "\n".join(p.read_text() for p in files)


def _dests(tool: str) -> set[str]:
    return {a.dest for a in PARSERS[tool]()._actions if a.dest != "help"}


@pytest.mark.parametrize("tool", flag_policy.TOOLS)
def test_every_flag_is_implemented_noticed_or_refused(tool):
    implemented, notice, error = (flag_policy.IMPLEMENTED[tool], set(flag_policy.NOTICE[tool]),
                                  set(flag_policy.ERROR[tool]))
    dests = _dests(tool)
    unaccounted = sorted(d for d in dests if not ({d} & (implemented | notice | error)))
    assert not unaccounted, f"{tool}: parsed but in no policy set: {unaccounted}"
    twice = sorted(d for d in dests if len([s for s in (implemented, notice, error) if d in s]) > 1)
    assert not twice, f"{tool}: in more than one policy set: {twice}"
    stale = sorted((implemented | notice | error) - dests)
    assert not stale, f"{tool}: policy names flags the parser lacks: {stale}"


@pytest.mark.parametrize("tool", flag_policy.TOOLS)
def test_implemented_flags_have_a_reader(tool):
    src = _sources(tool)
    unread = [d for d in flag_policy.IMPLEMENTED[tool]
              if not re.search(rf"\.{d}\b(?!\s*=[^=])|getattr\(\w+, [\"']{d}[\"']|\(\"\w+\", \"{d}\", "
                               rf"|\b(?:get|default)\(\"{d}\"", src)]   # the shape resolver reads by name
    assert not unread, f"{tool}: marked implemented but no code reads args.<dest>: {sorted(unread)}"


def test_reader_check_can_fail():
    assert not re.search(r"\.rotary_percent\b(?!\s*=[^=])", _sources("train"))


TRAIN_MIN = ["--data-path", "/nonexistent/prefix", "--is-instruction-dataset", "--train-iters", "1", "--lr", "1e-4",
             "--seq-length", "64"]


def test_error_names_the_flag_and_default_is_fine(capsys):
    with pytest.raises(UserError, match=r"--rotary-percent 0.5: .*partial rotary"):
        parse_train_args(TRAIN_MIN + ["--rotary-percent", "0.5"])
    parse_train_args(TRAIN_MIN + ["--rotary-percent", "1.0"])
    with pytest.raises(UserError, match=r"--lora-r needs --lora-target-modules"):
        parse_train_args(TRAIN_MIN + ["--lora-r", "8"])
    with pytest.raises(UserError, match=r"--ckpt-format torch_dist: .*'torch'"):
        from mindspeed_llm.inference.args import parse_args
        parse_args(["--load", "x", "--tokenizer-name-or-path", "y", "--ckpt-format", "torch_dist"])


def test_notice_is_one_line_per_given_flag(capsys):
    args = parse_train_args(TRAIN_MIN + ["--use-flash-attn", "--coc-fused-kernel", "--use-ascend-coc",
                                         "--variable-seq-lengths"])
    err = capsys.readouterr().err.splitlines()
    for flag in ("--use-flash-attn", "--coc-fused-kernel", "--use-ascend-coc"):
        lines = [ln for ln in err if f"] {flag}:" in ln]
        assert len(lines) == 1 and "no effect on cpu" in lines[0], err
    assert "scaled_dot_product_attention" in next(ln for ln in err if "--use-flash-attn" in ln)
    assert not any("--use-fused-rmsnorm" in ln for ln in err)      # not given: no notice
    assert args.no_pad_to_seq_lengths and args.variable_seq_lengths
