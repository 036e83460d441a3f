"""Vocab-parallel cross entropy that never holds an fp32 copy of the logits.

megatron-core's `vocab_parallel_cross_entropy` upcasts all logits [s, b, V/tp] to fp32 and keeps the fp32 softmax
for the backward pass: with Qwen3's 151,936-token vocabulary and 4096 tokens that is 2.5 GB per micro-batch next
to the bf16 logits. Here the logits stay in their own dtype and the fp32 work runs a block of tokens at a time:
the forward pass reads the logits once (an online log-sum-exp per shard, rescaled to the global max after the
tensor-parallel reductions), the backward pass recomputes the softmax from them. The math is megatron-core's, in
fp32; the peak memory is that of the bf16 logits plus one block. The TP group spans the vocabulary shards of the
output layer.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

BLOCK_ELEMENTS = 1 << 25        # fp32 elements per block of tokens (128 MiB)


def _blocks(rows: int, vocab: int, block_elements: int) -> list[tuple[int, int]]:
    step = max(1, block_elements // max(vocab, 1))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def _all_reduce(t: torch.Tensor, op: Any, group: Any) -> None:
    if group is None or group.size() == 1:
        return
    from mindspeed_llm.platform import to_comm_device

    comm = to_comm_device(t, group)
    torch.distributed.all_reduce(comm, op=op, group=group)
    if comm is not t:
        t.copy_(comm)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group: Any, block_elements: int) -> torch.Tensor:
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)
        rank = group.rank() if group is not None else 0
        local = target.reshape(-1) - rank * vocab
        ours = (local >= 0) & (local < vocab)
        local = local.masked_fill(~ours, 0)
        rows = flat.shape[0]
        local_max = torch.empty(rows, dtype=torch.float32, device=flat.device)
        sums = torch.empty(2, rows, dtype=torch.float32, device=flat.device)    # sum of exp, target logit
        for a, b in _blocks(rows, vocab, block_elements):       # one read of the logits: online log-sum-exp
            x = flat[a:b].to(torch.float32, copy=True)      # in-place work below: never on the logits
            local_max[a:b] = x.amax(-1)
            sums[1, a:b] = x.gather(1, local[a:b, None]).squeeze(1) * ours[a:b]
            sums[0, a:b] = x.sub_(local_max[a:b, None]).exp_().sum(-1)
        global_max = local_max.clone()
        _all_reduce(global_max, torch.distributed.ReduceOp.MAX, group)
        sums[0] *= torch.exp(local_max - global_max)            # rescale this shard's sums to the global max
        _all_reduce(sums, torch.distributed.ReduceOp.SUM, group)
        log_norm = global_max + sums[0].log()
        ctx.save_for_backward(logits, local, ours, log_norm)
        ctx.block_elements = block_elements
        return (log_norm - sums[1]).view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, local, ours, log_norm = ctx.saved_tensors
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)
        grad_rows = grad_loss.reshape(-1).float()
        grad = torch.empty_like(flat)
        for a, b in _blocks(flat.shape[0], vocab, ctx.block_elements):
            # the softmax over the whole vocabulary (a copy: the in-place work never touches the logits)
            probs = flat[a:b].to(torch.float32, copy=True).sub_(log_norm[a:b, None]).exp_()
            probs[torch.arange(b - a, device=flat.device), local[a:b]] -= ours[a:b].float()
            grad[a:b] = probs.mul_(grad_rows[a:b, None])
        return grad.view_as(logits), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group: Optional[Any] = None,
                                 block_elements: int = BLOCK_ELEMENTS) -> torch.Tensor:
    """Per-token fp32 loss [s, b] of vocab-parallel `logits` [s, b, V/tp] against global token ids `target` [s, b]
    (megatron-core's `tensor_parallel.vocab_parallel_cross_entropy`, without label smoothing). Targets outside
    the vocabulary (e.g. -100) give log-sum-exp, as megatron-core's do; mask them out of the loss."""
    return _VocabParallelCrossEntropy.apply(logits, target, group, block_elements)
