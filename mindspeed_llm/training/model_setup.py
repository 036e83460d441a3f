"""The model of a training run (`run_config.RunConfig`, its shape resolved by `resolve_run`): the GPTModel chunks
of this rank, DDP wrapping with megatron-core's gradient hooks, the optimizer and the LR schedule."""
from __future__ import annotations

import argparse
from typing import Any, Union

import torch

from mindspeed_llm.errors import UserError
from mindspeed_llm.platform import (adapt_megatron_grad_accum_fusion, adapt_megatron_optimizer,
                                    compiled_fusions_supported, notice)
from mindspeed_llm.training.run_config import LayerSettings, RunConfig


def layer_spec(run: RunConfig):
    """`--spec MODULE ATTR` when given (must import), else our spec for the config; wrapped in a block spec
    whose final norm is our RMSNorm (megatron's default final norm refuses --sequence-parallel and would
    normalise in bf16 rather than fp32)."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from mindspeed_llm.models.placement import parse_layer_list, place_layers
    from mindspeed_llm.models.spec import RMSNorm, get_layer_spec, layer_spec_for

    cfg = run.model
    placement = place_layers(cfg.num_layers, ps.get_pipeline_model_parallel_world_size(),
                             parse_layer_list(run.parallel.num_layer_list),
                             run.parallel.num_layers_per_virtual_pipeline_stage)
    layers = placement.layers[ps.get_pipeline_model_parallel_rank()][0]
    if cfg.num_experts is not None:      # MindSpeed's qwen3 spec builds the MoE MLP where the model has experts
        specs = {moe: get_layer_spec(cfg.qk_layernorm, moe=moe, grouped_experts=run.layers.moe_grouped_gemm)
                 for moe in (False, True)}
        return TransformerBlockSubmodules(layer_specs=[specs[cfg.is_moe_layer(i)] for i in layers],
                                          layer_norm=RMSNorm)
    spec = layer_spec_for(run.layers.spec, cfg.qk_layernorm)
    return TransformerBlockSubmodules(layer_specs=[spec] * len(layers), layer_norm=RMSNorm)


def transformer_overrides(run: RunConfig) -> dict[str, Any]:
    """TransformerConfig fields that come from training flags."""
    layers, variable = run.layers, run.batch.variable_seq_lengths
    out: dict[str, Any] = dict(
        variable_seq_lengths=variable,
        calculate_per_token_loss=run.loop.calculate_per_token_loss,
        init_method_std=float(layers.init_method_std),
        hidden_dropout=float(layers.hidden_dropout),
        attention_dropout=float(layers.attention_dropout),
        # Megatron's p2p batching would pair mismatched sends on gloo with variable lengths; plain p2p is safe.
        batch_p2p_comm=not run.parallel.num_layers_per_virtual_pipeline_stage,
        # The fused kernels MindSpeed recipes ask for (same results as the default path, fewer passes).
        fused_rmsnorm=layers.use_fused_rmsnorm,
        fused_rope=layers.use_fused_rotary_pos_emb and not layers.no_rope_fusion,
        bias_activation_fusion=_fused_swiglu(layers),
        # Weight gradients accumulate straight into DDP's fp32 main grads (Megatron-LM's default).
        gradient_accumulation_fusion=not layers.no_gradient_accumulation_fusion,
        context_parallel_algo=run.parallel.context_parallel_algo,
    )
    if variable:
        out["moe_token_dispatcher_type"] = "alltoall"   # megatron refuses variable lengths with the default (MoE-only)
    if layers.recompute_granularity:
        out.update(recompute_granularity=layers.recompute_granularity, recompute_method=layers.recompute_method,
                   recompute_num_layers=layers.recompute_num_layers or 1)
    return out


def moe_overrides(flags: Union[LayerSettings, argparse.Namespace],
                  variable_seq_lengths: bool = False) -> dict[str, Any]:
    """The MoE TransformerConfig fields that flags choose (`flags`: a run's `LayerSettings`, or generation's
    parsed flags, which carry the same names): the token dispatcher and the load-balancing loss. MindSpeed's
    `softmax_topk` routes as transformers does (softmax over all experts, top-k, renormalised with
    norm_topk_prob), which the family's router settings already compute, and adds no aux loss."""
    out: dict[str, Any] = {"moe_router_load_balancing_type":
                           "aux_loss" if flags.moe_router_load_balancing_type == "aux_loss" else "none"}
    if flags.moe_aux_loss_coeff is not None:
        out["moe_aux_loss_coeff"] = float(flags.moe_aux_loss_coeff)
    out["moe_grouped_gemm"] = bool(flags.moe_grouped_gemm)
    dispatcher = flags.moe_token_dispatcher_type
    if dispatcher == "alltoall_seq":
        notice("--moe-token-dispatcher-type alltoall_seq: megatron-core 0.16 has no alltoall_seq dispatcher; "
               "running alltoall (same routing and results)")
        dispatcher = "alltoall"
    if not variable_seq_lengths:        # variable lengths run alltoall (`transformer_overrides`)
        out["moe_token_dispatcher_type"] = dispatcher
    return out


def _fused_swiglu(layers: LayerSettings) -> bool:
    if not layers.use_fused_swiglu or layers.no_bias_swiglu_fusion:
        return False
    if not compiled_fusions_supported():
        notice("--use-fused-swiglu: megatron-core's compiled SwiGLU is not verified on this device; "
               "SwiGLU runs unfused")
        return False
    return True


def build_chunks(run: RunConfig, lora: bool = True) -> list:
    """This rank's GPTModel chunks of `run.model` in training mode (with the run's LoRA adapters unless `lora` is
    False: a DPO reference is the base model)."""
    from mindspeed_llm.models.build import build_model
    from mindspeed_llm.models.lora import add_lora
    from mindspeed_llm.models.placement import parse_layer_list

    cfg = run.model
    overrides = transformer_overrides(run)
    if cfg.num_experts is not None:
        overrides.update(moe_overrides(run.layers, run.batch.variable_seq_lengths))
    if overrides["gradient_accumulation_fusion"]:
        adapt_megatron_grad_accum_fusion()
    chunks = build_model(cfg, params_dtype=run.layers.params_dtype,
                         num_layer_list=parse_layer_list(run.parallel.num_layer_list),
                         num_layers_per_virtual_pipeline_stage=run.parallel.num_layers_per_virtual_pipeline_stage,
                         sequence_parallel=run.parallel.sequence_parallel, seq_length=None,
                         layer_spec=layer_spec(run), **overrides)
    spec = run.lora if lora else None
    for c in chunks:
        if spec is not None:
            add_lora(c, spec, run.seed)
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


def wrap_ddp(run: RunConfig, chunks: list) -> list:
    """Float16Module (bf16/fp16) + megatron-core DDP per chunk, and the schedule hooks that make DP correct:
    `finalize_model_grads_func` all-reduces (or reduce-scatters) grads once per step and `no_sync_func`
    defers that to the last micro-batch; without them DP ranks step on unsynchronised gradients."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.transformer.module import Float16Module

    config = chunks[0].config
    half = run.layers.bf16 or run.layers.fp16
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=half, overlap_grad_reduce=False, overlap_param_gather=False,
        use_distributed_optimizer=run.parallel.use_distributed_optimizer, check_for_nan_in_grad=False,
        bucket_size=None, average_in_collective=False)
    wrapped = []
    for i, chunk in enumerate(chunks):
        module = Float16Module(config, chunk) if half else chunk
        wrapped.append(DistributedDataParallel(config=config, ddp_config=ddp_config, module=module,
                                               disable_bucketing=i > 0))
    no_sync = [m.no_sync for m in wrapped]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    config.grad_sync_func = None
    config.param_sync_func = None
    config.finalize_model_grads_func = finalize_model_grads
    if run.layers.fp16:
        config.grad_scale_func = None       # set once the optimizer exists (its loss scaler)
    return wrapped


def build_optimizer(run: RunConfig, model: list):
    """megatron-core optimizer (Adam/SGD; torch AdamW without Apex/TE) and the LR schedule in samples."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o, layers = run.optim, run.layers
    opt_config = OptimizerConfig(
        optimizer=o.optimizer, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        fp16=layers.fp16, bf16=layers.bf16, params_dtype=layers.params_dtype, loss_scale=o.loss_scale,
        initial_loss_scale=o.initial_loss_scale, min_loss_scale=o.min_loss_scale,
        loss_scale_window=o.loss_scale_window, hysteresis=o.hysteresis, adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, sgd_momentum=o.sgd_momentum,
        use_distributed_optimizer=run.parallel.use_distributed_optimizer, clip_grad=o.clip_grad)
    optimizer = get_megatron_optimizer(opt_config, model)
    adapt_megatron_optimizer(optimizer)
    if layers.fp16:
        model[0].config.grad_scale_func = optimizer.scale_loss
    gbs = run.batch.global_batch_size
    decay_iters = o.lr_decay_iters or run.loop.train_iters
    decay_steps = decay_iters * gbs
    warmup_steps = (int(o.lr_warmup_fraction * decay_steps) if o.lr_warmup_fraction is not None
                    else o.lr_warmup_iters * gbs)
    if warmup_steps >= decay_steps > 0:
        raise UserError(f"the LR warm-up ({warmup_steps // gbs} iterations from --lr-warmup-iters or "
                        f"--lr-warmup-fraction) must be shorter than the decay ({decay_iters} iterations from --lr-decay-iters or "
                        f"--train-iters)")
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=o.lr_warmup_init, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=warmup_steps,
        lr_decay_steps=decay_steps, lr_decay_style=o.lr_decay_style, start_wd=o.start_weight_decay,
        end_wd=o.end_weight_decay, wd_incr_steps=run.loop.train_iters * gbs,
        wd_incr_style=o.weight_decay_incr_style,
        use_checkpoint_opt_param_scheduler=o.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=o.override_opt_param_scheduler)
    return optimizer, scheduler


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module
