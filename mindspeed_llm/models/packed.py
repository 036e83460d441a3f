"""Packed (THD) micro-batches: segment metadata, variable-length attention and RoPE at restarted positions.

A packed micro-batch is several samples concatenated into one sequence of t tokens; attention stays inside
each sample and positions restart at 0 in each. The host knows the segment lengths when it builds the batch,
so everything that depends on them is computed there once (`packed_seq_params`) and reused by every layer:
no layer reads a device tensor back to the host (megatron-core's own THD RoPE does, twice per layer).

Kernels (`packed_kernel`, the one place that chooses):
* "segments" (default, every device): SDPA per sample with `is_causal` and native GQA (flash / cuDNN on CUDA).
  Its cost follows sum(len_i^2), not t^2, and no [t, t] mask exists; on CPU it ran 3-10x faster than "dense"
  (fwd+bwd, t=2048, 8 query / 4 KV heads, 1 to 32 samples).
* "dense": one SDPA call over the whole sequence with a block-diagonal causal [t, t] mask built once per batch;
  the reference the kernel is tested against.
`MINDSPEED_PACKED_ATTENTION=segments|dense` picks one.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams

from mindspeed_llm.errors import UserError

KERNELS = ("segments", "dense")
KERNEL_ENV = "MINDSPEED_PACKED_ATTENTION"


@dataclasses.dataclass
class PackedSegments(PackedSeqParams):
    """megatron-core `PackedSeqParams` (THD) plus what the host precomputed for this micro-batch.

    `bounds`: (start, end) of every segment as host ints; `positions`: [t] int64 on the device, restarting at 0
    in each segment; `cp_bounds`: with context parallelism, (start, end) of every segment (padded to a multiple
    of 2 x CP) in the whole sequence, while `bounds` and `positions` cover this rank's part of each segment
    (`context_parallel.split_packed_batch_for_cp`); `rope_freqs`: the model's RoPE angles [max_s, 1, 1, d], set per layer by
    `PackedRopeSelfAttention` when RoPE is left to core attention; `cache`: per-batch tensors shared by all layers
    (dense mask, cos/sin), kept across `dataclasses.replace` copies.
    """
    bounds: tuple = ()
    positions: Optional[torch.Tensor] = None
    cp_bounds: tuple = ()
    rope_freqs: Optional[torch.Tensor] = None
    cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)


def packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int, cp_group=None,
                      device: torch.device | str | None = None) -> PackedSegments:
    """THD params for boundaries `cu_seqlens` ([0, ..., t], host tensor) with per-token positions."""
    cu = cu_seqlens.to("cpu", torch.int64)      # already on the host when it comes from the collator
    lengths = cu[1:] - cu[:-1]
    if len(cu) < 2 or bool((lengths <= 0).any()):
        raise ValueError(f"cu_seqlens must rise strictly from 0, got {cu.tolist()}")
    positions = torch.arange(int(cu[-1]), dtype=torch.int64) - torch.repeat_interleave(cu[:-1], lengths)
    edges = cu.tolist()
    dev = torch.device(device) if device is not None else cu_seqlens.device
    cu_dev = cu.to(torch.int32).to(dev)
    return PackedSegments(qkv_format="thd", cu_seqlens_q=cu_dev, cu_seqlens_kv=cu_dev,
                          max_seqlen_q=int(max_seqlen), max_seqlen_kv=int(max_seqlen), cp_group=cp_group,
                          bounds=tuple(zip(edges[:-1], edges[1:])), positions=positions.to(dev))


def packed_kernel() -> str:
    """"segments" unless MINDSPEED_PACKED_ATTENTION names another kernel."""
    forced = os.environ.get(KERNEL_ENV, "").strip().lower() or "segments"
    if forced not in KERNELS:
        raise UserError(f"{KERNEL_ENV}={forced!r}: expected one of {KERNELS}")
    return forced


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: PackedSegments, scale: float,
                     dropout: float = 0.0, kernel: Optional[str] = None) -> torch.Tensor:
    """Causal attention inside each segment. q [t, nq, hn], k/v [t, ng, hn] (nq a multiple of ng, K/V are
    not repeated); returns [t, nq, hn]."""
    kernel = kernel or packed_kernel()
    gqa = q.shape[1] != k.shape[1]
    if kernel == "segments":
        outs = []
        for a, b in params.bounds:
            qs, ks, vs = (x[a:b].transpose(0, 1).unsqueeze(0) for x in (q, k, v))     # [1, n, len, hn]
            o = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout, is_causal=True, scale=scale,
                                               enable_gqa=gqa)
            outs.append(o.squeeze(0).transpose(0, 1))
        return torch.cat(outs) if len(outs) > 1 else outs[0]
    mask = params.cache.get("dense_mask")
    if mask is None or mask.device != q.device:
        mask = params.cache["dense_mask"] = block_diagonal_mask(params.bounds, q.device)
    out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                                         v.transpose(0, 1).unsqueeze(0), attn_mask=mask, dropout_p=dropout,
                                         scale=scale, enable_gqa=gqa)
    return out.squeeze(0).transpose(0, 1)


def block_diagonal_mask(bounds, device) -> torch.Tensor:
    """[t, t] bool, True where query i may attend key j: same segment and j <= i."""
    lengths = torch.tensor([b - a for a, b in bounds], dtype=torch.int64)
    doc = torch.repeat_interleave(torch.arange(len(bounds)), lengths).to(device)
    pos = torch.arange(len(doc), device=device)
    return (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])


# ---------------------------------------------------------------------------------------------------------------
# RoPE at per-segment positions
# ---------------------------------------------------------------------------------------------------------------

def packed_rope_cos_sin(params: PackedSegments, freqs: torch.Tensor, dtype: torch.dtype):
    """cos and sin [t, 1, d] of the angles `freqs` ([max_s, 1, 1, d]) at every token's position, in `dtype`;
    computed by the first layer that asks and reused by the others."""
    key = ("rope", freqs.data_ptr(), tuple(freqs.shape), freqs.device, dtype)
    got = params.cache.get(key)
    if got is None:
        angles = freqs.reshape(freqs.shape[0], 1, freqs.shape[-1]).index_select(0, params.positions)
        got = params.cache[key] = (torch.cos(angles).to(dtype), torch.sin(angles).to(dtype))
    return got


def apply_packed_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """RoPE on x [t, n, hn] with per-token cos/sin [t, 1, d] (d <= hn: the rest passes through), as
    megatron-core rotates: [-x2, x1] halves, or (interleaved) [-odd, even] pairs."""
    rot = cos.shape[-1]
    xr, xp = x[..., :rot], x[..., rot:]
    if interleaved:
        turned = torch.stack((-xr[..., 1::2], xr[..., ::2]), dim=-1).flatten(-2)
    else:
        x1, x2 = xr.chunk(2, dim=-1)
        turned = torch.cat((-x2, x1), dim=-1)
    out = xr * cos + turned * sin
    return torch.cat((out, xp), dim=-1) if xp.shape[-1] else out
