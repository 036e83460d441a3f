"""MindSpeed-LLM's dense Qwen3 recipes (current, v2.2.0 and v2.1.0 spellings; tests/recipes.py reads them from
the reference) run with only paths, shapes and sizes edited: every training and generation recipe is parsed and
validated (training also against its data's sidecar), data and checkpoint conversion recipes run through their
CLIs, and one current and one v2.1.0 fine-tuning recipe plus a generation recipe run end to end (one process)."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess

import pytest
import torch

from tests.conftest import REPO, run_cli, run_torchrun
from mindspeed_llm.errors import UserError
from tests.recipes import REFERENCE, load_recipes, edit, recipe_argv, split_flags, tied
from tests.test_convert import hf_tensors
from tests.test_pretrain import write_text_corpus

RECIPES = load_recipes()


def _names(kind: str) -> list[str]:
    return sorted(n for n in RECIPES if f"/{kind}" in n)


def test_reference_lists_every_spelling():
    assert len(_names("tune_")) == 27 and len(_names("generate_")) == 6
    assert len([n for n in _names("tune_") if "_lora_" in n]) == 12
    assert {n.split("/")[0] for n in _names("tune_")} == {"qwen3", "v2.1.0", "v2.2.0"}


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_qwen3, tiny_qwen3_tied):
    """Each data recipe and checkpoint recipe, run on the tiny model through the CLIs."""
    from mindspeed_llm.demo_data import write_demo_data

    root = tmp_path_factory.mktemp("recipes")
    files = write_demo_data(root / "raw", n_train=60, n_test=4)
    text = root / "raw" / "pretrain.jsonl"
    text.write_text("".join(json.dumps({"text": f"sample {i} " * 8}) + "\n" for i in range(20)))
    out = {"root": root}
    for name, extra in (("qwen3/data_convert_qwen3_instruction", []), ("v2.1.0/data_convert_qwen3_instruction", []),
                        ("qwen3/data_convert_qwen3_pretrain", []),
                        ("qwen3/data_convert_qwen3_instruction", ["--pack", "--neat-pack", "--seq-length", "128"])):
        script, flags = RECIPES[name]
        prefix = root / "data" / (name.replace("/", "_") + ("_pack" if extra else "")) / "alpaca"
        paths = {"--input": str(text if "pretrain" in name else files["alpaca_train"]),
                 "--tokenizer-name-or-path": str(tiny_qwen3), "--output-prefix": str(prefix)}
        run_cli(script, *edit(flags, paths), *extra)
        out[name + ("_pack" if extra else "")] = str(prefix)
    for name, hf in (("qwen3/ckpt_convert_qwen3_hf2mcore", tiny_qwen3_tied),
                     ("v2.1.0/ckpt_convert_qwen3_hf2mcore", tiny_qwen3)):
        script, flags = RECIPES[name]
        out[name] = root / name.replace("/", "_")
        proc = run_cli(script, *edit(flags, {"--load-dir": str(hf), "--save-dir": str(out[name]),
                                             "--tokenizer-model": str(hf)}))
        assert "no effect" in proc.stderr or name.startswith("qwen3/")   # v2.1.0 compat flags say so
    script, flags = RECIPES["qwen3/ckpt_convert_qwen3_mcore2hf"]
    back = root / "back_hf"
    run_cli(script, *edit(flags, {"--load-dir": str(out["qwen3/ckpt_convert_qwen3_hf2mcore"]),
                                  "--save-dir": str(back), "--hf-cfg-dir": str(tiny_qwen3_tied)}))
    assert (back / "config.json").is_file()
    out["hf"], out["hf_tied"] = tiny_qwen3, tiny_qwen3_tied
    return out


def _data_for(name: str, env) -> str:
    if name.startswith("v2.1.0/"):
        return env["v2.1.0/data_convert_qwen3_instruction"]
    if "_pack" in name:
        return env["qwen3/data_convert_qwen3_instruction_pack"]
    return env["qwen3/data_convert_qwen3_instruction"]


def _train_argv(name: str, env, save) -> list[str]:
    _, flags = RECIPES[name]
    hf = env["hf_tied"] if tied(flags) else env["hf"]
    load = str(hf) if any(f[0] == "--enable-hf2mg-convert" for f in flags) else \
        str(env["v2.1.0/ckpt_convert_qwen3_hf2mcore"])
    return edit(flags, {"--load": load, "--save": str(save), "--data-path": _data_for(name, env),
                        "--tokenizer-name-or-path": str(env["hf"])})


@pytest.mark.parametrize("name", _names("tune_"))
def test_tune_recipe_parses_and_matches_its_data(name, env, tmp_path, capsys):
    from mindspeed_llm.arguments import parse_train_args
    from mindspeed_llm.training.batching import check_sidecar

    args = parse_train_args(_train_argv(name, env, tmp_path / "save"))
    check_sidecar(args.data_path, args)
    err = capsys.readouterr()
    if name.startswith(("qwen3/", "v2.2.0/")):
        assert args.enable_thinking is True           # the data recipe's --enable-thinking true
        if "--enable-thinking" not in sum(RECIPES[name][1], []):
            assert "--enable-thinking true: taken from" in err.out
    assert "--use-flash-attn: accepted, no effect" in err.err


@pytest.mark.parametrize("name", _names("generate_"))
def test_generate_recipe_parses(name, env):
    from mindspeed_llm.inference.args import parse_args

    args = parse_args(edit(RECIPES[name][1], {"--load": "ckpt", "--tokenizer-name-or-path": str(env["hf"])}))
    assert args.max_new_tokens == 4 and args.ckpt_format == "torch"


def test_explicit_different_data_flag_is_refused(env, tmp_path):
    from mindspeed_llm.arguments import parse_train_args
    from mindspeed_llm.training.batching import check_sidecar

    argv = _train_argv("qwen3/tune_qwen3_4b_4K_full_ptd", env, tmp_path) + ["--enable-thinking", "false"]
    args = parse_train_args(argv)
    with pytest.raises(UserError, match=r"--enable-thinking is 'false' for training but the data was "
                                         r"preprocessed with 'true'"):
        check_sidecar(args.data_path, args)


@pytest.mark.distributed
def test_recipes_end_to_end(env, tmp_path):
    """Current 4B fine-tuning (HF load, thinking data) then 4B generation on its checkpoint; v2.1.0 8B fine-tuning
    (Megatron load from the v2.1.0 conversion, --variable-seq-lengths); 0.6B LoRA fine-tuning then the LoRA merge
    recipe (which restates r/alpha as 8/16: the same scale as the 16/32 it was trained with)."""
    save = tmp_path / "tuned"
    proc = run_torchrun("posttrain_gpt.py", *_train_argv("qwen3/tune_qwen3_4b_4K_full_ptd", env, save), nproc=1)
    assert "--enable-thinking true: taken from" in proc.stdout + proc.stderr
    # the recipe's --max-position-embeddings 32768 against the tiny config.json's 512: a run setting, said once
    assert proc.stderr.count("--max-position-embeddings 32768 differs from") == 1, proc.stderr
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    gen = edit(RECIPES["qwen3/generate_qwen3_4b_ptd"][1], {"--load": str(save),
                                                           "--tokenizer-name-or-path": str(env["hf"])})
    proc = run_torchrun("inference.py", *gen, "--task", "greedy", nproc=1)
    assert "--use-fused-swiglu: accepted, no effect" in proc.stderr
    save = tmp_path / "tuned_v210"
    run_torchrun("posttrain_gpt.py", *_train_argv("v2.1.0/tune_qwen3_8b_4K_full_ptd", env, save), nproc=1)
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    save = tmp_path / "lora"
    proc = run_torchrun("posttrain_gpt.py", *_train_argv("qwen3/tune_qwen3_0point6b_4K_lora_ptd", env, save), nproc=1)
    assert "--lora-fusion: accepted, no effect" in proc.stderr and "LoRA r=16 alpha=32" in proc.stdout
    script, flags = RECIPES["qwen3/ckpt_convert_qwen3_mcore2hf_lora"]
    merged = tmp_path / "lora_hf"
    proc = run_cli(script, *edit(flags, {"--load-dir": str(save / "megatron_cache_tp1pp1ep1"),
                                         "--lora-load": str(save), "--save-dir": str(merged),
                                         "--hf-cfg-dir": str(env["hf_tied"])}))
    assert "the scale alpha/r is the same" in proc.stderr and (merged / "config.json").is_file()
    # trained with --max-position-embeddings 32768; the export keeps the model's own value
    assert json.loads((merged / "config.json").read_text())["max_position_embeddings"] == 512


# --- Qwen3-MoE: our examples/mcore/qwen3_moe/ recipes on the tiny Qwen3-MoE ------------------------------------
MOE_DIR = REPO / "examples" / "mcore" / "qwen3_moe"
# The tiny Qwen3-MoE's shape (tiny.py: 4 layers, 8 experts, top-2) and one process; the 235B recipes keep
# --noop-layers, which gets 2 extra layers; expert TP follows the (single-process) TP.
MOE_TINY = {"--num-layers": "4", "--hidden-size": "64", "--ffn-hidden-size": "128", "--num-attention-heads": "4",
            "--num-query-groups": "2", "--kv-channels": "16", "--padded-vocab-size": "448", "--seq-length": "128",
            "--num-experts": "8", "--moe-router-topk": "2", "--moe-ffn-hidden-size": "32",
            "--moe-intermediate-size": "32", "--noop-layers": "4,5", "--tensor-model-parallel-size": "1",
            "--pipeline-model-parallel-size": "1", "--expert-model-parallel-size": "1",
            "--context-parallel-size": "1", "--expert-tensor-parallel-size": None,
            "--num-layers-per-virtual-pipeline-stage": None, "--micro-batch-size": "2", "--global-batch-size": "4",
            "--train-iters": "2", "--save-interval": "2"}
# Recipes that stop with one line naming a flag not implemented here (the first one the run meets).
# The training recipes without context parallelism (and the pretraining one) run 2 iterations in one process: LoRA
# on grouped experts, the 235B ones with their --noop-layers, the 32K ones with MindSpeed's memory switches (one
# notice line each).
MOE_RUNS = ("tune_qwen3_30b_a3b_4K_full_ptd", "tune_qwen3_30b_a3b_4K_lora_ptd", "dpo_qwen3_30b_a3b_16K_A3_ptd",
            "tune_qwen3_235b_a22b_4K_full_pack_A3_ptd", "tune_qwen3_235b_a22b_32K_lora_pack_A2_ptd",
            "tune_qwen3_30b_a3b_32K_full_pack_A3_ptd", "tune_qwen3_30b_a3b_32K_full_pack_A+X_ptd",
            "pretrain_qwen3_30b_a3b_4K_ptd")
# MindSpeed's recipes with context parallelism (Ulysses on packed rows, CP 4 to 16) run at CP 2 on 2 processes.
MOE_CP_RUNS = ("tune_qwen3_30b_a3b_256K_full_pack_A3_ptd", "tune_qwen3_235b_a22b_64K_full_pack_A3_ptd",
               "tune_qwen3_235b_a22b_128K_full_pack_A3_ptd", "tune_qwen3_235b_a22b_256K_full_pack_A3_ptd")


def moe_entry(script) -> str:
    """The entry script a recipe runs, from its name."""
    for prefix, entry in (("pretrain_", "pretrain_gpt.py"), ("generate_", "inference.py"),
                          ("evaluate_", "evaluation.py")):
        if script.stem.startswith(prefix):
            return entry
    return "posttrain_gpt.py"


def moe_tiny_argv(script, tmp_path, paths: dict[str, str], sizes: dict[str, str] | None = None) -> list[str]:
    """Our recipe's training arguments with paths, the tiny shape and one-process sizes (or `sizes`) edited in."""
    argv = recipe_argv(script, tmp_path, entry=moe_entry(script))
    flags = split_flags(argv)
    table = {**MOE_TINY, **(sizes or {})}
    out: list[str] = []
    for flag, *values in flags:
        if flag == "--num-layers" and any(f[0] == "--noop-layers" for f in flags):
            values = ["6"]
        elif flag in table:
            if table[flag] is None:
                continue
            values = [table[flag]]
        elif flag in paths:
            values = [paths[flag]]
        out += [flag, *values]
    return out


def _bash(script, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script)], cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def moe_env(tmp_path_factory, tiny_model_factory):
    """Our MoE data recipes and checkpoint recipes run on the tiny Qwen3-MoE and the demo data."""
    from mindspeed_llm.checkpoint.hf2mg import Hf2MgOptions, convert_hf_to_mg
    from mindspeed_llm.demo_data import write_demo_data

    hf = tiny_model_factory("qwen3-moe")
    root = tmp_path_factory.mktemp("moe_recipes")
    files = write_demo_data(root / "raw", n_train=40, n_test=4)
    out = {"root": root, "hf": hf}
    for name, source, extra in (("instruction", "alpaca_train", {}), ("instruction_pack", "alpaca_train",
                                                                       {"SEQ_LENGTH": "128"}),
                                ("pairwise", "pairwise_train", {"MAP_KEYS": ""})):
        prefix = root / name / "data"
        proc = _bash(MOE_DIR / f"data_convert_qwen3_moe_{name}.sh",
                     {"INPUT": str(files[source]), "TOKENIZER_PATH": str(hf), "OUTPUT_PREFIX": str(prefix), **extra})
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[name] = str(prefix)
    corpus = write_text_corpus(root / "raw" / "corpus.jsonl", 200, 1)
    proc = _bash(MOE_DIR / "data_convert_qwen3_moe_pretrain.sh",
                 {"INPUT": str(corpus), "TOKENIZER_PATH": str(hf), "OUTPUT_PREFIX": str(root / "pretrain" / "corpus")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out["pretrain"] = str(root / "pretrain" / "corpus_text_document")
    # The conversion recipes pass MindSpeed's --moe-grouped-gemm (the GroupedMLP layout)
    out["ckpt"] = root / "mg"          # the sequential-expert layout the runs below load
    convert_hf_to_mg(Hf2MgOptions(load_dir=hf, save_dir=out["ckpt"]), log=lambda m: None)
    out["ckpt_noop"] = root / "mg_noop"      # the 235B recipes' layout: 2 noop layers after the model's 4
    convert_hf_to_mg(Hf2MgOptions(load_dir=hf, save_dir=out["ckpt_noop"], noop_layers="4,5"), log=lambda m: None)
    for name, noop in (("ckpt_grouped", None), ("ckpt_noop_grouped", "4,5")):     # for recipes with --moe-grouped-gemm
        out[name] = root / name
        convert_hf_to_mg(Hf2MgOptions(load_dir=hf, save_dir=out[name], noop_layers=noop, grouped_gemm=True),
                         log=lambda m: None)
    # (PP 2 x EP 2 here: the tiny model has 4 layers); back to HF, every tensor is the original's, bit for bit.
    for name, env in (("hf2mcore", {"HF_DIR": str(hf), "MG_DIR": str(root / "grouped"), "PP": "2", "EP": "2"}),
                      ("mcore2hf", {"MG_DIR": str(root / "grouped"), "HF_CFG_DIR": str(hf),
                                    "HF_OUT": str(root / "back")})):
        proc = _bash(MOE_DIR / f"ckpt_convert_qwen3_moe_{name}.sh", env)
        assert proc.returncode == 0, proc.stderr[-2000:]
    original, back = hf_tensors(hf), hf_tensors(root / "back")
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
    return out


def _moe_paths(script, moe_env, save, tmp_path) -> dict[str, str]:
    """Paths for a recipe: the HF model dir where it converts at start-up, else the converted checkpoint (with
    the recipe's noop layers and expert layout)."""
    name = script.stem
    data = moe_env["pairwise"] if name.startswith("dpo_") else moe_env["pretrain"] if name.startswith("pretrain_") \
        else moe_env["instruction_pack" if "_pack_" in name else "instruction"]
    argv = recipe_argv(script, tmp_path, entry=moe_entry(script))
    converted = moe_env[("ckpt_noop" if "--noop-layers" in argv else "ckpt") +
                        ("_grouped" if "--moe-grouped-gemm" in argv else "")]
    return {"--load": str(moe_env["hf"] if "--enable-hf2mg-convert" in argv else converted), "--save": str(save), "--data-path": data,
            "--tokenizer-name-or-path": str(moe_env["hf"])}


def test_moe_recipes_are_ours(tmp_path):
    """MindSpeed's fine-tuning-side Qwen3-MoE recipe names, with its TP/PP/EP, shapes, MoE and LoRA flags."""
    names = {p.stem for p in MOE_DIR.glob("*.sh")}
    assert {"data_convert_qwen3_moe_instruction", "data_convert_qwen3_moe_instruction_pack",
            "data_convert_qwen3_moe_pairwise", "ckpt_convert_qwen3_moe_hf2mcore", "ckpt_convert_qwen3_moe_mcore2hf",
            "tune_qwen3_30b_a3b_4K_full_ptd", "tune_qwen3_30b_a3b_4K_lora_ptd", "dpo_qwen3_30b_a3b_16K_A3_ptd",
            "tune_qwen3_235b_a22b_4K_full_pack_A3_ptd", "tune_qwen3_235b_a22b_32K_lora_pack_A2_ptd"} <= names
    reference = {block.group(1): block.group(2).split() for block in re.finditer(
        r"^## qwen3_moe/(\S+)\n`[^`]*` \(\d+ flags\)\n```\n(.*?)```", REFERENCE.read_text(), re.M | re.S)}
    for script in sorted(MOE_DIR.glob("*_ptd.sh")):
        ours, ref = recipe_argv(script, tmp_path, entry=moe_entry(script)), reference[script.stem]
        for flag in ("--num-experts", "--moe-router-topk", "--moe-ffn-hidden-size", "--moe-intermediate-size",
                     "--moe-token-dispatcher-type", "--moe-aux-loss-coeff", "--max-position-embeddings",
                     "--num-layers", "--noop-layers", "--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                     "--expert-model-parallel-size", "--seq-length", "--lora-r", "--lora-alpha"):
            if flag in ref:
                assert ours[ours.index(flag) + 1] == ref[ref.index(flag) + 1], (script.name, flag)
        for flag in ("--moe-grouped-gemm", "--norm-topk-prob", "--lora-ckpt-filter", "--lora-fusion",
                     "--enable-hf2mg-convert", "--reset-attention-mask", "--stage"):
            assert (flag in ref) == (flag in ours), (script.name, flag)


@pytest.mark.distributed
def test_moe_recipes_run_on_the_tiny_model(moe_env, tmp_path):
    """The recipes of MOE_RUNS (HF weights converted at start-up where the recipe does, noop layers, LoRA on grouped
    experts, DPO, pretraining) run 2 iterations in one process."""
    from mindspeed_llm.checkpoint import layout
    from tests.train_fixtures import launch_plan

    runs = set(MOE_RUNS)
    plan = [{"name": name, "kind": "pretrain" if name.startswith("pretrain_") else "train",
             "argv": moe_tiny_argv(MOE_DIR / f"{name}.sh", tmp_path, _moe_paths(
                 MOE_DIR / f"{name}.sh", moe_env, tmp_path / name, tmp_path))} for name in sorted(runs)]
    out = launch_plan(tmp_path, "moe_recipes", plan, nproc=1)
    for name in runs:
        assert out[name]["iteration"] == 2 and len(out[name]["losses"]) == 2, name
        assert all(m["load_balancing_loss"] > 0 for m in out[name]["metrics"]), name
        assert (tmp_path / name / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert "rewards/chosen" in out["dpo_qwen3_30b_a3b_16K_A3_ptd"]["metrics"][0]
    lora_save = layout.load_pt(tmp_path / "tune_qwen3_30b_a3b_4K_lora_ptd" / layout.iter_dir_name(2) / "mp_rank_00" /
                               layout.FILE_NAME)["model"]
    assert "decoder.layers.0.mlp.experts.weight1_lora_a" in lora_save       # MindSpeed's grouped adapters


@pytest.mark.distributed
def test_moe_context_parallel_recipes_run_at_cp2(moe_env, tmp_path):
    """The long-context MoE recipes, MindSpeed's flags with CP 2 (Ulysses, packed rows, --noop-layers for 235B),
    2 iterations on 2 processes, saved."""
    from tests.train_fixtures import launch_plan

    plan = [{"name": name, "argv": moe_tiny_argv(MOE_DIR / f"{name}.sh", tmp_path, _moe_paths(
        MOE_DIR / f"{name}.sh", moe_env, tmp_path / name, tmp_path), {"--context-parallel-size": "2"})}
        for name in MOE_CP_RUNS]
    out = launch_plan(tmp_path, "moe_cp_recipes", plan, nproc=2)
    for name in MOE_CP_RUNS:
        assert out[name]["iteration"] == 2 and all(math.isfinite(v) for v in out[name]["losses"]), name
        assert (tmp_path / name / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
