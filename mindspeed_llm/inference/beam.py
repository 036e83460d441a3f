"""Beam search for one prompt (greedy or sampled candidate selection), with the KV cache reordered per step."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from mindspeed_llm.inference.comm import ReplicaBroadcast
from mindspeed_llm.inference.decode import DecodeStage
from mindspeed_llm.inference.generation import StopCriteria
from mindspeed_llm.inference.sampling import SamplingParams, filter_logits


class _Hypotheses:
    """Finished beams, scored by log-prob / length^penalty; keeps the best `size`."""

    def __init__(self, size: int, length_penalty: float) -> None:
        self.size, self.penalty = size, length_penalty
        self.items: list[tuple[float, list[int]]] = []

    def add(self, ids: list[int], logprob: float) -> None:
        self.items.append((logprob / max(len(ids), 1) ** self.penalty, ids))
        self.items.sort(key=lambda x: -x[0])
        del self.items[self.size:]

    def done(self, best_live_logprob: float, length: int) -> bool:
        """No live beam can still beat the worst kept hypothesis (scores only fall as beams grow)."""
        if len(self.items) < self.size:
            return False
        return best_live_logprob / max(length, 1) ** self.penalty <= self.items[-1][0]


@torch.no_grad()
def beam_search(stage: DecodeStage, prompt: list[int], *, num_beams: int, max_new_tokens: int,
                params: SamplingParams, stop: StopCriteria, pad_id: int, broadcast: ReplicaBroadcast,
                generator: Optional[torch.Generator] = None, use_cache: bool = True,
                length_penalty: float = 1.0) -> list[int]:
    """The best hypothesis's generated ids (stop token included when it ended with one); every rank of the model
    replica returns it. An ended beam counts when it ranks within the top `num_beams` candidates of its step."""
    device, n = stage.device, len(prompt)
    total = n + max_new_tokens
    tokens = torch.full((num_beams, total), pad_id, dtype=torch.long, device=device)
    tokens[:, :n] = torch.tensor(prompt, dtype=torch.long, device=device)
    scores = torch.zeros(num_beams, dtype=torch.float64, device=device)
    cache = stage.new_cache(num_beams, total)
    finished = _Hypotheses(num_beams, length_penalty)
    packet = torch.zeros(3 * num_beams + 1, dtype=torch.float64, device=device)   # rows, tokens, scores, done
    stop_ids = stop.ids
    for t in range(n, total):
        if not use_cache:
            cache.rewind()
        logits = stage(tokens[:, cache.offset:t], cache)
        if logits is not None and broadcast.is_src:
            packet.copy_(_select(logits, scores, t - n, tokens, n, num_beams, params, stop_ids, finished,
                                 generator, last=t == total - 1))
        broadcast(packet)
        rows = packet[:num_beams].long()
        tokens = tokens[rows]
        tokens[:, t] = packet[num_beams:2 * num_beams].long()
        scores = packet[2 * num_beams:3 * num_beams].clone()
        if use_cache:
            cache.reorder(rows)
        if packet[-1] > 0:
            break
    best: list[int] = []
    if broadcast.is_src:
        if not finished.items:   # nothing ended: the best live beam
            for b in range(num_beams):
                finished.add(tokens[b, n:t + 1].tolist(), float(scores[b]))
        best = finished.items[0][1]
    if broadcast.size > 1:
        box = [best]
        dist.broadcast_object_list(box, src=broadcast.src, group=broadcast.group)
        best = box[0]
    return best


def _select(logits: torch.Tensor, scores: torch.Tensor, step_index: int, tokens: torch.Tensor, n: int,
            num_beams: int, params: SamplingParams, stop_ids: frozenset[int], finished: _Hypotheses,
            generator: Optional[torch.Generator], last: bool) -> torch.Tensor:
    """Next beams as one packet [source rows | tokens | scores | done]."""
    logits = logits.double()
    if params.do_sample:
        logits = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    logp = logits.log_softmax(dim=-1) + scores.unsqueeze(1).to(logits.device)
    if step_index == 0:           # all beams hold the same prompt: expand from one row only
        logp = logp[:1]
    vocab = logp.shape[-1]
    flat = logp.reshape(-1)
    k = min(2 * num_beams, int(torch.isfinite(flat).sum()))
    if params.do_sample:
        probs = (flat - flat.max()).exp()
        picks = torch.multinomial(probs.float().cpu(), k, replacement=False, generator=generator).to(flat.device)
        cand_scores, order = flat[picks].sort(descending=True)
        cand = picks[order]
    else:
        cand_scores, cand = flat.topk(k)
    rows, toks, new_scores = [], [], []
    for rank, (idx, score) in enumerate(zip(cand.tolist(), cand_scores.tolist())):
        row, token = divmod(idx, vocab)
        if token in stop_ids:
            if rank < num_beams:
                finished.add(tokens[row, n:n + step_index].tolist() + [token], score)
            continue
        rows.append(row)
        toks.append(token)
        new_scores.append(score)
        if len(rows) == num_beams:
            break
    while len(rows) < num_beams:            # fewer finite candidates than beams (tiny vocab after filtering)
        rows.append(rows[-1] if rows else 0)
        toks.append(toks[-1] if toks else next(iter(stop_ids)))
        new_scores.append(float("-inf"))
    done = finished.done(max(new_scores), step_index + 1) or last
    if last:
        for row, token, score in zip(rows, toks, new_scores):
            finished.add(tokens[row, n:n + step_index].tolist() + [token], score)
    packet = torch.tensor(rows + toks + new_scores + [1.0 if done else 0.0], dtype=torch.float64)
    return packet
