"""Batched greedy / sampled decoding of prompts of different lengths.

Prompts sit right-padded in one buffer; every row keeps its own positions 0..n-1, so RoPE and the causal mask
are exactly those of the row alone. Decoding starts after the shortest prompt: at position t a row whose prompt
is longer still takes its own prompt token, the others take the sampled one (the reference's ragged prefill).
With the KV cache the prefix up to the shortest prompt is encoded at once and every later position costs one
token per row; without it the whole prefix is recomputed each step. Batch callers sort prompts by length so
rows in one batch have similar lengths.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from mindspeed_llm.inference.decode import decode_stage_for
from mindspeed_llm.inference.decode_loop import generate_static
from mindspeed_llm.inference.forward import KVCache, StageForward
from mindspeed_llm.inference.results import Generated, StepCallback
from mindspeed_llm.inference.sampling import SamplingParams, choose


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
def generate(step: StageForward, prompts: list[list[int]], *, max_new_tokens: int, params: SamplingParams,
             stop: StopCriteria, pad_id: int, broadcast: Callable[[torch.Tensor], torch.Tensor],
             generator: Optional[torch.Generator] = None, use_cache: bool = True,
             on_step: Optional[StepCallback] = None) -> Generated:
    """Decode up to `max_new_tokens` per row; every rank of the model replica returns the same result.

    `broadcast` sends the sampling rank's new-token column to the replica (see `comm.ReplicaBroadcast`);
    `on_step(row, outputs_so_far)` is called after each step (streaming).
    """
    if use_cache:
        stage = decode_stage_for(step)
        if stage is not None:
            return generate_static(stage, prompts, max_new_tokens=max_new_tokens, params=params, stop=stop,
                                   pad_id=pad_id, broadcast=broadcast, is_src=broadcast_is_src(broadcast),
                                   generator=generator, on_step=on_step)
    device = step.device
    batch = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    total = int(lengths.max()) + max_new_tokens
    tokens = torch.full((batch, total), pad_id, dtype=torch.long, device=device)
    for row, ids in enumerate(prompts):
        tokens[row, :len(ids)] = torch.tensor(ids, dtype=torch.long, device=device)
    outputs: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    stopped = [False] * batch
    cache = KVCache(batch, total) if use_cache else None
    new = torch.empty(batch, dtype=torch.long, device=device)
    for t in range(int(lengths.min()), total):
        window = tokens[:, cache.offset:t] if cache is not None else tokens[:, :t]
        logits = step(window, cache)
        if logits is not None and broadcast_is_src(broadcast):
            new.copy_(choose(logits, params, generator))
        broadcast(new)
        started = lengths <= t
        column = torch.where(started, new, tokens[:, t])
        tokens[:, t] = column
        for row, (token, live) in enumerate(zip(column.tolist(), started.tolist())):
            if done[row] or not live:
                continue
            outputs[row].append(token)
            if stop.hit(outputs[row]):
                done[row] = stopped[row] = True
            elif len(outputs[row]) >= max_new_tokens:
                done[row] = True
        if on_step is not None:
            on_step(t, outputs)
        if all(done):
            break
    return Generated(outputs, stopped)


def broadcast_is_src(broadcast: Callable) -> bool:
    """Whether this rank is the one that samples (a plain function broadcast means a world of one)."""
    return getattr(broadcast, "is_src", True)
