"""MindSpeed-LLM's dense Qwen3 recipes (current, v2.2.0 and v2.1.0 spellings; tests/recipes.py reads them from
the reference) run with only paths, shapes and sizes edited: every training and generation recipe is parsed and
validated (training also against its data's sidecar), data and checkpoint conversion recipes run through their
CLIs, and one current and one v2.1.0 fine-tuning recipe plus a generation recipe run end to end (one process)."""
from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli, run_torchrun
from mindspeed_llm.errors import UserError
from tests.recipes import load_recipes, edit, tied

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
