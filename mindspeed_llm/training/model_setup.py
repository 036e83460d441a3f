"""The model of a fine-tuning run: its shape (flags, HF config or checkpoint), the GPTModel chunks of this rank,
DDP wrapping with megatron-core's gradient hooks, the optimizer and the LR schedule."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

import torch

from mindspeed_llm.arguments import params_dtype
from mindspeed_llm.errors import UserError
from mindspeed_llm.models.placement import parse_noop_layers, saved_without_noop, with_noop_layers
from mindspeed_llm.training.validate import check_expert_split, check_moe_sequence_parallel
from mindspeed_llm.platform import (adapt_megatron_grad_accum_fusion, adapt_megatron_optimizer,
                                    compiled_fusions_supported, notice)


def checkpoint_args(load: Optional[str]) -> tuple[Optional[argparse.Namespace], str]:
    """(saved args, the file they were read from) of the checkpoint --load names; (None, "") without a tracker."""
    if not load:
        return None, ""
    from mindspeed_llm.checkpoint import layout
    from mindspeed_llm.checkpoint.load import saved_args

    if not (Path(load) / layout.TRACKER).is_file():
        return None, ""
    return saved_args(load)


def model_config(args: argparse.Namespace, tokenizer_len: int, hf_dir: Optional[str] = None):
    """The run's `ModelConfig` (`models.resolve.resolve_model`): typed flags checked against the --load
    checkpoint's saved args and, with --enable-hf2mg-convert, the HF config.json in `hf_dir`; they fill the rest."""
    from mindspeed_llm.arguments import build_train_parser
    from mindspeed_llm.explicit import explicit_of
    from mindspeed_llm.models.config import read_hf_config
    from mindspeed_llm.models.resolve import resolve_model

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


def check_moe_layout(args: argparse.Namespace, cfg, source: str):
    """`cfg` of a MoE model; an error when --expert-model-parallel-size does not divide its experts, or when
    --moe-layer-freq / --first-k-dense-replace name other dense layers than it has."""
    check_expert_split(cfg.num_experts, args.expert_model_parallel_size, source)
    if args.moe_layer_freq is not None or args.first_k_dense_replace is not None:
        from mindspeed_llm.models.resolve import dense_layers

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


def layer_spec(args: argparse.Namespace, cfg):
    """`--spec MODULE ATTR` when given (must import), else our spec for the config; wrapped in a block spec
    whose final norm is our RMSNorm (megatron's default final norm refuses --sequence-parallel and would
    normalise in bf16 rather than fp32)."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from mindspeed_llm.models.placement import parse_layer_list, place_layers
    from mindspeed_llm.models.spec import RMSNorm, get_layer_spec, layer_spec_for

    placement = place_layers(cfg.num_layers, ps.get_pipeline_model_parallel_world_size(),
                             parse_layer_list(args.num_layer_list), args.num_layers_per_virtual_pipeline_stage)
    layers = placement.layers[ps.get_pipeline_model_parallel_rank()][0]
    if cfg.num_experts is not None:      # MindSpeed's qwen3 spec builds the MoE MLP where the model has experts
        specs = {moe: get_layer_spec(cfg.qk_layernorm, moe=moe, grouped_experts=args.moe_grouped_gemm)
                 for moe in (False, True)}
        return TransformerBlockSubmodules(layer_specs=[specs[cfg.is_moe_layer(i)] for i in layers],
                                          layer_norm=RMSNorm)
    spec = layer_spec_for(args.spec, cfg.qk_layernorm)
    return TransformerBlockSubmodules(layer_specs=[spec] * len(layers), layer_norm=RMSNorm)


def transformer_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """TransformerConfig fields that come from training flags."""
    out: dict[str, Any] = dict(
        variable_seq_lengths=bool(args.variable_seq_lengths),
        calculate_per_token_loss=bool(args.calculate_per_token_loss),
        init_method_std=float(args.init_method_std),
        hidden_dropout=float(args.hidden_dropout),
        attention_dropout=float(args.attention_dropout),
        # Megatron's p2p batching would pair mismatched sends on gloo with variable lengths; plain p2p is safe.
        batch_p2p_comm=not bool(args.num_layers_per_virtual_pipeline_stage),
        # The fused kernels MindSpeed recipes ask for (same results as the default path, fewer passes).
        fused_rmsnorm=bool(args.use_fused_rmsnorm),
        fused_rope=bool(args.use_fused_rotary_pos_emb) and not args.no_rope_fusion,
        bias_activation_fusion=_fused_swiglu(args),
        # Weight gradients accumulate straight into DDP's fp32 main grads (Megatron-LM's default).
        gradient_accumulation_fusion=not args.no_gradient_accumulation_fusion,
        context_parallel_algo=args.context_parallel_algo,
    )
    if args.variable_seq_lengths:
        out["moe_token_dispatcher_type"] = "alltoall"   # megatron refuses variable lengths with the default (MoE-only)
    if args.recompute_granularity:
        out.update(recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
                   recompute_num_layers=args.recompute_num_layers or 1)
    return out


def moe_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The MoE TransformerConfig fields that training flags choose: the token dispatcher and the load-balancing
    loss. MindSpeed's `softmax_topk` routes as transformers does (softmax over all experts, top-k, renormalised
    with norm_topk_prob), which the family's router settings already compute, and adds no aux loss."""
    out: dict[str, Any] = {"moe_router_load_balancing_type":
                           "aux_loss" if args.moe_router_load_balancing_type == "aux_loss" else "none"}
    if args.moe_aux_loss_coeff is not None:
        out["moe_aux_loss_coeff"] = float(args.moe_aux_loss_coeff)
    out["moe_grouped_gemm"] = bool(args.moe_grouped_gemm)
    dispatcher = args.moe_token_dispatcher_type
    if dispatcher == "alltoall_seq":
        notice("--moe-token-dispatcher-type alltoall_seq: megatron-core 0.16 has no alltoall_seq dispatcher; "
               "running alltoall (same routing and results)")
        dispatcher = "alltoall"
    if not getattr(args, "variable_seq_lengths", False):     # a training flag
        out["moe_token_dispatcher_type"] = dispatcher
    return out


def _fused_swiglu(args: argparse.Namespace) -> bool:
    if not args.use_fused_swiglu or args.no_bias_swiglu_fusion:
        return False
    if not compiled_fusions_supported():
        notice("--use-fused-swiglu: megatron-core's compiled SwiGLU is not verified on this device; "
               "SwiGLU runs unfused")
        return False
    return True


def build_chunks(args: argparse.Namespace, cfg, lora: bool = True) -> list:
    """This rank's GPTModel chunks in training mode (with the --lora-target-modules adapters unless `lora` is
    False: a DPO reference is the base model)."""
    from mindspeed_llm.models.build import build_model
    from mindspeed_llm.models.lora import add_lora
    from mindspeed_llm.models.placement import parse_layer_list

    overrides = transformer_overrides(args)
    if cfg.num_experts is not None:
        overrides.update(moe_overrides(args))
    if overrides["gradient_accumulation_fusion"]:
        adapt_megatron_grad_accum_fusion()
    chunks = build_model(cfg, params_dtype=params_dtype(args), num_layer_list=parse_layer_list(args.num_layer_list),
                         num_layers_per_virtual_pipeline_stage=args.num_layers_per_virtual_pipeline_stage,
                         sequence_parallel=args.sequence_parallel, seq_length=None,
                         layer_spec=layer_spec(args, cfg), **overrides)
    spec = lora_spec(args) if lora else None
    for c in chunks:
        if spec is not None:
            add_lora(c, spec, args.seed)
        c.train()
    if spec is not None:
        _report_trainable(spec, chunks)
    return chunks


def _report_trainable(spec, chunks: list) -> None:
    """One line: what LoRA trains, summed over the model-parallel ranks (every replica holds the same)."""
    from megatron.core import parallel_state as ps

    from mindspeed_llm.platform import device_tensor

    params = [p for c in chunks for p in c.parameters()]
    counts = device_tensor([float(sum(p.numel() for p in params if p.requires_grad)),
                            float(sum(p.numel() for p in params))], torch.float64)
    torch.distributed.all_reduce(counts, group=ps.get_model_parallel_group())
    if torch.distributed.get_rank() == 0:
        trained, total = int(counts[0]), int(counts[1])
        print(f"LoRA r={spec.r} alpha={spec.alpha:g} on {' '.join(spec.targets)}: {trained:,} trainable of "
              f"{total:,} parameters on the model-parallel ranks ({100 * trained / total:.2f}%)", flush=True)


def lora_spec(args: argparse.Namespace):
    """The run's `models.lora.LoraSpec` (None without --lora-target-modules); r and alpha default to the
    --lora-load checkpoint's and are written back into args, so saves record what ran."""
    from mindspeed_llm.models.lora import spec_from_args

    saved, source = checkpoint_args(args.lora_load)
    spec = spec_from_args(args, saved, source or "--lora-load")
    if spec is not None:
        args.lora_r, args.lora_alpha = spec.r, spec.alpha
    return spec


def wrap_ddp(args: argparse.Namespace, chunks: list) -> list:
    """Float16Module (bf16/fp16) + megatron-core DDP per chunk, and the schedule hooks that make DP correct:
    `finalize_model_grads_func` all-reduces (or reduce-scatters) grads once per step and `no_sync_func`
    defers that to the last micro-batch; without them DP ranks step on unsynchronised gradients."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.transformer.module import Float16Module

    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=bool(args.bf16 or args.fp16), overlap_grad_reduce=False, overlap_param_gather=False,
        use_distributed_optimizer=bool(args.use_distributed_optimizer), check_for_nan_in_grad=False,
        bucket_size=None, average_in_collective=False)
    wrapped = []
    for i, chunk in enumerate(chunks):
        module = Float16Module(config, chunk) if (args.bf16 or args.fp16) else chunk
        wrapped.append(DistributedDataParallel(config=config, ddp_config=ddp_config, module=module,
                                               disable_bucketing=i > 0))
    no_sync = [m.no_sync for m in wrapped]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    config.grad_sync_func = None
    config.param_sync_func = None
    config.finalize_model_grads_func = finalize_model_grads
    if args.fp16:
        config.grad_scale_func = None       # set once the optimizer exists (its loss scaler)
    return wrapped


def build_optimizer(args: argparse.Namespace, model: list):
    """megatron-core optimizer (Adam/SGD; torch AdamW without Apex/TE) and the LR schedule in samples."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt_config = OptimizerConfig(
        optimizer=args.optimizer, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        fp16=args.fp16, bf16=args.bf16, params_dtype=params_dtype(args), loss_scale=args.loss_scale,
        initial_loss_scale=args.initial_loss_scale, min_loss_scale=args.min_loss_scale,
        loss_scale_window=args.loss_scale_window, hysteresis=args.hysteresis, adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, sgd_momentum=args.sgd_momentum,
        use_distributed_optimizer=args.use_distributed_optimizer, clip_grad=args.clip_grad)
    optimizer = get_megatron_optimizer(opt_config, model)
    adapt_megatron_optimizer(optimizer)
    if args.fp16:
        model[0].config.grad_scale_func = optimizer.scale_loss
    gbs = args.global_batch_size
    decay_iters = args.lr_decay_iters or args.train_iters
    decay_steps = decay_iters * gbs
    warmup_steps = (int(args.lr_warmup_fraction * decay_steps) if args.lr_warmup_fraction is not None
                    else args.lr_warmup_iters * gbs)
    if warmup_steps >= decay_steps > 0:
        raise UserError(f"the LR warm-up ({warmup_steps // gbs} iterations from --lr-warmup-iters or "
                        f"--lr-warmup-fraction) must be shorter than the decay ({decay_iters} iterations from --lr-decay-iters or "
                        f"--train-iters)")
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=warmup_steps,
        lr_decay_steps=decay_steps, lr_decay_style=args.lr_decay_style, start_wd=args.start_weight_decay,
        end_wd=args.end_weight_decay, wd_incr_steps=args.train_iters * gbs,
        wd_incr_style=args.weight_decay_incr_style,
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler)
    return optimizer, scheduler


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module
