"""The one training loop on megatron-core: set-up, `train_step`, evaluation, checkpoints, exit conditions and
NaN handling. What is trained (SFT, DPO, pretraining) is an `objectives.Objective`, picked by --stage: it reads
the data, builds each iteration's micro-batches, and supplies the forward step, the loss and extra metrics."""
from __future__ import annotations

import gc
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mindspeed_llm.checkpoint.hf2mg import Hf2MgOptions
from mindspeed_llm.checkpoint.startup import convert_at_startup
from mindspeed_llm.errors import UserError
from mindspeed_llm.models.placement import parse_layer_list, place_layers
from mindspeed_llm.training.objectives import OBJECTIVES, Objective
from mindspeed_llm.training.run_config import RunConfig, load_tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------------------------

def set_seed(seed: int) -> None:
    """Megatron's seeding: seed + 100 x pp_rank for python/numpy/torch, + 2718 + tp_rank for the TP tracker."""
    from megatron.core import parallel_state as ps, tensor_parallel

    seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def init_run(run: RunConfig) -> None:
    """Process groups for the run's parallel layout, and Megatron's seeds."""
    from mindspeed_llm.platform import init_distributed

    p = run.parallel
    vpp = None
    if p.num_layers_per_virtual_pipeline_stage:
        vpp = place_layers(run.model.num_layers, p.pipeline_model_parallel_size, None,
                           p.num_layers_per_virtual_pipeline_stage).vpp
        vpp = vpp if vpp > 1 else None
    init_distributed(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, vpp,
                     backend=p.distributed_backend, seed=run.seed, timeout_minutes=p.distributed_timeout_minutes,
                     expert_model_parallel_size=p.expert_model_parallel_size,
                     expert_tensor_parallel_size=p.expert_tensor_parallel_size,
                     context_parallel_size=p.context_parallel_size,
                     ulysses_degree_in_cp=p.ulysses_degree_in_cp if p.context_parallel_algo == "hybrid_cp_algo"
                     else None)
    set_seed(run.seed)


def hf2mg_options(run: RunConfig) -> Hf2MgOptions:
    """--enable-hf2mg-convert: the HF model converted to this run's layout (noop layers and all)."""
    p = run.parallel
    return Hf2MgOptions(
        load_dir=Path(run.checkpoint.hf_dir), save_dir=Path(run.checkpoint.load),
        model_type_hf=run.checkpoint.model_type_hf, tp=p.tensor_model_parallel_size,
        pp=p.pipeline_model_parallel_size, ep=p.expert_model_parallel_size,
        num_layer_list=parse_layer_list(p.num_layer_list),
        layers_per_vpp_stage=p.num_layers_per_virtual_pipeline_stage,
        noop_layers=",".join(map(str, run.model.noop_layers)) or None,
        params_dtype="bf16" if run.layers.bf16 else "fp16" if run.layers.fp16 else None,
        grouped_gemm=run.layers.moe_grouped_gemm, etp=p.expert_tensor_parallel_size)


# ---------------------------------------------------------------------------------------------------------------
# One step
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class StepResult:
    loss: float                           # the reported lm loss (same on every rank)
    skipped: bool                         # the update was not applied
    nan: bool                             # ... because the loss or the gradient norm was not finite
    grad_norm: Optional[float]
    metrics: dict[str, float]             # the objective's extra values (last pipeline stage; {} elsewhere)


def run_schedule(run: RunConfig, model: list, mb, forward_only: bool,
                 objective: Objective) -> tuple[float, dict[str, float]]:
    """Forward (and backward) over one iteration's micro-batches: (reported loss on every rank, the objective's
    metrics on the last pipeline stage, {} elsewhere)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mindspeed_llm.platform import device_tensor
    from mindspeed_llm.training.loss import reported_loss

    objective.before_schedule(mb)
    iterators = [iter(mb.inputs) for _ in model]
    reports = get_forward_backward_func()(
        forward_step_func=objective.forward_step,
        data_iterator=iterators if len(model) > 1 else iterators[0], model=model if len(model) > 1 else model[0],
        num_microbatches=len(mb.inputs), seq_length=mb.seq_length, micro_batch_size=mb.micro_batch_size,
        decoder_seq_length=mb.seq_length, forward_only=forward_only)
    value = device_tensor([0.0], torch.float64, ps.get_pipeline_model_parallel_group())
    metrics: dict[str, float] = {}
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        value[0] = reported_loss([r["lm loss"] for r in reports], run.loop.calculate_per_token_loss,
                                 ps.get_data_parallel_group())
        metrics = objective.metrics(reports, ps.get_data_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(value, group=ps.get_pipeline_model_parallel_group())
    return float(value[0]), metrics


def train_step(run: RunConfig, model: list, optimizer, mb, objective: Objective) -> StepResult:
    """One optimizer step. A non-finite loss or gradient norm never reaches the weights: the update is not
    applied and `nan` is set (the caller stops, or skips with --skip-nan)."""
    for m in model:
        m.zero_grad_buffer()
    optimizer.zero_grad()
    loss, metrics = run_schedule(run, model, mb, forward_only=False, objective=objective)
    check = run.loop.check_for_nan_in_loss_and_grad
    if check and not math.isfinite(loss):
        return StepResult(loss, True, True, None, metrics)
    return StepResult(loss, *_guarded_step(optimizer, run.optim.clip_grad, check), metrics)


def _guarded_step(optimizer, clip_grad: float, check: bool) -> tuple[bool, bool, Optional[float]]:
    """megatron-core's `optimizer.step()` with a finite check of the gradient norm between clipping and the
    update (its own step applies NaN gradients unless fp16 loss scaling catches them). (skipped, nan, norm)."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    if optimizer.prepare_grads():              # fp16 loss-scale overflow: the scaler backs off, step skipped
        return True, False, None
    grad_norm = float(optimizer.get_grad_norm())   # collective over the grad-stats group: same on every rank
    if check and not math.isfinite(grad_norm):
        return True, True, grad_norm
    if clip_grad > 0.0:
        for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
            params = inner.get_parameters()
            if params and not getattr(inner, "is_stub_optimizer", False):
                decoupled = inner.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
                clip_grad_by_total_norm_fp32(params, max_norm=clip_grad, total_norm=grad_norm,
                                             use_decoupled_grad=decoupled)
    ok = optimizer.step_with_ready_grads()
    return not ok, False, grad_norm


def evaluate(run: RunConfig, model: list, data, iteration: int, device, objective: Objective) -> None:
    from mindspeed_llm.training.log import validation_line

    for m in model:
        m.eval()
    total = 0.0
    sums: dict[str, float] = {}        # the objective's metrics (already DP means), summed over eval iterations
    with torch.no_grad():
        for _ in range(run.loop.eval_iters):
            mb = objective.micro_batches(data.valid_iter, device)
            loss, metrics = run_schedule(run, model, mb, forward_only=True, objective=objective)
            total += loss
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
    for m in model:
        m.train()
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        metrics = {key: value / run.loop.eval_iters for key, value in sums.items()}
        print(validation_line(iteration, total / run.loop.eval_iters, metrics), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Exit conditions
# ---------------------------------------------------------------------------------------------------------------

class SignalFlag:
    """SIGTERM (torchrun forwards it) with --exit-signal-handler: finish the step, save, exit."""

    def __init__(self, enabled: bool) -> None:
        self.received = False
        self.enabled = enabled
        if enabled:
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = True

    def any_rank(self) -> bool:
        if not self.enabled:
            return False
        from mindspeed_llm.platform import device_tensor

        flag = device_tensor([int(self.received)], torch.int64)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def _minutes_exceeded(minutes: Optional[float], start: float) -> bool:
    if not minutes:
        return False
    from mindspeed_llm.platform import device_tensor

    flag = device_tensor([int((time.time() - start) / 60 > minutes)], torch.int64)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    iteration: int
    losses: list[float] = field(default_factory=list)        # reported lm loss per iteration run here
    grad_norms: list[Optional[float]] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)   # the objective's extras (last stage)
    seconds: float = 0.0                                       # wall time of the iterations
    tokens: float = 0.0                                        # real tokens trained, all DP ranks
    flops: float = 0.0                                         # FLOPs the log's TFLOP/s counts, all DP ranks


def train(run: RunConfig, keep_process_group: bool = False) -> TrainResult:
    """Run the training `run` describes (`run_config.resolve_run`), with the objective `OBJECTIVES[run.stage]`.
    `keep_process_group` leaves torch.distributed up so one launch can run several configurations (tests,
    benchmarks)."""
    from megatron.core import parallel_state as ps

    from mindspeed_llm.platform import current_device, destroy_distributed, device_tensor
    from mindspeed_llm.training import checkpointing as ckpt
    from mindspeed_llm.training import model_setup
    from mindspeed_llm.training.log import (TrainLog, flops_per_iteration, load_balancing_loss, print_args,
                                            tracks_load_balancing_loss)

    start = time.time()
    init_run(run)
    tokenizer = load_tokenizer(run.data, run.checkpoint.hf_dir)
    objective = OBJECTIVES[run.stage](run)
    objective.check_data(tokenizer)                  # data before the conversion: the quick checks first
    if run.checkpoint.enable_hf2mg_convert:
        convert_at_startup(hf2mg_options(run))
    print_args(run)
    chunks = model_setup.build_chunks(run)
    loaded = ckpt.load_model(run, chunks)
    objective.setup(loaded)
    model = model_setup.wrap_ddp(run, chunks)
    optimizer, scheduler = model_setup.build_optimizer(run, model)
    ckpt.load_training_state(run, loaded, optimizer, scheduler)
    iteration, consumed = loaded.iteration, loaded.consumed_samples
    data = objective.build_data(tokenizer, consumed)
    device = current_device()
    log = TrainLog(run)
    if torch.distributed.get_rank() == 0:
        print(f"time to initialize (seconds): {time.time() - start:.3f}", flush=True)
    loop = run.loop
    signals = SignalFlag(loop.exit_signal_handler)
    saved_at = -1

    def save() -> None:
        nonlocal saved_at
        if run.checkpoint.save and saved_at != iteration:
            ckpt.save_checkpoint(run, iteration, model, optimizer, scheduler, consumed,
                                 {**loaded.recorded, **objective.recorded()})
            saved_at = iteration

    dp_group = ps.get_data_parallel_group()
    grad_norm = None
    result = TrainResult(iteration)
    loop_start = time.time()

    def finish() -> TrainResult:
        log.close()
        if loop.manual_gc:
            gc.enable()
        result.iteration = iteration
        result.seconds = time.time() - loop_start
        torch.distributed.barrier()
        if not keep_process_group:
            destroy_distributed()
        return result

    if loop.manual_gc:      # as Megatron: no automatic collection pauses, one collection every N iterations
        gc.disable()
        gc.collect()
    gbs = run.batch.global_batch_size
    while iteration < loop.train_iters and not loop.skip_train:
        mb = objective.micro_batches(data.train_iter, device)
        step = train_step(run, model, optimizer, mb, objective)
        loss, skipped, nan, norm, metrics = step.loss, step.skipped, step.nan, step.grad_norm, step.metrics
        if tracks_load_balancing_loss(chunks[0].config):
            metrics = {**metrics, "load_balancing_loss": load_balancing_loss(run.model, run.batch.num_microbatches)}
        iteration += 1
        consumed += gbs
        if loop.manual_gc and loop.manual_gc_interval and iteration % loop.manual_gc_interval == 0:
            gc.collect()
        if nan and not loop.skip_nan:
            what = "loss" if not math.isfinite(loss) else f"gradient (grad norm {norm})"
            raise UserError(f"NaN/inf {what} at iteration {iteration}; the update was not applied and this "
                            f"state is not saved. Lower --lr, check the data, or pass --skip-nan to skip such "
                            f"iterations")
        if not (skipped or nan):
            scheduler.step(increment=gbs)      # a skipped update does not advance the LR
        grad_norm = norm
        stats = device_tensor([flops_per_iteration(run.model, mb.flop_terms, True, run.lora), float(mb.tokens)],
                              torch.float64, dp_group)
        torch.distributed.all_reduce(stats, group=dp_group)
        log.add(loss, skipped, nan, float(stats[0]), float(stats[1]), [t[2] for t in mb.flop_terms], metrics)
        result.losses.append(loss)
        if metrics:
            result.metrics.append(metrics)
        result.grad_norms.append(norm)
        result.tokens += float(stats[1])
        result.flops += float(stats[0])
        if iteration % loop.log_interval == 0:
            scale = optimizer.get_loss_scale()
            log.emit(iteration, consumed, optimizer.param_groups[0]["lr"],
                     float(scale) if scale is not None else 1.0, grad_norm)
        if data.valid_iter is not None and loop.eval_interval and iteration % loop.eval_interval == 0:
            evaluate(run, model, data, iteration, device, objective)
        if run.checkpoint.save_interval and iteration % run.checkpoint.save_interval == 0:
            save()
        if signals.any_rank() or _minutes_exceeded(loop.exit_duration_in_mins, start):
            save()
            _exit_message(iteration)
            return finish()
        if loop.exit_interval and iteration % loop.exit_interval == 0:
            save()
            _exit_message(iteration)
            return finish()
    save()
    # As Megatron: a final evaluation unless the loop just ran one; --skip-train evaluates the loaded weights.
    if data.valid_iter is not None and (loop.skip_train or (
            iteration > 0 and not (loop.eval_interval and iteration % loop.eval_interval == 0))):
        evaluate(run, model, data, iteration, device, objective)
    return finish()


def _exit_message(iteration: int) -> None:
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        print(f"exiting program at iteration {iteration}", flush=True)
