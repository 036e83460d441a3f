"""SFT loss: next-token cross entropy over supervised tokens.

Label alignment. Stored labels are unshifted (label[i] == input_ids[i] where trained, -100 elsewhere), and
token i is trained to predict labels[i+1]. `shift_labels` does that shift once, in the data path
(`batching.get_batch`), so the model computes a per-token loss of shape [b, s] with labels at the same
positions as its logits (stock `GPTModel(..., labels=...)` behaviour). Shifting in the data rather than in
the model keeps results independent of how the sequence is later split (context parallel chunks). In packed
batches the last token of each segment gets -100: it must not predict the next sample's first token.

Averaging (`sft_loss_func`):
* mean mode (default, MindSpeed/Megatron behaviour): each micro-batch returns its token mean
  sum(loss * mask) / count. The megatron-core schedule divides it by the number of micro-batches and DDP
  averages gradients over DP ranks, so the gradient is that of mean over DP ranks of (mean over
  micro-batches of the per-micro-batch token mean). Micro-batches with few supervised tokens weigh as much
  as large ones. The logged `lm loss` is the same average of the per-micro-batch means.
* per-token mode (`--calculate-per-token-loss`): each micro-batch returns (sum, count); megatron-core leaves
  the sum unscaled and `finalize_model_grads` divides gradients by the token count summed over micro-batches
  and DP ranks, so the gradient is that of the token mean over the whole global batch. The logged value is
  sum of sums / sum of counts.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from mindspeed_llm.data.templates import IGNORE_INDEX
from mindspeed_llm.platform import to_comm_device


def shift_labels(labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Labels aligned with next-token logits: out[..., i] = labels[..., i + 1], last position -100.

    With `cu_seqlens` (packed THD, boundaries into the flattened last dimension), the last position of every
    segment is -100 too.
    """
    out = torch.full_like(labels, IGNORE_INDEX)
    out[..., :-1] = labels[..., 1:]
    if cu_seqlens is not None:
        flat = out.view(-1)
        ends = cu_seqlens[1:].long() - 1
        flat[ends[ends >= 0]] = IGNORE_INDEX
    return out


def loss_mask_from_labels(shifted_labels: torch.Tensor) -> torch.Tensor:
    """float32 mask of supervised positions (1 where the shifted label is trained)."""
    return (shifted_labels != IGNORE_INDEX).float()


def per_token_cross_entropy(logits: torch.Tensor, shifted_labels: torch.Tensor) -> torch.Tensor:
    """Unreduced fp32 cross entropy [b, s] from logits [b, s, V]; 0 at ignored positions."""
    return F.cross_entropy(logits.float().flatten(0, -2), shifted_labels.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="none").view(shifted_labels.shape)


def masked_sum_and_count(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of loss over supervised tokens, number of supervised tokens as int64)."""
    mask = loss_mask.reshape(-1).float()
    total = torch.sum(per_token_loss.reshape(-1).float() * mask)
    return total, mask.sum().long()


def masked_mean(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Token mean over supervised tokens; 0 (with zero gradient) when none is supervised, instead of 0/0."""
    total, count = masked_sum_and_count(per_token_loss, loss_mask)
    return total / count.clamp(min=1)


def sft_loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, per_token: bool = False,
                  cp_group: torch.distributed.ProcessGroup | None = None) -> tuple:
    """Loss function for megatron-core schedules: `partial(sft_loss_func, loss_mask)` from the forward step.

    `output_tensor` is the model's per-token loss [b, s] (labels already shifted). Returns
    mean mode: (loss, {"lm loss": loss}) -- the 2-tuple the schedule divides by the number of micro-batches;
    per-token mode: (sum, count, {"lm loss": tensor([sum, count])}) -- with
    `config.calculate_per_token_loss = True` so the schedule does not divide.

    With a context-parallel `cp_group` each rank holds part of every sequence: the reported values cover the whole
    micro-batch (sums and counts all-reduced over CP). In mean mode the returned loss is the whole micro-batch's
    mean, differentiable in this rank's tokens only; the schedule multiplies it by CP and DDP averages gradients
    over DP x CP, so the update equals CP 1's. In per-token mode the local sum is returned: gradients are summed
    over DP x CP and divided by the token count over DP x CP (`finalize_model_grads`).
    """
    total, count = masked_sum_and_count(output_tensor, loss_mask)
    whole_total, whole_count = _sum_over_cp(total, count, cp_group)
    if per_token:
        return total, count.int(), {"lm loss": torch.stack([whole_total, whole_count.to(total.dtype)])}
    # The other CP ranks' sums enter as constants: each rank's gradient is that of its own tokens.
    loss = (total + (whole_total - total.detach())) / whole_count.clamp(min=1)
    # clone: the schedule divides the returned loss in place by the number of micro-batches, and a plain
    # detach() shares that storage, which would halve the reported value at 2 micro-batches.
    return loss, {"lm loss": loss.detach().clone()}


def whole_sequence_sums(local: torch.Tensor, cp_group: torch.distributed.ProcessGroup | None) -> torch.Tensor:
    """Per-sequence sums of this CP rank's tokens -> the sums over the whole sequences (all-reduced over
    `cp_group`), differentiable in this rank's part only: the schedule multiplies the loss by CP and DDP
    averages gradients over DP x CP, so each sequence's gradient is that of all its tokens, as at CP 1."""
    if cp_group is None or torch.distributed.get_world_size(cp_group) == 1:
        return local
    whole = to_comm_device(local.detach().clone(), cp_group)
    torch.distributed.all_reduce(whole, group=cp_group)
    return local + (whole.to(local.device) - local.detach())


def _sum_over_cp(total: torch.Tensor, count: torch.Tensor,
                 cp_group: torch.distributed.ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum, token count) over the context-parallel group, detached; the local values without one."""
    pair = torch.stack([total.detach().clone(), count.to(total.dtype)])
    if cp_group is not None and torch.distributed.get_world_size(cp_group) > 1:
        pair = to_comm_device(pair, cp_group)       # the loss lives on the compute device already: no copy there
        torch.distributed.all_reduce(pair, group=cp_group)
    return pair[0], pair[1].round().long()


def reported_loss(reports: Sequence[torch.Tensor], per_token: bool,
                  group: torch.distributed.ProcessGroup | None = None) -> float:
    """The `lm loss` to log for one iteration from the micro-batches' `{"lm loss": ...}` values.

    Mean mode: average of the per-micro-batch means, averaged over the DP `group`. Per-token mode: sum of
    sums / sum of counts over micro-batches and the DP `group`.
    """
    if not reports:
        return float("nan")
    if per_token:
        pair = torch.stack([r.detach().double().reshape(2) for r in reports]).sum(0)
    else:
        pair = torch.stack([torch.stack([r.detach().double().reshape(()),
                                         torch.ones((), dtype=torch.float64, device=r.device)])
                            for r in reports]).sum(0)
    if group is not None and torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1:
        pair = to_comm_device(pair, group)
        torch.distributed.all_reduce(pair, group=group)
    return float(pair[0] / pair[1].clamp(min=1))
