"""Flags -> the run's typed configuration (`run_config.RunConfig`), once, at the entry:

    train(resolve_run(parse_train_args()))

Here the parsed flags are checked against what only the whole run shows (the world size, the tokenizer, the
--load checkpoint's saved args, the HF config.json with --enable-hf2mg-convert) and the model is resolved
(`models.resolve`); below the entry nothing reads the argparse Namespace."""
from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Optional

from mindspeed_llm.arguments import build_train_parser
from mindspeed_llm.checkpoint import layout
from mindspeed_llm.checkpoint.load import saved_args
from mindspeed_llm.checkpoint.startup import hf2mg_cache_dir
from mindspeed_llm.errors import UserError
from mindspeed_llm.explicit import explicit_of
from mindspeed_llm.models.config import ModelConfig, read_hf_config
from mindspeed_llm.models.lora import LoraSpec, spec_from_args
from mindspeed_llm.models.placement import parse_noop_layers, saved_without_noop, with_noop_layers
from mindspeed_llm.models.resolve import dense_layers, resolve_model
from mindspeed_llm.training.run_config import (BatchSettings, CheckpointSettings, DataSettings, DPOSettings,
                                               LayerSettings, LoopSettings, OptimizerSettings, ParallelSettings,
                                               RunConfig, load_tokenizer, section)
from mindspeed_llm.platform import notice
from mindspeed_llm.training.validate import check_expert_split, check_moe_sequence_parallel, resolve_world


def resolve_run(args: argparse.Namespace, world_size: Optional[int] = None,
                tokenizer_len: Optional[int] = None) -> RunConfig:
    """The run `args` (`parse_train_args` / `parse_pretrain_args`, already validated flag by flag) describes, on
    `world_size` processes (default: torchrun's WORLD_SIZE): every cross-check that needs the world size, the
    tokenizer, the --load checkpoint or the HF config.json is made here, before any process group exists.
    `tokenizer_len` stands in for the tokenizer's length where there is none (benchmarks, tests)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    values = dict(vars(args))
    values.pop("explicit", None)
    world = resolve_world(args, world_size)
    parallel = section(ParallelSettings, values, world_size=world_size, data_parallel_size=world.data_parallel_size)
    batch = section(BatchSettings, values, global_batch_size=world.global_batch_size,
                    num_microbatches=world.num_microbatches)
    data = section(DataSettings, values)
    checkpoint = section(CheckpointSettings, values)
    if args.enable_hf2mg_convert:
        checkpoint = replace(checkpoint, hf_dir=args.load, load=hf2mg_cache_dir(
            args.load, args.save, args.mg_save_dir, args.tensor_model_parallel_size,
            args.pipeline_model_parallel_size, args.expert_model_parallel_size))
    check_model_flags(args)
    if tokenizer_len is None:
        tokenizer_len = len(load_tokenizer(data, checkpoint.hf_dir))
    cfg = model_config(args, tokenizer_len, checkpoint.hf_dir)
    lora = lora_spec(args)
    values.update(world_size=world_size, data_parallel_size=world.data_parallel_size,
                  global_batch_size=world.global_batch_size, num_microbatches=world.num_microbatches,
                  load=checkpoint.load)
    if lora is not None:        # r and alpha the adapters get (the --lora-load checkpoint's by default)
        values.update(lora_r=lora.r, lora_alpha=lora.alpha)
    return RunConfig(
        stage=args.stage, seed=args.seed, model=cfg, lora=lora, parallel=parallel, batch=batch, data=data,
        layers=section(LayerSettings, values), optim=section(OptimizerSettings, values),
        loop=section(LoopSettings, values), checkpoint=checkpoint,
        dpo=DPOSettings(args.dpo_beta, args.dpo_loss_type, args.dpo_label_smoothing, args.pref_ftx, args.ref_model,
                        args.refer_model_iter) if args.stage == "dpo" else DPOSettings(),
        flags=MappingProxyType(values))


def checkpoint_args(load: Optional[str]) -> tuple[Optional[argparse.Namespace], str]:
    """(saved args, the file they were read from) of the checkpoint --load names; (None, "") without a tracker."""
    if not load:
        return None, ""
    if not (Path(load) / layout.TRACKER).is_file():
        return None, ""
    return saved_args(load)


def model_config(args: argparse.Namespace, tokenizer_len: int, hf_dir: Optional[str] = None) -> ModelConfig:
    """The run's `ModelConfig` (`models.resolve.resolve_model`): typed flags checked against the --load
    checkpoint's saved args and, with --enable-hf2mg-convert, the HF config.json in `hf_dir`; they fill the rest."""
    saved, source = checkpoint_args(args.load)
    hf = read_hf_config(hf_dir) if hf_dir is not None else None
    # --noop-layers: the shape is resolved in the HF model's (real) layers, then renumbered with the noop ones
    typed, noop = args, parse_noop_layers(args.noop_layers, args.num_layers or 0)
    if noop:
        typed = argparse.Namespace(**{**vars(args), "num_layers": args.num_layers - len(noop)})
    if saved is not None:
        saved, saved_noop = saved_without_noop(saved)
        if saved_noop != noop:
            raise UserError(f"--noop-layers {args.noop_layers or '(none)'} disagrees with {source}, saved with "
                            f"noop layers {','.join(map(str, sorted(saved_noop))) or '(none)'}; pass the same")
    cfg = resolve_model(typed, explicit_of(args, build_train_parser()), saved=saved, saved_source=source,
                        hf=hf, hf_source=str(Path(hf_dir) / "config.json") if hf_dir else "",
                        tokenizer_len=tokenizer_len)
    cfg = with_noop_layers(cfg, noop)
    where = str(Path(hf_dir) / "config.json") if hf_dir else (source or "the flags")
    return _check_seq_length(args, _check_moe(args, cfg, where), where)


def _check_moe(args: argparse.Namespace, cfg, source: str):
    """The MoE flags against the model (SFT, LoRA on sequential experts, DPO and context parallelism all run
    on MoE models)."""
    ep = args.expert_model_parallel_size
    if cfg.num_experts is None:
        if ep != 1:
            raise UserError(f"--expert-model-parallel-size {ep}: {source} holds a dense model (no experts); use 1")
        return cfg
    check_moe_sequence_parallel(args, source)
    return check_moe_layout(args, cfg, source)


def check_moe_layout(args: argparse.Namespace, cfg: ModelConfig, source: str) -> ModelConfig:
    """`cfg` of a MoE model; an error when --expert-model-parallel-size does not divide its experts, or when
    --moe-layer-freq / --first-k-dense-replace name other dense layers than it has."""
    check_expert_split(cfg.num_experts, args.expert_model_parallel_size, source)
    if args.moe_layer_freq is not None or args.first_k_dense_replace is not None:
        typed = dense_layers(argparse.Namespace(moe_layer_freq=args.moe_layer_freq,
                                                first_k_dense_replace=args.first_k_dense_replace), cfg.num_layers)
        typed = tuple(i for i in typed if i not in cfg.noop_layers)       # a noop layer has no MLP at all
        if typed != tuple(cfg.dense_layers):
            raise UserError(f"--moe-layer-freq {args.moe_layer_freq} --first-k-dense-replace "
                            f"{args.first_k_dense_replace} make layers {list(typed)} dense, but {source} has dense "
                            f"layers {list(cfg.dense_layers)}; drop the flags or match the model")
    return cfg


def _check_seq_length(args: argparse.Namespace, cfg, source: str):
    """Rotary positions past max_position_embeddings were never trained (and break scaled RoPE)."""
    if args.seq_length > cfg.max_position_embeddings:
        raise UserError(f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
                        f"{cfg.max_position_embeddings} (from {source}); lower --seq-length")
    return cfg


def check_model_flags(args: argparse.Namespace) -> None:
    """Architecture flags the layer spec implements; anything else is refused rather than silently changed."""
    if not args.enable_hf2mg_convert:
        if not args.swiglu:
            raise UserError("--swiglu is required: only gated SiLU MLPs (Qwen/Llama) are implemented")
        if not args.disable_bias_linear:
            raise UserError("--disable-bias-linear is required: linear biases (other than --add-qkv-bias) are "
                            "not implemented")
    if args.transformer_impl == "transformer_engine":
        notice("--transformer-impl transformer_engine: using the local megatron-core layers with SDPA attention")


def lora_spec(args: argparse.Namespace) -> Optional[LoraSpec]:
    """The run's `models.lora.LoraSpec` (None without --lora-target-modules); r and alpha default to the
    --lora-load checkpoint's."""
    saved, source = checkpoint_args(args.lora_load)
    return spec_from_args(args, saved, source or "--lora-load")


