"""The typed run configuration: what `resolve_run` settles from the flags, the world size, the tokenizer and the
model, and that the loop, the objectives and the model builders read it rather than the argparse Namespace."""
from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest

from mindspeed_llm.arguments import build_train_parser, parse_pretrain_args, parse_train_args
from mindspeed_llm.errors import UserError
from mindspeed_llm.models.config import model_config_from_hf
from mindspeed_llm.models.lora import LoraSpec
from mindspeed_llm.training import run_config
from mindspeed_llm.training.resolve_run import resolve_run

PKG = Path(run_config.__file__).resolve().parents[1]
SHAPE = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
         "--group-query-attention", "--num-query-groups", "2", "--swiglu", "--disable-bias-linear",
         "--qk-layernorm"]
DATA = ["--data-path", "/nonexistent/prefix", "--is-instruction-dataset"]
SCHEDULE = ["--train-iters", "5", "--lr", "1e-4", "--seq-length", "64", "--micro-batch-size", "2"]
TRAIN = DATA + SCHEDULE + SHAPE
# What the run resolves beyond the flags: it has no flag of its own name.
RESOLVED = {"world_size", "data_parallel_size", "num_microbatches", "variable_seq_lengths", "hf_dir"}


def test_sections_are_named_after_the_flags():
    """Every section field is a flag destination of pretrain_gpt.py (which has all of posttrain's) or a resolved
    value, so `run.optim.lr` is --lr; DPO's names drop the dpo_ prefix of theirs."""
    dests = {a.dest for a in build_train_parser(pretrain=True)._actions}
    renamed = {"beta": "dpo_beta", "loss_type": "dpo_loss_type", "label_smoothing": "dpo_label_smoothing",
               "ftx": "pref_ftx"}
    for name in run_config.SECTIONS:
        cls = {f.name: f.type for f in dataclasses.fields(run_config.RunConfig)}[name]
        for f in dataclasses.fields(getattr(run_config, cls)):
            assert renamed.get(f.name, f.name) in dests | RESOLVED, f"{cls}.{f.name}"


def test_world_size_resolves_batches_and_the_config_is_frozen():
    run = resolve_run(parse_train_args(TRAIN + ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
                      world_size=8, tokenizer_len=100)
    assert (run.parallel.data_parallel_size, run.parallel.world_size) == (4, 8)
    # --global-batch-size defaults to micro-batch x DP, one micro-batch per step
    assert (run.batch.global_batch_size, run.batch.num_microbatches) == (8, 1)
    assert run.parallel.sequence_parallel and run.optim.lr == 1e-4 and run.loop.train_iters == 5
    # start/end weight decay default to --weight-decay
    assert run.optim.start_weight_decay == run.optim.end_weight_decay == run.optim.weight_decay
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.optim.lr = 1.0
    with pytest.raises(TypeError):
        run.flags["lr"] = 1.0
    run = resolve_run(parse_train_args(TRAIN + ["--global-batch-size", "16"]), world_size=2, tokenizer_len=100)
    assert (run.parallel.data_parallel_size, run.batch.num_microbatches) == (2, 4)
    assert not run.parallel.sequence_parallel           # Megatron: no sequence parallelism at TP 1
    with pytest.raises(UserError, match="--global-batch-size 6 is not divisible"):
        resolve_run(parse_train_args(TRAIN + ["--global-batch-size", "6"]), world_size=2, tokenizer_len=100)


def test_model_is_resolved_and_saves_record_it():
    args = parse_train_args(TRAIN + ["--padded-vocab-size", "128", "--rotary-base", "1000000"])
    run = resolve_run(args, world_size=1, tokenizer_len=100)
    assert (run.model.num_layers, run.model.num_query_groups, run.model.vocab_size) == (2, 2, 128)
    assert run.model.rotary_base == 1e6 and run.model.qk_layernorm and run.lora is None
    saved = run.saved_args(iteration=3)
    assert (saved.num_layers, saved.padded_vocab_size, saved.group_query_attention) == (2, 128, True)
    assert saved.iteration == 3
    assert (saved.lr, saved.data_parallel_size, saved.global_batch_size) == (1e-4, 1, 2)
    assert not hasattr(saved, "explicit") and args.global_batch_size is None     # the flags are left as parsed


def test_lora_and_hf2mg_are_resolved(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    run = resolve_run(parse_train_args(TRAIN + ["--load", str(base), "--lora-target-modules", "linear_qkv",
                                                "linear_proj", "--lora-r", "8"]), world_size=1, tokenizer_len=100)
    assert run.lora == LoraSpec(8, 32.0, ("linear_qkv", "linear_proj"), 0.0, ())
    assert (run.saved_args().lora_r, run.saved_args().lora_alpha) == (8, 32.0)
    hf = tmp_path / "qwen3_hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": 128, "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "tie_word_embeddings": False}))
    argv = DATA + SCHEDULE + ["--load", str(hf), "--enable-hf2mg-convert", "--save", str(tmp_path / "out")]
    run = resolve_run(parse_train_args(argv), world_size=1, tokenizer_len=100)
    # the HF model is converted beside the run's checkpoints, and loaded from there
    assert run.checkpoint.hf_dir == str(hf)
    assert run.checkpoint.load == str(tmp_path / "out" / "megatron_cache_tp1pp1ep1")
    assert run.model == model_config_from_hf(json.loads((hf / "config.json").read_text()), "qwen3",
                                             qk_layernorm=True, add_qkv_bias=False)


def test_pretraining_run_has_its_data_settings(tmp_path):
    for suffix in (".bin", ".idx"):          # only their presence is checked before the run starts
        (tmp_path / f"a_text_document{suffix}").touch()
    run = resolve_run(parse_pretrain_args(SCHEDULE + SHAPE + ["--data-path", str(tmp_path / "a_text_document"),
                                                              "--eod-mask-loss", "--split", "90,10,0"]),
                      world_size=1, tokenizer_len=100)
    assert run.stage == "pretrain" and run.data.eod_mask_loss and run.data.split == "90,10,0"


# The modules below the entry: they take the run (or one of its sections), never the parsed flags.
BELOW_THE_ENTRY = ["training/loop.py", "training/model_setup.py", "training/checkpointing.py", "training/data.py",
                   "training/log.py", "training/objectives/__init__.py", "training/objectives/sft.py",
                   "training/objectives/dpo.py", "training/objectives/pretrain.py"]


def _namespace_parameters(tree: ast.AST) -> list[str]:
    """Functions with a parameter called `args` or annotated `argparse.Namespace` alone."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for arg in node.args.args + node.args.kwonlyargs:
                only_namespace = arg.annotation is not None and ast.unparse(arg.annotation) == "argparse.Namespace"
                if arg.arg == "args" or only_namespace:
                    found.append(f"{node.name}({arg.arg})")
    return found


@pytest.mark.parametrize("module", BELOW_THE_ENTRY)
def test_below_the_entry_nothing_takes_the_parsed_flags(module):
    assert _namespace_parameters(ast.parse((PKG / module).read_text())) == []


def test_namespace_check_can_fail():
    assert _namespace_parameters(ast.parse("def f(run, args): pass\ndef g(x: argparse.Namespace): pass")) == \
        ["f(args)", "g(x)"]
