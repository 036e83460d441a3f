"""posttrain_gpt.py flags and bad input: recipes parse, unknown flags are named, runtime errors are one line."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from mindspeed_llm.arguments import parse_train_args
from mindspeed_llm.errors import UserError
from tests.conftest import REPO, run_cli
from tests.recipes import recipe_argv
from tests.test_safe_load import error_line, run_cases
from tests.train_fixtures import env, model_flags, train_flags  # noqa: F401  (env is a fixture)

RECIPES = sorted((REPO / "examples" / "mcore" / "qwen3").glob("tune_qwen3_*_ptd.sh"))
SIZES = {"0point6b": (28, 1024, True), "1point7b": (28, 2048, True), "4b": (36, 2560, True),
         "8b": (36, 4096, False), "14b": (40, 5120, False), "32b": (64, 5120, False)}


@pytest.mark.parametrize("script", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_flags_parse(script, tmp_path):
    argv = recipe_argv(script, tmp_path)
    load = argv.index("--load") + 1        # the recipe's checkpoint path, relative to where it ran; must exist
    argv[load] = str(tmp_path / argv[load])
    Path(argv[load]).mkdir(parents=True, exist_ok=True)
    args = parse_train_args(argv)
    size = script.stem.split("_")[2]
    layers, hidden, tied = SIZES[size]
    assert (args.num_layers, args.hidden_size) == (layers, hidden)
    assert args.untie_embeddings_and_output_weights == (not tied)
    assert args.bf16 and args.use_distributed_optimizer and args.padded_vocab_size == 151936
    assert args.reset_attention_mask == ("pack" in script.stem)


def test_all_sizes_have_recipes():
    assert {p.stem.split("_")[2] for p in RECIPES} == set(SIZES)


@pytest.mark.parametrize("extra,message", [
    (["--bogus-flag", "1"], "unknown flag --bogus-flag"),
    (["--lora-target-modules", "q_proj"], "--lora-target-modules q_proj: unknown module"),
    (["--context-parallel-size", "3"], "--seq-length 64 must be divisible by 2 x --context-parallel-size = 6"),
    (["--ckpt-format", "torch_dist"], "--ckpt-format torch_dist"),
    (["--neat-pack"], "--neat-pack requires --reset-attention-mask"),
    (["--bf16", "--fp16"], "mutually exclusive"),
])
def test_bad_flags_are_named(extra, message):
    base = ["--data-path", "/nonexistent/prefix", "--is-instruction-dataset", "--train-iters", "2", "--lr", "1e-4",
            "--seq-length", "64"]
    with pytest.raises(UserError, match=None) as err:
        parse_train_args(base + extra)
    assert message in str(err.value)


def _run(env: dict, *extra: str, check: bool = False):
    argv = model_flags(env["hf"]) + train_flags(2) + ["--finetune", "--data-path", env["plain"],
                                                      "--load", str(env["ckpt"][(1, 1)]), *extra]
    return run_cli("posttrain_gpt.py", *argv, check=check)


def _error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.mark.distributed
def test_runtime_errors_are_one_line(env, tmp_path):
    base = model_flags(env["hf"]) + train_flags(2) + ["--finetune", "--data-path", env["plain"], "--load",
                                                      str(env["ckpt"][(1, 1)])]
    cases = {  # one process runs them all (tests/cli_cases.py)
        "data": ["--data-path", str(tmp_path / "missing")],
        "layout": ["--load", str(env["ckpt"][(2, 1)])],
        "world": ["--tensor-model-parallel-size", "2"],
        # lr 1e30 blows the weights up: the gradient (or the loss) is inf/NaN within three iterations.
        "nan": ["--lr", "1e30", "--clip-grad", "0", "--lr-warmup-iters", "0", "--train-iters", "3"]}
    results = run_cases([{"name": name, "script": "posttrain_gpt.py", "argv": base + extra}
                         for name, extra in cases.items()], tmp_path)
    line = error_line(results["data"])
    assert "missing" in line and "_packed_" in line and "preprocess_data.py" in line
    line = error_line(results["layout"])
    assert "--tensor-model-parallel-size 1" in line and "convert" in line
    assert "not a multiple of --tensor-model-parallel-size 2" in error_line(results["world"])
    line = error_line(results["nan"])
    assert re.search(r"NaN/inf (loss|gradient .*) at iteration [23];", line) and "--skip-nan" in line


@pytest.mark.distributed
def test_skip_nan_and_hf2mg_convert(env, tmp_path):
    proc = _run(env, "--lr", "1e30", "--clip-grad", "0", "--lr-warmup-iters", "0", "--train-iters", "3", "--skip-nan",
                check=True)
    assert "number of nan iterations:   1" in proc.stdout and "number of skipped iterations:   1" in proc.stdout
    hf_files = sorted(p.relative_to(env["hf"]) for p in Path(env["hf"]).rglob("*"))
    hf_args = ["--load", str(env["hf"]), "--enable-hf2mg-convert", "--model-type-hf", "qwen3",
               "--save", str(tmp_path / "out")]
    proc = _run(env, *hf_args, check=True)
    assert "lm loss:" in proc.stdout and (tmp_path / "out" / "iter_0000002").is_dir()
    # the converted model goes beside the run's checkpoints, never into the (maybe shared) HF directory
    cache = tmp_path / "out" / "megatron_cache_tp1pp1ep1"
    assert (cache / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert f"converted --load {env['hf']} to {cache}" in proc.stdout
    assert sorted(p.relative_to(env["hf"]) for p in Path(env["hf"]).rglob("*")) == hf_files


def test_data_is_checked_before_the_model(env, tmp_path):
    """A wrong --data-path is the first error: reported before the HF conversion, the build and the load."""
    proc = _run(env, "--data-path", str(tmp_path / "missing"), "--load", str(env["hf"]), "--enable-hf2mg-convert",
                "--model-type-hf", "qwen3", "--save", str(tmp_path / "out"))
    assert "--data-path" in _error_line(proc) and "no dataset files" in proc.stderr
    assert not (tmp_path / "out").exists()          # nothing converted


def test_hf2mg_cache_dir_choice(tmp_path, monkeypatch):
    from mindspeed_llm.checkpoint.startup import hf2mg_cache_dir

    def cache_dir(argv: list[str]) -> str:
        a = parse_train_args(argv)
        return hf2mg_cache_dir(a.load, a.save, a.mg_save_dir, a.tensor_model_parallel_size,
                               a.pipeline_model_parallel_size, a.expert_model_parallel_size)

    hf = tmp_path / "qwen3_hf"
    hf.mkdir()
    argv = ["--load", str(hf), "--enable-hf2mg-convert", "--tensor-model-parallel-size", "2", "--data-path",
            "/nonexistent/prefix", "--is-instruction-dataset", "--train-iters", "2", "--lr", "1e-4", "--seq-length",
            "64"]
    assert cache_dir([*argv, "--mg-save-dir", str(tmp_path / "c")]) == str(tmp_path / "c")
    assert cache_dir([*argv, "--save", str(tmp_path / "s")]) == \
        str(tmp_path / "s" / "megatron_cache_tp2pp1ep1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    where = Path(cache_dir(argv))
    assert where.is_relative_to(tmp_path / "xdg" / "mindspeed_llm") and where.name == "megatron_cache_tp2pp1ep1"
    assert not where.is_relative_to(hf)
