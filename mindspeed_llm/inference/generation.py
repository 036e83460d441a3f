"""Batched greedy / sampled decoding of prompts of different lengths, with stop checks on the device.

Prompts sit right-padded in one buffer; every row keeps its own positions 0..n-1, so RoPE and the causal mask
are exactly those of the row alone. Decoding starts after the shortest prompt: at position t a row whose prompt
is longer still takes its own prompt token, the others take the sampled one (the reference's ragged prefill).
With the KV cache the prefix up to the shortest prompt is encoded at once and every later position costs one
token per row; without it the whole prefix is recomputed each step. Batch callers sort prompts by length so
rows in one batch have similar lengths.

What a per-token Python loop would do with lists -- recording tokens, stop ids, multi-token stop sequences, the
--max-new-tokens limit -- is done with tensors: `count[row]` generated tokens sit in `tokens[row, len(row):]`.
The host reads the device only when a streaming callback wants the tokens, and every few steps (every step on the
CPU, where reading is free) to leave the loop once all rows are done; steps run after that point change no output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from mindspeed_llm.inference.decode import DecodeStage
from mindspeed_llm.inference.results import Generated, StepCallback
from mindspeed_llm.inference.sampling import SamplingParams, choose

# Steps between "all rows done?" reads on accelerators (each read waits for the device).
DONE_CHECK_EVERY = 8


@dataclass(frozen=True)
class StopCriteria:
    """Stop ids (eos, single-token stop words) and multi-token stop sequences."""

    ids: frozenset[int]
    sequences: tuple[tuple[int, ...], ...] = ()

    def hit(self, row_output: Sequence[int]) -> bool:
        if row_output and row_output[-1] in self.ids:
            return True
        return any(len(row_output) >= len(s) and tuple(row_output[-len(s):]) == s for s in self.sequences)


@torch.no_grad()
def generate(stage: DecodeStage, prompts: list[list[int]], *, max_new_tokens: int, params: SamplingParams,
             stop: StopCriteria, pad_id: int, broadcast: Callable[[torch.Tensor], torch.Tensor],
             generator: Optional[torch.Generator] = None, use_cache: bool = True,
             on_step: Optional[StepCallback] = None) -> Generated:
    """Decode up to `max_new_tokens` per row; every rank of the model replica returns the same result.

    `broadcast` sends the sampling rank's new-token column to the replica (see `comm.ReplicaBroadcast`);
    `on_step(t, outputs_so_far)` is called after each step (streaming).
    """
    device = stage.device
    batch = len(prompts)
    plens = [len(p) for p in prompts]
    lengths = torch.tensor(plens, device=device)
    total = max(plens) + max_new_tokens
    tokens = torch.full((batch, total), pad_id, dtype=torch.long, device=device)
    for row, ids in enumerate(prompts):
        tokens[row, :len(ids)] = torch.tensor(ids, dtype=torch.long, device=device)
    stop_ids = torch.tensor(sorted(stop.ids), dtype=torch.long, device=device)
    sequences = [torch.tensor(s, dtype=torch.long, device=device) for s in stop.sequences]
    count = torch.zeros(batch, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    stopped = torch.zeros(batch, dtype=torch.bool, device=device)
    outputs: list[list[int]] = [[] for _ in range(batch)]
    cache = stage.new_cache(batch, total)
    new = torch.empty(batch, dtype=torch.long, device=device)
    check_every = 1 if device.type == "cpu" else DONE_CHECK_EVERY
    is_src = broadcast_is_src(broadcast)
    first = min(plens)
    for t in range(first, total):
        if not use_cache:
            cache.rewind()
        logits = stage(tokens[:, cache.offset:t], cache)
        if logits is not None and is_src:
            new.copy_(choose(logits, params, generator))
        broadcast(new)
        started = lengths <= t
        column = torch.where(started, new, tokens[:, t])
        tokens[:, t] = column
        record = started & ~done
        count += record
        hit = torch.isin(column, stop_ids) if stop_ids.numel() else torch.zeros_like(record)
        for seq in sequences:
            n = seq.numel()
            if t + 1 >= n:
                hit = hit | ((tokens[:, t + 1 - n:t + 1] == seq).all(dim=1) & (count >= n))
        hit = hit & record
        stopped |= hit
        done |= hit | (record & (count >= max_new_tokens))
        if on_step is not None:
            for row, (token, rec) in enumerate(zip(*torch.stack((column, record.long())).tolist())):
                if rec:
                    outputs[row].append(token)
            on_step(t, outputs)
        if (t - first + 1) % check_every == 0 and bool(done.all()):
            break
    counts = count.tolist()
    rows = tokens.tolist()
    outputs = [rows[r][plens[r]:plens[r] + counts[r]] for r in range(batch)]
    return Generated(outputs, [bool(x) for x in stopped.tolist()])


def broadcast_is_src(broadcast: Callable) -> bool:
    """Whether this rank is the one that samples (a plain function broadcast means a world of one)."""
    return getattr(broadcast, "is_src", True)
