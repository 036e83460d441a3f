"""Our Qwen3 recipes start on the published checkpoints' own config.json values, not only on the tiny model's.

Each recipe's argv (captured from examples/mcore/qwen3/*.sh) goes through the entry script's parser and the
start-up model resolution it runs, against the published Qwen3 config.json written to disk (for
--enable-hf2mg-convert recipes) or a converted checkpoint's saved args (for --load recipes, generation and
evaluation). The checkpoint is weightless (its rank file holds the args convert_ckpt.py writes, no tensors):
everything the start-up reads before building the model is real."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from mindspeed_llm.checkpoint import layout
from mindspeed_llm.checkpoint.hf2mg import Hf2MgOptions, checkpoint_args
from mindspeed_llm.errors import UserError
from mindspeed_llm.models.placement import place_layers
from mindspeed_llm.models.registry import get_family
from mindspeed_llm.models.resolve import model_record, resolve_model
from tests.conftest import REPO
from tests.recipes import recipe_argv

# config.json of the published Qwen/Qwen3-* checkpoints (the fields the model depends on, as published).
_COMMON = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
           "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 40960, "num_key_value_heads": 8,
           "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "torch_dtype": "bfloat16",
           "vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151645}
# size: (hidden_size, intermediate_size, num_attention_heads, num_hidden_layers, tie_word_embeddings)
_SHAPES = {"0point6b": (1024, 3072, 16, 28, True), "1point7b": (2048, 6144, 16, 28, True),
           "4b": (2560, 9728, 32, 36, True), "8b": (4096, 12288, 32, 36, False), "14b": (5120, 17408, 40, 40, False),
           "32b": (5120, 25600, 64, 64, False)}
PUBLISHED = {size: {**_COMMON, **dict(zip(("hidden_size", "intermediate_size", "num_attention_heads",
                                           "num_hidden_layers", "tie_word_embeddings"), shape))}
             for size, shape in _SHAPES.items()}
QWEN3_TOKENIZER_LEN = 151669
SCRIPTS = sorted(p for p in (REPO / "examples" / "mcore" / "qwen3").glob("*_ptd.sh")
                 if p.stem.split("_")[0] in ("tune", "dpo", "generate", "evaluate"))
ENTRY = {"tune": "posttrain_gpt.py", "dpo": "posttrain_gpt.py", "generate": "inference.py",
         "evaluate": "evaluation.py"}


def _size(script: Path) -> str:
    return script.stem.split("_")[2]


def write_hf_config(directory: Path, size: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(PUBLISHED[size]))
    return directory


def write_weightless_checkpoint(save_dir: Path, hf_dir: Path, tp: int = 1, pp: int = 1,
                                saved: argparse.Namespace | None = None) -> Path:
    """A converted checkpoint's layout and saved args (what convert_ckpt.py hf->mg writes), without tensors."""
    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    cfg = resolve_model(hf=hf_cfg, hf_source=str(hf_dir / "config.json"))
    if saved is None:
        opts = Hf2MgOptions(load_dir=hf_dir, save_dir=save_dir, tp=tp, pp=pp)
        saved = checkpoint_args(hf_cfg, get_family(cfg.family), cfg, opts, place_layers(cfg.num_layers, pp),
                                save_dir / layout.iter_dir_name(1))
    tmp = layout.new_iteration_dir(save_dir, 1)
    for p in range(pp):
        for t in range(tp):
            layout.save_rank_file(tmp, layout.rank_dir_name(t, p, pp), layout.checkpoint_state(saved, {}))
    layout.publish_iteration(tmp, save_dir, 1)
    return save_dir


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _set(argv: list[str], flag: str, value: str) -> None:
    """Replace the value of `flag` (the evaluate recipes' placeholder paths hold spaces: several words)."""
    start = argv.index(flag) + 1
    end = start
    while end < len(argv) and not argv[end].startswith("--"):
        end += 1
    argv[start:end] = [value]


def _start_up_config(script: Path, tmp_path: Path):
    """(argv, the ModelConfig the entry script resolves at start-up) for `script` on the published config."""
    kind = script.stem.split("_")[0]
    argv = recipe_argv(script, tmp_path, ENTRY[kind])
    hf_dir = write_hf_config(tmp_path / "qwen3_hf", _size(script))
    if "--enable-hf2mg-convert" in argv:
        _set(argv, "--load", str(hf_dir))
    else:
        tp = int(_flag(argv, "--tensor-model-parallel-size"))
        pp = int(_flag(argv, "--pipeline-model-parallel-size"))
        _set(argv, "--load", str(write_weightless_checkpoint(tmp_path / "mcore", hf_dir, tp, pp)))
    _set(argv, "--tokenizer-name-or-path", str(hf_dir))
    if kind in ("tune", "dpo"):
        from mindspeed_llm.arguments import parse_train_args
        from mindspeed_llm.training.resolve_run import model_config

        args = parse_train_args(argv)
        return argv, model_config(args, QWEN3_TOKENIZER_LEN, str(hf_dir) if args.enable_hf2mg_convert else None)
    from mindspeed_llm.inference.model import read_checkpoint_args, resolve_model_config

    if kind == "generate":
        from mindspeed_llm.inference.args import parse_args
    else:
        from mindspeed_llm.evaluation.args import parse_args
        argv += ["--results-file", str(tmp_path / "results.json")]
    args = parse_args(argv)
    saved, source = read_checkpoint_args(args.load)
    return argv, resolve_model_config(args, saved, QWEN3_TOKENIZER_LEN, source)


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_recipe_starts_on_the_published_config(script, tmp_path, capsys):
    argv, cfg = _start_up_config(script, tmp_path)
    published = PUBLISHED[_size(script)]
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads, cfg.num_query_groups,
            cfg.kv_channels, cfg.vocab_size, cfg.tie_word_embeddings) == \
        (published["num_hidden_layers"], published["hidden_size"], published["intermediate_size"],
         published["num_attention_heads"], published["num_key_value_heads"], published["head_dim"],
         published["vocab_size"], published["tie_word_embeddings"])
    assert cfg.qk_layernorm and cfg.rotary_base == 1e6 and cfg.norm_epsilon == 1e-6
    typed = int(_flag(argv, "--max-position-embeddings"))
    assert cfg.max_position_embeddings == typed          # the run setting the recipe typed
    notices = [line for line in capsys.readouterr().err.splitlines() if "--max-position-embeddings" in line
               and "differs from" in line]
    assert len(notices) == (typed != 40960), notices
    if notices:
        assert f"--max-position-embeddings {typed} differs from" in notices[0] and "= 40960" in notices[0]


def test_mindspeed_recipe_values_are_ours():
    """Our recipes pass MindSpeed's own --max-position-embeddings values (not values edited to match 40960)."""
    from tests.recipes import load_recipes

    reference = {name.split("/", 1)[1]: dict((f[0], f[1:]) for f in flags)
                 for name, (_, flags) in load_recipes().items() if name.startswith("qwen3/")}
    compared = 0
    for script in SCRIPTS:
        ref = reference.get(script.stem, {}).get("--max-position-embeddings")
        if ref:
            ours = script.read_text().split("--max-position-embeddings ", 1)[1].split()[0]
            assert ours == ref[0], script.name
            compared += 1
    assert compared >= 15
    assert any(r.get("--max-position-embeddings") == ["4096"] for r in reference.values())


def test_typed_values_that_size_weights_still_must_agree(tmp_path):
    """The exception covers run settings only: a shape or numerics flag that disagrees is still one error."""
    from mindspeed_llm.arguments import parse_train_args
    from mindspeed_llm.training.resolve_run import model_config

    script = REPO / "examples/mcore/qwen3/tune_qwen3_8b_4K_full_ptd.sh"
    argv = recipe_argv(script, tmp_path)
    hf_dir = write_hf_config(tmp_path / "qwen3_hf", "8b")
    _set(argv, "--load", str(write_weightless_checkpoint(tmp_path / "mcore", hf_dir, 1, 4)))
    for flag, value, recorded in (("--rotary-base", "10000", "rotary_base = 1000000.0"),
                                  ("--norm-epsilon", "1e-05", "norm_epsilon = 1e-06"),
                                  ("--ffn-hidden-size", "11008", "ffn_hidden_size = 12288")):
        edited = list(argv)
        edited[edited.index(flag) + 1] = value
        with pytest.raises(UserError, match=rf"{flag} {value}\S* disagrees with .*, which records {recorded}"):
            model_config(parse_train_args(edited), QWEN3_TOKENIZER_LEN)


def test_mg2hf_accepts_a_checkpoint_trained_with_another_value(tmp_path):
    """mg->hf of a checkpoint trained with --max-position-embeddings 4096 resolves against the published
    config.json without a disagreement (the export copies that config.json: tests/test_recipes.py checks the
    copied value on the tiny model)."""
    from mindspeed_llm.checkpoint.mg2hf import model_from_args

    hf_dir = write_hf_config(tmp_path / "qwen3_hf", "8b")
    cfg = resolve_model(hf=PUBLISHED["8b"])
    trained = argparse.Namespace(**{**model_record(cfg), "tensor_model_parallel_size": 1,
                                    "pipeline_model_parallel_size": 1, "model_type_hf": cfg.family,
                                    "max_position_embeddings": 4096})
    _, resolved = model_from_args(trained, hf_cfg_dir=hf_dir, source="trained")
    assert resolved.max_position_embeddings == 4096 and resolved.hidden_size == 4096


# --- Qwen3-MoE: Qwen/Qwen3-30B-A3B's config.json, and our examples/mcore/qwen3_moe/ 30B recipes ---------------
QWEN3_30B_A3B = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False,
                 "decoder_sparse_step": 1, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
                 "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 48,
                 "mlp_only_layers": [], "moe_intermediate_size": 768, "norm_topk_prob": True,
                 "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
                 "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_scaling": None,
                 "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "tie_word_embeddings": False,
                 "torch_dtype": "bfloat16", "vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151645}
MOE_SCRIPTS = [REPO / "examples" / "mcore" / "qwen3_moe" / f"{name}.sh"
               for name in ("tune_qwen3_30b_a3b_4K_full_ptd", "dpo_qwen3_30b_a3b_16K_A3_ptd")]


@pytest.mark.parametrize("script", MOE_SCRIPTS, ids=[p.stem for p in MOE_SCRIPTS])
def test_moe_recipe_starts_on_the_published_config(script, tmp_path, capsys):
    """Full SFT (start-up conversion of the HF config) and DPO (a converted TP2 PP8 checkpoint's saved args):
    the recipe's flags resolve against Qwen3-30B-A3B: 128 experts, top-8, expert FFN 768, every layer MoE."""
    from mindspeed_llm.arguments import parse_train_args
    from mindspeed_llm.training.resolve_run import model_config

    argv = recipe_argv(script, tmp_path)
    hf_dir = tmp_path / "qwen3_moe_hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(QWEN3_30B_A3B))
    if "--enable-hf2mg-convert" in argv:
        _set(argv, "--load", str(hf_dir))
    else:
        tp, pp = int(_flag(argv, "--tensor-model-parallel-size")), int(_flag(argv, "--pipeline-model-parallel-size"))
        _set(argv, "--load", str(write_weightless_checkpoint(tmp_path / "mcore", hf_dir, tp, pp)))
    _set(argv, "--tokenizer-name-or-path", str(hf_dir))
    args = parse_train_args(argv)
    cfg = model_config(args, QWEN3_TOKENIZER_LEN, str(hf_dir) if args.enable_hf2mg_convert else None)
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups,
            cfg.kv_channels, cfg.vocab_size, cfg.tie_word_embeddings) == ("qwen3-moe", 48, 2048, 32, 4, 128, 151936,
                                                                          False)
    assert (cfg.num_experts, cfg.moe_router_topk, cfg.moe_ffn_hidden_size, cfg.norm_topk_prob,
            cfg.dense_layers) == (128, 8, 768, True, ())
    assert cfg.max_position_embeddings == int(_flag(argv, "--max-position-embeddings"))
    assert "differs from" in capsys.readouterr().err      # the recipe's 4096 / 16384 against the published 40960
