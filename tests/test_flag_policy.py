"""Every option of every parser is implemented (and read somewhere), a one-line notice, or an error naming it."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from mindspeed_llm import flag_policy
from mindspeed_llm.arguments import build_preprocess_parser, build_train_parser, parse_train_args
from mindspeed_llm.checkpoint.cli import build_parser as build_convert_parser
from mindspeed_llm.errors import UserError
from mindspeed_llm.evaluation.args import build_parser as build_evaluation_parser
from mindspeed_llm.inference.args import build_parser as build_inference_parser
from mindspeed_llm.models import resolve
from mindspeed_llm.training import run_config

PKG = Path(flag_policy.__file__).resolve().parent
PARSERS = {"train": build_train_parser, "pretrain": lambda: build_train_parser(pretrain=True),
           "inference": build_inference_parser,
           "preprocess": build_preprocess_parser, "convert": build_convert_parser,
           "evaluation": build_evaluation_parser}
# Where each tool's readers live: the code that runs for it.
SCOPES = {"train": ("arguments.py", "training/", "models/", "checkpoint/", "data/", "tokenizer.py", "platform.py"),
          "pretrain": ("arguments.py", "training/", "models/", "checkpoint/", "data/", "tokenizer.py", "platform.py"),
          "inference": ("arguments.py", "inference/", "models/", "tokenizer.py", "platform.py", "data/templates.py",
                        "checkpoint/startup.py", "training/model_setup.py", "training/resolve_run.py"),
          "preprocess": ("arguments.py", "data/", "tokenizer.py"),
          "convert": ("checkpoint/", "models/"),
          "evaluation": ("arguments.py", "evaluation/", "inference/", "models/", "tokenizer.py", "platform.py",
                         "data/templates.py", "checkpoint/startup.py", "training/model_setup.py",
                         "training/resolve_run.py")}


# Names the parsed flags go by where they are read (posttrain/inference/evaluation: args; convert: a, opts).
ARGS_NAMES = {"args", "a", "opts"}
# Training reads them from its typed run configuration, whose sections name each field after its flag
# (`training.run_config`): `run.<field>`, `run.<section>.<field>`, and names bound to a section (a parameter
# annotated with a section class, or `x = run.<section>`).
RUN_NAMES = {"run"}
SECTION_CLASSES = {f.type for f in dataclasses.fields(run_config.RunConfig) if f.name in run_config.SECTIONS}


def _is_run(node: ast.AST) -> bool:
    """`run` or `self.run`: a training run's `RunConfig`."""
    if isinstance(node, ast.Name):
        return node.id in RUN_NAMES
    return isinstance(node, ast.Attribute) and node.attr in RUN_NAMES and isinstance(node.value, ast.Name) \
        and node.value.id == "self"


def _is_section(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr in run_config.SECTIONS and _is_run(node.value)


def _section_names(tree: ast.AST) -> set[str]:
    """Names bound to a run's section: `x = run.<section>` (also in tuples) or a parameter annotated with a
    section class."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                pairs = (zip(target.elts, node.value.elts) if isinstance(target, ast.Tuple)
                         and isinstance(node.value, ast.Tuple) else [(target, node.value)])
                names |= {t.id for t, v in pairs if isinstance(t, ast.Name) and _is_section(v)}
        elif isinstance(node, ast.arg) and node.annotation is not None:
            if SECTION_CLASSES & {n.id for n in ast.walk(node.annotation) if isinstance(n, ast.Name)}:
                names.add(node.arg)
    return names


def _is_args(node: ast.AST, sections: set[str] = frozenset()) -> bool:
    """`args`, `a`, `opts` or `self.args`: the parsed namespace (or the options built from it); a run's section
    (`run.<section>` or a name in `sections`); the run itself."""
    if isinstance(node, ast.Name):
        return node.id in ARGS_NAMES or node.id in sections or node.id in RUN_NAMES
    if _is_section(node) or _is_run(node):
        return True
    return isinstance(node, ast.Attribute) and node.attr in ARGS_NAMES and isinstance(node.value, ast.Name) \
        and node.value.id == "self"


def _reads(tree: ast.AST) -> set[str]:
    """Flag destinations a module reads: `args.<dest>` (not an assignment target), `f(args, "<dest>")` such as
    getattr(args, "<dest>", ...) or a helper that reads it by name, the shape resolver's `default("<dest>")`
    (getattr(args, dest) with the parser default), and a training run's `run.<section>.<dest>`."""
    found = set()
    sections = _section_names(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and _is_args(node.value, sections):
            found.add(node.attr)
        elif isinstance(node, ast.Call) and node.args:
            if _is_args(node.args[0], sections):
                names = node.args[1:]
            elif isinstance(node.func, ast.Name) and node.func.id == "default":
                names = node.args[:1]
            else:
                continue
            found |= {arg.value for arg in names if isinstance(arg, ast.Constant) and isinstance(arg.value, str)}
    return found


def _read_by_tool(tool: str) -> set[str]:
    files = [p for p in PKG.rglob("*.py") if p.name != "flag_policy.py"
             and any(str(p.relative_to(PKG)).startswith(s) for s in SCOPES[tool])]
    found = set().union(*(_reads(ast.parse(p.read_text())) for p in files))
    if any(s.startswith("models/") for s in SCOPES[tool]):
        # The shape resolver reads its table's flags as getattr(args, dest) (`resolve.FIELDS`).
        found |= {dest for dest, _ in resolve.FIELDS.values()}
    return found


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
    unread = sorted(flag_policy.IMPLEMENTED[tool] - _read_by_tool(tool))
    assert not unread, f"{tool}: marked implemented but no code of this tool reads args.<dest>: {unread}"


def test_reader_check_can_fail():
    reads = _reads(ast.parse("import mindspeed_llm.models.spec\nargs.spec = 1\ntorch.save(x.seed)\n"
                             "json.load(f)\nprint(args.lr, getattr(args, 'stage', None), opts.load_dir)"))
    assert reads == {"lr", "stage", "load_dir"}
    typed = _reads(ast.parse("def f(run, x: LoopSettings):\n    o, y = run.optim, other.optim\n"
                             "    print(run.seed, run.optim.lr, o.adam_eps, x.train_iters, y.min_lr,\n"
                             "          other.optim.clip_grad)\n    run.optim.weight_decay = 1"))
    assert typed == {"seed", "optim", "lr", "adam_eps", "train_iters"}
    assert "rotary_percent" not in _read_by_tool("train")


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
    parse_train_args(TRAIN_MIN + ["--use-mcore-models"])
    # device-independent reasons do not name the device
    assert capsys.readouterr().err.strip().endswith("--use-mcore-models: accepted, no effect: models are always "
                                                    "megatron-core")
    assert not any("--use-fused-rmsnorm" in ln for ln in err)      # not given: no notice
    assert args.no_pad_to_seq_lengths and args.variable_seq_lengths


def test_mindspeed_memory_switches_are_one_notice_each(capsys):
    """The long-context MoE recipes' memory switches: accepted with one line saying why nothing changes here;
    --manual-gc is implemented and its interval checked."""
    switches = ("--recompute-activation-function", "--swap-optimizer", "--swap-attention",
                "--gemm-gradient-accumulation-fusion", "--disable-gloo-group")
    args = parse_train_args(TRAIN_MIN + list(switches) + ["--manual-gc", "--manual-gc-interval", "10"])
    err = capsys.readouterr().err.splitlines()
    for flag in switches:
        lines = [ln for ln in err if f"] {flag}: accepted, no effect" in ln]
        assert len(lines) == 1, (flag, err)
    assert args.manual_gc and args.manual_gc_interval == 10
    assert not any("--manual-gc" in ln for ln in err)
    with pytest.raises(UserError, match=r"--manual-gc-interval -1: must be >= 0"):
        parse_train_args(TRAIN_MIN + ["--manual-gc", "--manual-gc-interval", "-1"])
    with pytest.raises(UserError, match=r"--noop-layers needs --num-layers"):
        parse_train_args(TRAIN_MIN + ["--noop-layers", "4,5"])
