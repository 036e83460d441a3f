"""Model for generation: the model shape from the flags (checkpoint values fill what the flags leave out), the
parallel state, this rank's GPTModel stage and its checkpoint shard."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch

from mindspeed_llm.arguments import params_dtype
from mindspeed_llm.errors import UserError
from mindspeed_llm.models.config import ModelConfig


def resolve_model_config(args: argparse.Namespace, saved: Optional[argparse.Namespace], tokenizer_len: int,
                         source: str) -> ModelConfig:
    """Flags + the checkpoint's saved args (read from `source`) -> ModelConfig (`models.resolve.resolve_model`)."""
    from mindspeed_llm.explicit import explicit_of
    from mindspeed_llm.inference.args import build_parser
    from mindspeed_llm.models.placement import saved_without_noop
    from mindspeed_llm.models.resolve import resolve_model
    from mindspeed_llm.training.resolve_run import check_moe_layout

    if saved is not None and saved_without_noop(saved)[1]:
        raise UserError(f"{source or '--load'} was saved with --noop-layers {saved.noop_layers}; generation and "
                        f"evaluation build real layers only: convert it to HF (convert_ckpt.py mg -> hf drops "
                        f"them) and load that with --enable-hf2mg-convert")
    cfg = resolve_model(args, explicit_of(args, build_parser()), saved=saved, saved_source=source,
                        tokenizer_len=tokenizer_len)
    if cfg.num_experts is None:
        if args.expert_model_parallel_size != 1:
            raise UserError(f"--expert-model-parallel-size {args.expert_model_parallel_size}: {source or '--load'} "
                            f"holds a dense model (no experts); use 1")
        return cfg
    _follow_expert_layout(args, saved, source or "--load")
    return check_moe_layout(args, cfg, source or "--load")


def _follow_expert_layout(args: argparse.Namespace, saved: Optional[argparse.Namespace], source: str) -> None:
    """Generation builds the experts in the layout the checkpoint holds (GroupedMLP with --moe-grouped-gemm,
    else SequentialMLP): both compute the same, so a flag that differs changes the kernel, not the answer."""
    from mindspeed_llm.platform import notice

    if saved is None or not hasattr(saved, "moe_grouped_gemm"):
        return
    stored = bool(saved.moe_grouped_gemm)
    if stored != bool(args.moe_grouped_gemm):
        notice(f"--moe-grouped-gemm {'given' if args.moe_grouped_gemm else 'absent'}: {source} holds its experts in "
               f"the {'GroupedMLP' if stored else 'SequentialMLP'} layout, which this run uses")
        args.moe_grouped_gemm = stored


def read_checkpoint_args(load: str, flag: str = "--load") -> tuple[Optional[argparse.Namespace], str]:
    """(saved args, the rank file they were read from) of a Megatron checkpoint root; errors name `flag`."""
    from mindspeed_llm.checkpoint import layout
    from mindspeed_llm.checkpoint.errors import ConversionError
    from mindspeed_llm.checkpoint.load import saved_args

    root = Path(load)
    if (root / "config.json").is_file() and not (root / layout.TRACKER).is_file():
        raise UserError(f"{flag} {load} is a Hugging Face model directory; convert it first (convert_ckpt.py "
                        f"--load-model-type hf --save-model-type mg ...) and pass the output to {flag}, or add "
                        f"--enable-hf2mg-convert to convert at start-up")
    try:
        return saved_args(root)
    except ConversionError as exc:     # the layout's messages name the converter's flag
        raise UserError(str(exc).replace("--load-dir", flag)) from None


def build_and_load(args: argparse.Namespace, cfg: ModelConfig) -> torch.nn.Module:
    """This rank's GPTModel stage (eval mode, full-vocabulary logits) with its checkpoint shard loaded."""
    from mindspeed_llm.checkpoint.load import base_fingerprint, check_lora_base, load_adapters, load_checkpoint
    from mindspeed_llm.models import build_model, parse_layer_list
    from mindspeed_llm.models.resolve import weight_args
    from mindspeed_llm.models.spec import layer_spec_for
    from mindspeed_llm.platform import notice
    from mindspeed_llm.training.model_setup import moe_overrides

    layer_list = parse_layer_list(args.num_layer_list)
    moe = cfg.num_experts is not None
    # A MoE model takes the MoE or dense layer spec per layer, as training builds it (--spec names a dense one)
    chunks = build_model(cfg, params_dtype=params_dtype(args), num_layer_list=layer_list, parallel_output=False,
                         layer_spec=None if moe else layer_spec_for(args.spec, cfg.qk_layernorm),
                         **(moe_overrides(args) if moe else {}))
    expected = weight_args(cfg)
    if layer_list:
        expected["num_layer_list"] = layer_list
    base_state = load_checkpoint(chunks, args.load, expected=expected, strict=not args.load_checkpoint_loosely)
    spec = lora_spec(args)
    if spec is not None:
        fingerprint = base_fingerprint(chunks, base_state)
        del base_state
        # Adapters are merged into this rank's weight shards once (W + alpha/r * B @ A, fp32): the decode path
        # then runs the plain model at full speed.
        base = f"--load {args.load}"
        lora_state = load_adapters(chunks, args.lora_load, merge_scale=spec.scale, base=base,
                                   expected={**expected, "lora_r": spec.r, "lora_alpha": spec.alpha,
                                             "lora_target_modules": list(spec.targets)})
        check_lora_base(lora_state.get("args"), fingerprint, base, args.lora_load,
                        args.lora_ignore_base_mismatch, notice)
    return chunks[0]


def lora_spec(args: argparse.Namespace):
    """The adapters --lora-load names (None without it): targets, r and alpha from the flags, else from that
    checkpoint's saved args."""
    from mindspeed_llm.models.lora import spec_from_args

    if not args.lora_load:
        if args.lora_target_modules or args.lora_r or args.lora_alpha:
            raise UserError("--lora-target-modules/--lora-r/--lora-alpha need --lora-load (the LoRA checkpoint "
                            "whose adapters are added to --load)")
        return None
    saved, source = read_checkpoint_args(args.lora_load, "--lora-load")
    spec = spec_from_args(args, saved, source)
    if spec is None:
        raise UserError(f"--lora-load {args.lora_load}: its args name no LoRA target modules; pass "
                        f"--lora-target-modules")
    return spec
