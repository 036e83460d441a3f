"""Context parallelism (CP): the batch split and the core-attention algorithms.

Every CP rank holds 2 of the 2N sequence chunks of a micro-batch (N = CP size): rank i holds chunks i and
2N-1-i, so causal work is balanced (megatron-core's `get_batch_on_this_cp_rank`; megatron-core's RoPE slices its
angles the same way). Tokens, labels, loss masks and positions are split alike; labels are shifted before the
split, so no prediction is lost at a chunk boundary. Core attention then sees the local q/k/v and must attend
over the whole causal sequence; `CP_ATTENTION` maps `--context-parallel-algo` to the module that does it:

* `ulysses_cp_algo` (`UlyssesAttention`): all-to-all from sequence-split to head-split, causal attention over the
  full sequence (chunks put back in order), and the inverse all-to-all;
* `megatron_cp_algo` (`RingAttention`): the local queries attend to every rank's K/V block, visited in ring order
  (all-gathered over the CP group), partial results merged by log-sum-exp, with the load-balanced causal rules;
* `hybrid_cp_algo` (`HybridAttention`, `--ulysses-degree-in-cp u`): Ulysses inside groups of u ranks, ring
  across them.

Packed rows (THD) are split per sample: every sample is padded to a multiple of lcm(2, TP) x N and each rank
takes chunks i and 2N-1-i of every sample (`split_packed_batch_for_cp`); the algorithms' `forward_packed` keep
attention inside each sample.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.mappings import all_to_all, gather_from_sequence_parallel_region
from megatron.core.utils import get_batch_on_this_cp_rank

from mindspeed_llm.errors import UserError
from mindspeed_llm.models.packed import PackedSegments, packed_attention


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


def packed_cp_unit(cp: int, tp: int) -> int:
    """Every packed sample is padded to a multiple of lcm(2, TP) x CP (MindSpeed's `pad_data`): 2 x CP chunks,
    and each rank's share of the row stays divisible by TP for sequence parallelism."""
    return math.lcm(2, tp) * cp


def packed_cp_layout(cu_seqlens: torch.Tensor, cp: int, rank: int, unit: int) -> tuple[np.ndarray, np.ndarray,
                                                                                       np.ndarray]:
    """Where this rank's tokens of a packed row come from when every sample is padded to a multiple of `unit`
    and cut into 2 x CP chunks, rank r keeping chunks r and 2CP-1-r of every sample (THD zig-zag).

    Returns (source index into the row, -1 for padding; offset of each token in its padded sample; padded
    cu_seqlens of the whole row), host int64 arrays."""
    cu = cu_seqlens.to("cpu", torch.int64).numpy()
    lengths = np.diff(cu)
    padded = -(-lengths // unit) * unit
    chunk = padded // (2 * cp)
    sources, offsets = [], []
    for start, length, c in zip(cu[:-1], lengths, chunk):
        offset = np.concatenate((np.arange(rank * c, (rank + 1) * c),
                                 np.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c)))
        offsets.append(offset)
        sources.append(np.where(offset < length, start + offset, -1))
    return np.concatenate(sources), np.concatenate(offsets), np.concatenate(([0], np.cumsum(padded)))


def split_packed_batch_for_cp(inputs: dict[str, torch.Tensor], fill: dict[str, int], cu_seqlens: torch.Tensor,
                              cp_group: torch.distributed.ProcessGroup, tp: int,
                              device: torch.device | str | None = None) -> tuple[dict[str, torch.Tensor],
                                                                                 PackedSegments]:
    """This CP rank's part of a packed row: `inputs` [1, t] host tensors (labels already shifted) -> [1, t_local]
    with padding `fill[key]` (the keys of `fill`), and the `PackedSegments` of the local tokens (local `bounds`
    and positions, `cp_bounds` of the padded samples in the whole row) on `device`."""
    cp, rank = cp_group.size(), cp_group.rank()
    source, offset, padded_cu = packed_cp_layout(cu_seqlens, cp, rank, packed_cp_unit(cp, tp))
    index = torch.from_numpy(np.maximum(source, 0))
    is_pad = torch.from_numpy(source < 0)
    local = {key: inputs[key][:, index].masked_fill(is_pad, value) for key, value in fill.items()}
    local["position_ids"] = torch.from_numpy(offset)[None]
    local_cu = (padded_cu // cp).tolist()
    full_cu = padded_cu.tolist()
    dev = torch.device(device) if device is not None else cu_seqlens.device
    cu_dev = torch.from_numpy(padded_cu).to(torch.int32).to(dev)
    max_len = int(np.diff(padded_cu).max())
    params = PackedSegments(qkv_format="thd", cu_seqlens_q=cu_dev, cu_seqlens_kv=cu_dev, max_seqlen_q=max_len,
                            max_seqlen_kv=max_len, cp_group=cp_group, bounds=tuple(zip(local_cu[:-1], local_cu[1:])),
                            positions=local["position_ids"][0].to(dev),
                            cp_bounds=tuple(zip(full_cu[:-1], full_cu[1:])))
    return local, params


def _full_sequence_params(params: PackedSegments) -> PackedSegments:
    """`params` over the whole padded row (`cp_bounds`), for attention after the Ulysses all-to-all."""
    full = params.cache.get("cp_full")
    if full is None:
        full = params.cache["cp_full"] = PackedSegments(
            qkv_format="thd", cu_seqlens_q=params.cu_seqlens_q, cu_seqlens_kv=params.cu_seqlens_kv,
            max_seqlen_q=params.max_seqlen_q, max_seqlen_kv=params.max_seqlen_kv, bounds=params.cp_bounds)
    return full


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

    def all_to_all_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[s/N, ..., n, d] sequence-split -> [N, s/N, ..., n/N, d]: every rank's tokens, this rank's heads."""
        parts = x.reshape(*x.shape[:-2], self.cp, x.shape[-2] // self.cp, x.shape[-1])
        return all_to_all(self.group, parts.movedim(-3, 0).contiguous())

    def all_to_all_back(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `all_to_all_heads`: [N, s/N, ..., n/N, d] -> [s/N, ..., n*d]."""
        out = all_to_all(self.group, x.contiguous())
        return out.movedim(0, -3).flatten(-3)

    def repeat_kv(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kv_repeats == 1:
            return key, value
        return key.repeat_interleave(self.kv_repeats, dim=-2), value.repeat_interleave(self.kv_repeats, dim=-2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float) -> torch.Tensor:
        key, value = self.repeat_kv(key, value)
        q, k, v = (_zigzag_to_sequence(self.all_to_all_heads(x), self.cp).permute(1, 2, 0, 3)
                   for x in (query, key, value))                                        # [b, n/N, s, d]
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=self.softmax_scale,
                                             enable_gqa=self.gqa)
        return self.all_to_all_back(_sequence_to_zigzag(out.permute(2, 0, 1, 3), self.cp))

    def forward_packed(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, params: PackedSegments,
                       dropout: float) -> torch.Tensor:
        """THD q [t/N, np, hn], k/v [t/N, ng, hn], every sample split zig-zag (`split_packed_batch_for_cp`):
        the all-to-all, each sample put back in order, causal attention inside each sample, and back."""
        key, value = self.repeat_kv(key, value)
        full = _full_sequence_params(params)

        def to_sequence(x: torch.Tensor) -> torch.Tensor:
            parts = self.all_to_all_heads(x)                                            # [N, t/N, n/N, d]
            return torch.cat([_zigzag_to_sequence(parts[:, a:b], self.cp) for a, b in params.bounds])

        out = packed_attention(*(to_sequence(x) for x in (query, key, value)), full, self.softmax_scale, dropout)
        zigzag = torch.cat([_sequence_to_zigzag(out[a:b], self.cp) for a, b in full.bounds], dim=1)
        return self.all_to_all_back(zigzag)


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
        k_all, v_all = (gather_from_sequence_parallel_region(x, group=self.group) for x in (key, value))
        return self._attend(query, k_all, v_all, dropout)

    def forward_packed(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, params: PackedSegments,
                       dropout: float) -> torch.Tensor:
        """THD q [t/N, np, hn], k/v [t/N, ng, hn], every sample split zig-zag (`split_packed_batch_for_cp`):
        the ring schedule runs per sample over that sample's chunks of every rank."""
        return self.attend_packed(query, key, value, params.bounds, dropout)

    def attend_packed(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: tuple,
                      dropout: float) -> torch.Tensor:
        """`forward_packed` with the local (start, end) of every sample given as `bounds`."""
        t_local = query.shape[0]
        k_all, v_all = (gather_from_sequence_parallel_region(x, group=self.group).view(self.cp, t_local, *x.shape[1:])
                        for x in (key, value))
        outs = [self._attend(query[a:b].unsqueeze(1), *(x[:, a:b].flatten(0, 1).unsqueeze(1) for x in (k_all, v_all)),
                             dropout) for a, b in bounds]
        return torch.cat(outs).squeeze(1)

    def _attend(self, query: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, dropout: float) -> torch.Tensor:
        """q [s/N, b, np, hn] of this rank against k/v [s, b, ng, hn], rank j's block at [j s/N, (j+1) s/N)."""
        s_local, b, n, d = query.shape
        rank, half = self.group.rank(), s_local // 2
        q = query.permute(1, 2, 0, 3).reshape(b, self.groups, n // self.groups, s_local, d)
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


_HYBRID_GROUPS: dict[str, Any] = {}


def build_hybrid_cp_groups(ulysses_degree: Optional[int]) -> None:
    """Collective, once per parallel-state set-up: split every CP group of N ranks into Ulysses groups of
    `ulysses_degree` consecutive ranks and ring groups of N / `ulysses_degree` ranks strided by it (MindSpeed's
    hybrid_cp_algo layout, megatron-core's `hierarchical_context_parallel_sizes` [u, N/u]). None forgets them."""
    _HYBRID_GROUPS.clear()
    if not ulysses_degree:
        return
    cp_ranks = torch.distributed.get_process_group_ranks(ps.get_context_parallel_group())
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, cp_ranks)
    cp_groups = sorted({tuple(ranks) for ranks in every})
    ulysses = [list(ranks[i:i + ulysses_degree]) for ranks in cp_groups
               for i in range(0, len(ranks), ulysses_degree)]
    ring = [list(ranks[i::ulysses_degree]) for ranks in cp_groups for i in range(ulysses_degree)]
    _HYBRID_GROUPS["ulysses"] = torch.distributed.new_subgroups_by_enumeration(ulysses)[0]
    _HYBRID_GROUPS["ring"] = torch.distributed.new_subgroups_by_enumeration(ring)[0]


class HybridAttention(torch.nn.Module):
    """hybrid_cp_algo: Ulysses inside groups of u consecutive CP ranks, ring across the N/u groups.

    The batch is split as for the other algorithms (rank i holds chunks i and 2N-1-i of 2N); a Ulysses group g
    then holds blocks g and 2r-1-g of the sequence seen as 2r blocks (r = N/u), which is the ring layout over
    the ring groups. So: all-to-all to head-split within the Ulysses group, the ring over the sequence blocks
    of the ring group for this rank's heads, and the inverse all-to-all."""

    def __init__(self, group: torch.distributed.ProcessGroup, heads: int, groups: int, softmax_scale: float):
        super().__init__()
        if "ulysses" not in _HYBRID_GROUPS:
            raise UserError("--context-parallel-algo hybrid_cp_algo needs --ulysses-degree-in-cp")
        self.ulysses = UlyssesAttention(_HYBRID_GROUPS["ulysses"], heads, groups, softmax_scale)
        self.degree = self.ulysses.cp
        self.ring = RingAttention(_HYBRID_GROUPS["ring"], heads // self.degree,
                                  groups * self.ulysses.kv_repeats // self.degree, softmax_scale)

    def _to_ring(self, x: torch.Tensor, bounds: Optional[tuple] = None) -> torch.Tensor:
        parts = self.ulysses.all_to_all_heads(x)
        if bounds is None:
            return _zigzag_to_sequence(parts, self.degree)
        return torch.cat([_zigzag_to_sequence(parts[:, a:b], self.degree) for a, b in bounds])

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float) -> torch.Tensor:
        key, value = self.ulysses.repeat_kv(key, value)
        out = self.ring(*(self._to_ring(x) for x in (query, key, value)), dropout)
        out = out.view(*out.shape[:2], -1, query.shape[-1])
        return self.ulysses.all_to_all_back(_sequence_to_zigzag(out, self.degree))

    def forward_packed(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, params: PackedSegments,
                       dropout: float) -> torch.Tensor:
        key, value = self.ulysses.repeat_kv(key, value)
        ring_bounds = tuple((a * self.degree, b * self.degree) for a, b in params.bounds)
        out = self.ring.attend_packed(*(self._to_ring(x, params.bounds) for x in (query, key, value)), ring_bounds,
                                      dropout)
        out = out.view(out.shape[0], -1, query.shape[-1])
        zigzag = torch.cat([_sequence_to_zigzag(out[a:b], self.degree) for a, b in ring_bounds], dim=1)
        return self.ulysses.all_to_all_back(zigzag)


CP_ATTENTION = {"ulysses_cp_algo": UlyssesAttention, "megatron_cp_algo": RingAttention,
                "hybrid_cp_algo": HybridAttention}


def cp_attention(algo: str, group: torch.distributed.ProcessGroup, heads: int, groups: int,
                 softmax_scale: float) -> torch.nn.Module:
    """The core-attention algorithm `algo` (`--context-parallel-algo`) over `group`."""
    if algo not in CP_ATTENTION:
        raise UserError(f"--context-parallel-algo {algo}: not implemented; use one of {', '.join(CP_ATTENTION)}")
    return CP_ATTENTION[algo](group, heads, groups, softmax_scale)
