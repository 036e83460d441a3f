"""Batched model calls of the evaluation: next-token log-probabilities of option labels, and greedy generation.

Items are sorted by prompt length and cut into batches of --evaluation-batch-size; data-parallel replicas take
every dp-th batch and the per-item results are gathered on all ranks, so every rank returns all of them in
input order.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from mindspeed_llm.inference import comm
from mindspeed_llm.inference.engine import Engine
from mindspeed_llm.inference.sampling import SamplingParams

Progress = Callable[[int], None]     # called with the number of items just finished by this replica


def label_variants(tokenizer, labels: tuple[str, ...]) -> list[list[int]]:
    """Per label, the first token of "L" and of " L": after "Answer:" a model writes " A", after a chat
    template's assistant header (or "答案：") it writes "A"; a label scores its more likely spelling.

    A spelling whose first token another label shares (" A" split into " " + "A" by a small vocabulary) cannot
    tell the labels apart and is dropped."""
    from mindspeed_llm.errors import UserError

    firsts = [[int(tokenizer.encode(text, add_special_tokens=False)[0]) for text in (label, " " + label)]
              for label in labels]
    variants = []
    for n, (label, ids) in enumerate(zip(labels, firsts)):
        others = {i for m, o in enumerate(firsts) if m != n for i in o}
        kept = sorted({i for i in ids if i not in others})
        if not kept:
            raise UserError(f"the tokenizer starts option {label!r} with the same token as another option; its "
                            f"labels {', '.join(labels)} cannot be scored by the next token")
        variants.append(kept)
    return variants


def score_choices(engine: Engine, prompts: list[list[int]], variants: list[list[int]], batch_size: int,
                  progress: Optional[Progress] = None) -> list[list[float]]:
    """log p(label | prompt) per item and label (the max over the label's spellings), in input order."""
    mine: dict[int, list[float]] = {}
    for batch in _my_batches(prompts, batch_size):
        scores = _score_batch(engine, [prompts[i] for i in batch], variants)
        mine.update(zip(batch, scores.tolist()))
        if progress is not None:
            progress(len(batch))
    return _gather(mine, len(prompts))


@torch.no_grad()
def _score_batch(engine: Engine, prompts: list[list[int]], variants: list[list[int]]) -> torch.Tensor:
    lengths = torch.tensor([len(p) for p in prompts])
    tokens = torch.full((len(prompts), int(lengths.max())), engine.pad_id, dtype=torch.long)
    for row, ids in enumerate(prompts):
        tokens[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    # right padding: causal attention leaves each row's logits at its own last token untouched by the pads
    logits = engine.step(tokens, None, last=lengths - 1)
    scores = torch.zeros(len(prompts), len(variants), dtype=torch.float32)
    if logits is not None:
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        for j, ids in enumerate(variants):
            scores[:, j] = logp[:, ids].max(dim=1).values
    return engine.broadcast(scores)      # the last stage's scores reach every rank of the replica


def generate_greedy(engine: Engine, prompts: list[list[int]], batch_size: int,
                    progress: Optional[Progress] = None) -> list[list[int]]:
    """Greedy continuations (up to --max-new-tokens, stopping at eos), in input order."""
    mine: dict[int, list[int]] = {}
    for batch in _my_batches(prompts, batch_size):
        outs = engine.generate([prompts[i] for i in batch], SamplingParams()).outputs
        mine.update(zip(batch, outs))
        if progress is not None:
            progress(len(batch))
    return _gather(mine, len(prompts))


def _my_batches(prompts: list[list[int]], size: int) -> list[list[int]]:
    dp, dp_rank = comm.replica_count_and_index()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [order[i:i + size] for i in range(0, len(order), size)]
    return [b for n, b in enumerate(batches) if n % dp == dp_rank]


def _gather(mine: dict, total: int) -> list:
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[dict] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(parts, mine)
        for part in parts:
            mine.update(part)
    return [mine[i] for i in range(total)]
