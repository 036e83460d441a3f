"""Context parallelism (CP) for unpacked (sbhd) batches: the batch split and the core-attention algorithms.

Every CP rank holds 2 of the 2N sequence chunks of a micro-batch (N = CP size): rank i holds chunks i and
2N-1-i, so causal work is balanced (megatron-core's `get_batch_on_this_cp_rank`; megatron-core's RoPE slices its
angles the same way). Tokens, labels, loss masks and positions are split alike; labels are shifted before the
split, so no prediction is lost at a chunk boundary. Core attention then sees the local q/k/v and must attend
over the whole causal sequence; `CP_ATTENTION` maps `--context-parallel-algo` to the module that does it:

* `ulysses_cp_algo` (`UlyssesAttention`): all-to-all from sequence-split to head-split, causal attention over the
  full sequence (chunks put back in order), and the inverse all-to-all;
* `megatron_cp_algo` (`RingAttention`): the local queries attend to every rank's K/V block, visited in ring order
  (all-gathered over the CP group), partial results merged by log-sum-exp, with the load-balanced causal rules.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.mappings import all_to_all, gather_from_sequence_parallel_region
from megatron.core.utils import get_batch_on_this_cp_rank

from mindspeed_llm.errors import UserError


def context_parallel_group() -> Optional[torch.distributed.ProcessGroup]:
    """megatron-core's CP group when the parallel state exists and has more than one CP rank, else None."""
    if not ps.model_parallel_is_initialized() or ps.get_context_parallel_world_size() == 1:
        return None
    return ps.get_context_parallel_group()


def split_batch_for_cp(inputs: dict[str, Any], cp_group: Optional[torch.distributed.ProcessGroup]) -> dict[str, Any]:
    """This CP rank's chunks (i and 2N-1-i of 2N) of `tokens`, `labels`, `loss_mask` and `position_ids` [b, L];
    `inputs` unchanged without a CP group. Only causal batches (`attention_mask` None, not packed) split here."""
    if cp_group is None or cp_group.size() == 1:
        return inputs
    if inputs.get("attention_mask") is not None or inputs.get("packed_seq_params") is not None:
        raise UserError("--context-parallel-size: only unpacked, right-padded batches can be split across CP ranks")
    length = inputs["tokens"].shape[1]
    if length % (2 * cp_group.size()):
        raise UserError(f"--context-parallel-size {cp_group.size()}: a micro-batch of length {length} is not "
                        f"divisible by 2 x CP = {2 * cp_group.size()}")
    keys = ("tokens", "labels", "loss_mask", "position_ids")
    split = get_batch_on_this_cp_rank({k: inputs[k] for k in keys}, cp_group)
    return {**inputs, **split}


def _zigzag_to_sequence(x: torch.Tensor, cp: int) -> torch.Tensor:
    """[cp, s/cp, ...] (rank j's chunks j and 2cp-1-j) -> [s, ...] in sequence order."""
    halves = x.reshape(cp, 2, x.shape[1] // 2, *x.shape[2:])
    return torch.cat((halves[:, 0].flatten(0, 1), halves[:, 1].flip(0).flatten(0, 1)))


def _sequence_to_zigzag(x: torch.Tensor, cp: int) -> torch.Tensor:
    """Inverse of `_zigzag_to_sequence`: [s, ...] -> [cp, s/cp, ...]."""
    chunks = x.reshape(2 * cp, x.shape[0] // (2 * cp), *x.shape[1:])
    return torch.stack((chunks[:cp], chunks[cp:].flip(0)), dim=1).flatten(1, 2)


def kv_repeats_for_ulysses(heads: int, groups: int, cp: int) -> int:
    """How many times each local KV head is repeated so the KV heads split evenly over `cp` ranks and every
    rank's query heads find their own group: the smallest r with (groups x r) % cp == 0 and heads % (groups x r)
    == 0 (r = heads / groups, plain multi-head attention, at worst)."""
    for r in range(1, heads // groups + 1):
        if (groups * r) % cp == 0 and heads % (groups * r) == 0:
            return r
    raise UserError(f"--context-parallel-size {cp}: {heads} attention heads per tensor-parallel rank cannot be "
                    f"split over {cp} Ulysses ranks")


class UlyssesAttention(torch.nn.Module):
    """q [s/N, b, np, hn], k/v [s/N, b, ng, hn] in the zig-zag layout -> all-to-all to [s, b, np/N, hn] (KV heads
    repeated when ng is not a multiple of N), causal SDPA over the full sequence, all-to-all back -> [s/N, b,
    np*hn]."""

    def __init__(self, group: torch.distributed.ProcessGroup, heads: int, groups: int, softmax_scale: float):
        super().__init__()
        cp = group.size()
        if heads % cp:
            raise UserError(f"--context-parallel-size {cp} (ulysses_cp_algo): {heads} attention heads per "
                            f"tensor-parallel rank are not divisible by CP {cp}")
        self.group, self.cp, self.softmax_scale = group, cp, softmax_scale
        self.kv_repeats = kv_repeats_for_ulysses(heads, groups, cp)
        self.gqa = heads != groups * self.kv_repeats

    def _seq_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        s, b, n, d = x.shape
        parts = x.reshape(s, b, self.cp, n // self.cp, d).permute(2, 0, 1, 3, 4).contiguous()
        return _zigzag_to_sequence(all_to_all(self.group, parts), self.cp)     # [s*N, b, n/N, d]

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float) -> torch.Tensor:
        if self.kv_repeats > 1:
            key, value = (x.repeat_interleave(self.kv_repeats, dim=2) for x in (key, value))
        q, k, v = (self._seq_to_heads(x).permute(1, 2, 0, 3) for x in (query, key, value))   # [b, n/N, s, d]
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=self.softmax_scale,
                                             enable_gqa=self.gqa)
        out = _sequence_to_zigzag(out.permute(2, 0, 1, 3), self.cp).contiguous()        # [N, s/N, b, n/N, d]
        out = all_to_all(self.group, out)                                               # [N heads, s/N, b, n/N, d]
        s_local, b = out.shape[1], out.shape[2]
        return out.permute(1, 2, 0, 3, 4).reshape(s_local, b, -1)


def _block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
                     dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q [b, g, m, sq, d] over k/v [b, g, 1, sk, d] in fp32 at least (bf16/fp16 inputs are
    promoted): (output, log-sum-exp [.., sq, 1])."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale
    if causal:
        sq, sk = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(1), -math.inf)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = F.dropout(torch.exp(scores - lse), p=dropout) if dropout else torch.exp(scores - lse)
    return torch.matmul(probs, v.to(dtype)), lse


def _merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor,
           block_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial softmax attentions over disjoint key sets by their log-sum-exps."""
    merged = torch.logaddexp(lse, block_lse)
    return out * torch.exp(lse - merged) + block_out * torch.exp(block_lse - merged), merged


class RingAttention(torch.nn.Module):
    """q [s/N, b, np, hn], k/v [s/N, b, ng, hn] in the zig-zag layout -> [s/N, b, np*hn].

    Rank r's queries are chunks (r, 2N-1-r); step t visits the K/V block of rank j = r - t (mod N), chunks
    (j, 2N-1-j). Causal rules: j == r, causal over both local chunks; j < r, every query against K/V chunk j only;
    j > r, only query chunk 2N-1-r against both K/V chunks. K/V are all-gathered over the CP group (their gradients
    reduce-scattered back); attention of each step is computed in fp32 and merged by log-sum-exp."""

    def __init__(self, group: torch.distributed.ProcessGroup, heads: int, groups: int, softmax_scale: float):
        super().__init__()
        self.group, self.cp, self.softmax_scale = group, group.size(), softmax_scale
        self.groups = groups

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float) -> torch.Tensor:
        s_local, b, n, d = query.shape
        rank, half = self.group.rank(), s_local // 2
        q = query.permute(1, 2, 0, 3).reshape(b, self.groups, n // self.groups, s_local, d)
        k_all, v_all = (gather_from_sequence_parallel_region(x, group=self.group) for x in (key, value))
        out = lse = None
        for step in range(self.cp):
            j = (rank - step) % self.cp
            k, v = (x[j * s_local:(j + 1) * s_local].permute(1, 2, 0, 3).unsqueeze(2) for x in (k_all, v_all))
            if j == rank:
                out, lse = _block_attention(q, k, v, self.softmax_scale, True, dropout)
            elif j < rank:
                out, lse = _merge(out, lse, *_block_attention(q, k[..., :half, :], v[..., :half, :],
                                                              self.softmax_scale, False, dropout))
            else:
                late_out, late_lse = _merge(out[..., half:, :], lse[..., half:, :],
                                            *_block_attention(q[..., half:, :], k, v, self.softmax_scale, False,
                                                              dropout))
                out = torch.cat((out[..., :half, :], late_out), dim=-2)
                lse = torch.cat((lse[..., :half, :], late_lse), dim=-2)
        out = out.to(query.dtype).reshape(b, n, s_local, d)
        return out.permute(2, 0, 1, 3).reshape(s_local, b, n * d)


CP_ATTENTION = {"ulysses_cp_algo": UlyssesAttention, "megatron_cp_algo": RingAttention}


def cp_attention(algo: str, group: torch.distributed.ProcessGroup, heads: int, groups: int,
                 softmax_scale: float) -> torch.nn.Module:
    """The core-attention algorithm `algo` (`--context-parallel-algo`) over `group`."""
    if algo not in CP_ATTENTION:
        raise UserError(f"--context-parallel-algo {algo}: not implemented; use one of {', '.join(CP_ATTENTION)}")
    return CP_ATTENTION[algo](group, heads, groups, softmax_scale)
