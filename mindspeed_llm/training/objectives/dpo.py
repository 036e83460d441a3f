"""Direct preference optimisation (`--stage dpo --is-pairwise-dataset`).

Batches. A micro-batch of b pairs is one [2b, L] batch: rows 0..b-1 are the chosen answers, rows b..2b-1 the
rejected ones of the same pairs (`batching.SFTCollator`), so one forward pass scores both sides of a pair.
With --reset-attention-mask it is one packed (THD) row of the 2b sequences back to back in the same order
(chosen_1..chosen_b, rejected_1..rejected_b), attention inside each and positions restarting; its length is
their sum rounded up to --pad-to-multiple-of (the padding joins the last segment), so it varies per micro-batch
and the pipeline exchanges shapes (`variable_seq_lengths`). Everything below then works per segment
(cu_seqlens boundaries) instead of per row.

Log-probabilities. The model returns the per-token cross entropy of the shifted labels (vocab-parallel under
TP), so a sequence's log-probability is minus its sum over the trained (answer) tokens. IPO uses the mean over
those tokens instead, as LLaMA-Factory and TRL do; `--pref-ftx` adds `pref_ftx` x the token-mean NLL of the
chosen answer.

Reference. A frozen copy of the model, loaded from `--ref-model` (default: the weights the run starts from;
with LoRA the base model of --load, without adapters),
runs forward-only over the iteration's micro-batches before the training pass (through the same pipeline
schedule, so TP and PP need nothing extra); its log-probabilities are attached to each micro-batch on the last
pipeline stage, where the loss is computed. It runs in eval mode without gradients.

Losses per pair, with logits = (pi_c - pi_r) - (ref_c - ref_r):
  sigmoid: -(1 - eps) log sigmoid(beta logits) - eps log sigmoid(-beta logits)   (eps = --dpo-label-smoothing)
  hinge:   relu(1 - beta logits)
  ipo:     (logits - 1 / (2 beta))^2
A micro-batch returns its mean over pairs; the schedule averages micro-batches and DDP averages DP ranks, so
the step minimises the mean over the global batch's pairs (equal micro-batch sizes).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from mindspeed_llm.errors import UserError
from mindspeed_llm.models.context_parallel import context_parallel_group
from mindspeed_llm.training.loss import whole_sequence_sums
from mindspeed_llm.training.objectives.sft import SFTObjective, model_forward
from mindspeed_llm.training.run_config import DPOSettings, LayerSettings, RunConfig

LOSS_TYPES = ("sigmoid", "hinge", "ipo")
# Logged after `lm loss`, in this order (MindSpeed-LLM's names).
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def sequence_logps(per_token_nll: torch.Tensor, loss_mask: torch.Tensor,
                   bounds: Optional[Sequence[tuple[int, int]]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token log-probs over trained positions, number of those positions) per sequence, fp32.

    One sequence per row, or with `bounds` (a packed [1, t] row's (start, end) per segment, from cu_seqlens) one
    per segment; the last token of each segment has no target already (`shift_labels`)."""
    mask = loss_mask.float()
    logps = -(per_token_nll.float() * mask)
    if bounds is None:
        return logps.sum(-1), mask.sum(-1)
    logps, mask = logps.reshape(-1), mask.reshape(-1)
    # Host bounds: sliced sums need no device-to-host copy and add in a fixed order (deterministic).
    return (torch.stack([logps[a:b].sum() for a, b in bounds]), torch.stack([mask[a:b].sum() for a, b in bounds]))


def scored_logps(per_token_nll: torch.Tensor, loss_mask: torch.Tensor, settings: DPOSettings,
                 bounds: Optional[Sequence[tuple[int, int]]] = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
    """(what the loss compares: sums, or IPO's means over the trained tokens; the sums; the token counts)."""
    # Context parallelism: each rank holds part of every sequence (the same segments, `bounds` local).
    sums, lengths = (whole_sequence_sums(x, context_parallel_group()) for x in sequence_logps(per_token_nll, loss_mask,
                                                                                              bounds))
    return (sums / lengths.clamp(min=1) if settings.loss_type == "ipo" else sums), sums, lengths


def segment_bounds(batch: dict) -> Optional[tuple]:
    """The packed row's segments as host (start, end) pairs, or None for an unpacked batch."""
    params = batch["packed_seq_params"]
    return None if params is None else params.bounds


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor,
                    settings: DPOSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen rewards, rejected rewards) from per-pair sequence log-probs."""
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    beta = settings.beta
    if settings.loss_type == "sigmoid":
        eps = settings.label_smoothing
        losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    elif settings.loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif settings.loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise UserError(f"--dpo-loss-type {settings.loss_type}: expected one of {', '.join(LOSS_TYPES)}")
    return losses, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


def pair_loss(nll: torch.Tensor, loss_mask: torch.Tensor, ref_logps: torch.Tensor, settings: DPOSettings,
              bounds: Optional[Sequence[tuple[int, int]]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss over the micro-batch's pairs, the `METRICS` values as one fp32 vector).

    `nll` and `loss_mask` are [2b, L] (chosen rows first), or a packed [1, t] row with `bounds` (2b segments,
    chosen first); `ref_logps` [2b] are the reference's `scored_logps` in the same order."""
    logps, sums, lengths = scored_logps(nll, loss_mask, settings, bounds)
    b = logps.shape[0] // 2
    losses, chosen_rewards, rejected_rewards = preference_loss(logps[:b], logps[b:], ref_logps[:b], ref_logps[b:],
                                                               settings)
    if settings.ftx:
        # SFT term: token-mean NLL of each chosen answer (independent of the IPO averaging above).
        losses = losses - settings.ftx * sums[:b] / lengths[:b].clamp(min=1)
    metrics = torch.stack([chosen_rewards.mean(), rejected_rewards.mean(),
                           (chosen_rewards > rejected_rewards).float().mean(),
                           (chosen_rewards - rejected_rewards).mean(),
                           logps[:b].detach().mean(), logps[b:].detach().mean()])
    return losses.mean(), metrics


# ---------------------------------------------------------------------------------------------------------------
# Schedule hooks
# ---------------------------------------------------------------------------------------------------------------

def _reference_loss_func(settings: DPOSettings, batch: dict, output_tensor: torch.Tensor) -> tuple:
    logps, _, _ = scored_logps(output_tensor, batch["loss_mask"], settings, segment_bounds(batch))
    return torch.zeros((), device=output_tensor.device), {"logps": logps.detach()}


def _policy_loss_func(settings: DPOSettings, batch: dict, output_tensor: torch.Tensor) -> tuple:
    loss, metrics = pair_loss(output_tensor, batch["loss_mask"], batch["ref_logps"], settings, segment_bounds(batch))
    # clone: the schedule divides the returned loss in place by the number of micro-batches.
    return loss, {"lm loss": loss.detach().clone(), "dpo": metrics}


class DPOObjective(SFTObjective):
    """DPO for `training.loop`: data and batches as SFT's (pairwise), reference log-probs before each pass, the
    pair loss, and the reward metrics. `reference` (frozen chunks) is built by `setup` unless given."""

    def __init__(self, run: RunConfig, reference: Optional[list] = None) -> None:
        super().__init__(run)
        self.settings = run.dpo
        self.reference = reference
        self.reference_from: tuple[Optional[str], Optional[int | str]] = (None, None)

    def setup(self, loaded) -> None:
        self.reference, self.reference_from = build_reference(self.run, loaded.resume)

    def recorded(self) -> dict[str, Any]:
        """The reference a resumed run reloads (`reference_source`)."""
        directory, iteration = self.reference_from
        return {"ref_model": directory, "refer_model_iter": iteration} if directory else {}

    def before_schedule(self, mb) -> None:
        """Forward-only pass of the reference over the micro-batches; the last stage keeps `ref_logps`."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def step(data_iterator, model):
            batch = next(data_iterator)
            return model_forward(model, batch), partial(_reference_loss_func, self.settings, batch)

        ref = self.reference
        iterators = [iter(mb.inputs) for _ in ref]
        with torch.no_grad():
            reports = get_forward_backward_func()(
                forward_step_func=step, data_iterator=iterators if len(ref) > 1 else iterators[0],
                model=ref if len(ref) > 1 else ref[0], num_microbatches=len(mb.inputs), seq_length=mb.seq_length,
                micro_batch_size=mb.micro_batch_size, decoder_seq_length=mb.seq_length, forward_only=True)
        if reports:        # the last pipeline stage: one report per micro-batch, in order
            for batch, report in zip(mb.inputs, reports):
                batch["ref_logps"] = report["logps"]

    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        return model_forward(model, batch), partial(_policy_loss_func, self.settings, batch)

    def metrics(self, reports: list[dict], group) -> dict[str, float]:
        """Mean over micro-batches and the DP `group` (last pipeline stage only; {} elsewhere)."""
        from mindspeed_llm.platform import to_comm_device

        if not reports:
            return {}
        values = torch.stack([r["dpo"].detach().double() for r in reports]).mean(0)
        if group is not None and torch.distributed.get_world_size(group) > 1:
            values = to_comm_device(values, group)
            torch.distributed.all_reduce(values, group=group)
            values = values / torch.distributed.get_world_size(group)
        return {name: float(v) for name, v in zip(METRICS, values.tolist())}


# ---------------------------------------------------------------------------------------------------------------
# Reference model
# ---------------------------------------------------------------------------------------------------------------

def reference_source(settings: DPOSettings, load: Optional[str],
                     resume: bool) -> tuple[str, Optional[int | str], str]:
    """(directory, iteration or None for the tracker's, where it came from) of the reference weights.

    --ref-model wins. A resumed DPO run reuses the reference recorded in its checkpoint (its own --load holds
    trained weights); any other run starts from --load, which is then the reference."""
    if settings.ref_model:
        return settings.ref_model, settings.refer_model_iter, "--ref-model"
    if resume:
        from mindspeed_llm.checkpoint import layout
        from mindspeed_llm.training.resolve_run import checkpoint_args

        saved, source = checkpoint_args(load)
        if layout.get(saved, "stage") == "dpo":
            recorded = layout.get(saved, "ref_model")
            if not recorded:
                raise UserError(f"--load {load}: resuming --stage dpo needs the reference model, which {source} "
                                f"does not record; pass --ref-model (the checkpoint the run started from)")
            iteration = settings.refer_model_iter
            if iteration is None:
                iteration = layout.get(saved, "refer_model_iter")
            return recorded, iteration, f"the reference recorded in --load {load}"
    return load, settings.refer_model_iter, "--load"


def build_reference(run: RunConfig, resume: bool) -> tuple[list, tuple[str, Optional[int | str]]]:
    """Frozen reference chunks (eval mode, no gradients), loaded as `reference_source` says, and that source
    (directory, iteration), which checkpoints record for resuming."""
    from mindspeed_llm.checkpoint import layout
    from mindspeed_llm.checkpoint.errors import ConversionError
    from mindspeed_llm.checkpoint.load import load_checkpoint
    from mindspeed_llm.models.resolve import weight_args
    from mindspeed_llm.training.checkpointing import rng_state, set_rng_state
    from mindspeed_llm.training.model_setup import build_chunks

    directory, iteration, origin = reference_source(run.dpo, run.checkpoint.load, resume)
    if not directory:
        raise UserError("--stage dpo needs a reference model: pass --load (the starting checkpoint) or --ref-model")
    if not (Path(directory) / layout.TRACKER).is_file():
        raise UserError(f"reference model ({origin}) {directory}: not a Megatron checkpoint (no {layout.TRACKER}); "
                        f"convert it with convert_ckpt.py to this run's TP/PP layout")
    if iteration is None:
        iteration = layout.read_tracker(Path(directory))
    if not (Path(directory) / layout.iter_dir_name(iteration)).is_dir():
        raise UserError(f"--refer-model-iter {iteration}: the reference checkpoint {directory} has no "
                        f"{layout.iter_dir_name(iteration)}")
    # Building draws initial weights from the RNGs; restore them so the policy's random stream (dropout) is
    # the same as without a reference.
    saved_rng = rng_state()
    chunks = build_chunks(run, lora=False)
    set_rng_state(saved_rng)
    try:
        load_checkpoint(chunks, directory, expected=weight_args(run.model),
                        strict=not run.checkpoint.load_checkpoint_loosely, iteration=iteration)
    except ConversionError as exc:
        raise UserError(f"reference model ({origin}) {directory}: {exc}") from None
    wrapped = freeze(run.layers, chunks)
    if torch.distributed.get_rank() == 0:
        print(f"reference model for --stage dpo: {directory} ({layout.iter_dir_name(iteration)}), frozen", flush=True)
    return wrapped, (str(directory), iteration)


def freeze(layers: LayerSettings, chunks: list) -> list:
    """The model chunks as a reference: eval mode, no gradients, wrapped for --bf16/--fp16 as the policy is."""
    wrapped = []
    for chunk in chunks:
        chunk.eval()
        for p in chunk.parameters():
            p.requires_grad_(False)
        if layers.bf16 or layers.fp16:
            from megatron.core.transformer.module import Float16Module

            chunk = Float16Module(chunk.config, chunk)
            chunk.eval()
        wrapped.append(chunk)
    return wrapped
