"""Core attention on torch `scaled_dot_product_attention` (flash / memory-efficient kernels on CUDA).

Drop-in for megatron-core's local `DotProductAttention` that also accepts `packed_seq_params`: for THD packed
batches (several samples concatenated in one row, `cu_seqlens` marking their starts) each token attends only to
earlier tokens of its own sample. Batches from `get_batch` carry `packed.PackedSegments` (host segment bounds,
per-token positions): they run the kernel `packed.packed_kernel` picks (per-sample SDPA by default), and with
`PackedRopeSelfAttention` RoPE is applied here from precomputed cos/sin instead of by megatron-core. Plain
`PackedSeqParams` fall back to a block-diagonal mask built from `cu_seqlens` on the device. With
`config.fused_rope` (`--use-fused-rotary-pos-emb`) unpacked batches get their RoPE here too (`RopeAngles`), from
cos/sin computed once for all layers instead of in every layer. With context parallelism (CP > 1) the
local q/k/v (unpacked, or packed rows split per sample) go to the algorithm `--context-parallel-algo` names
(`context_parallel`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

from mindspeed_llm.models.context_parallel import cp_attention
from mindspeed_llm.models.packed import PackedSegments, apply_packed_rope, packed_attention, packed_rope_cos_sin


@dataclasses.dataclass
class RopeAngles:
    """Passed to core attention in place of `packed_seq_params` for an unpacked (sbhd) batch whose RoPE core
    attention applies: the model's angles [s, 1, 1, d]."""
    freqs: torch.Tensor
    qkv_format: str = "sbhd"


_ROPE_COS_SIN: dict = {}


def rope_cos_sin(freqs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of `freqs` in `dtype`, computed once per angles tensor: megatron-core hands every layer the
    same one (and, for a repeated length, every step), where its RoPE recomputes them in each layer."""
    key = (dtype, freqs.device)
    got = _ROPE_COS_SIN.get(key)
    if got is None or got[0] is not freqs:
        got = _ROPE_COS_SIN[key] = (freqs, torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype))
    return got[1], got[2]


class PackedRopeSelfAttention(SelfAttention):
    """megatron-core `SelfAttention` that leaves RoPE to core attention for packed batches with precomputed
    positions (megatron-core's THD RoPE splits by `cu_seqlens.tolist()` in every layer, a host sync each; here
    cos/sin are gathered once per batch at the host-built positions) and, with `config.fused_rope`, for unpacked
    training batches (cos/sin once for all layers). Everything else is unchanged."""

    def forward(self, hidden_states, *args, rotary_pos_emb=None, packed_seq_params=None, **kwargs):
        if isinstance(rotary_pos_emb, torch.Tensor) and isinstance(self.core_attention, SDPAttention):
            if isinstance(packed_seq_params, PackedSegments) and packed_seq_params.positions is not None:
                packed_seq_params = dataclasses.replace(packed_seq_params, rope_freqs=rotary_pos_emb)
                rotary_pos_emb = None
            elif (packed_seq_params is None and getattr(self.config, "fused_rope", False)
                  and kwargs.get("inference_context") is None):
                packed_seq_params, rotary_pos_emb = RopeAngles(rotary_pos_emb), None
        return super().forward(hidden_states, *args, rotary_pos_emb=rotary_pos_emb,
                               packed_seq_params=packed_seq_params, **kwargs)


class SDPAttention(MegatronModule):
    """Inputs q [sq, b, np, hn], k/v [sk, b, ng, hn] (or THD: [t, np, hn]); output [sq, b, np*hn] ([t, np*hn])."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str = "self",
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, **_unused):
        super().__init__(config=config)
        from megatron.core import parallel_state

        tp = parallel_state.get_tensor_model_parallel_world_size() if pg_collection is None else pg_collection.tp.size()
        self.attn_mask_type = attn_mask_type
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        self.groups_per_partition = divide(config.num_query_groups, tp)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        # With CP > 1 the local q/k/v are this rank's sequence chunks; `--context-parallel-algo` picks how they
        # attend over the whole sequence.
        self.context_parallel = None
        if config.context_parallel_size > 1:
            group = parallel_state.get_context_parallel_group() if pg_collection is None else pg_collection.cp
            self.context_parallel = cp_attention(getattr(config, "context_parallel_algo", "megatron_cp_algo"), group,
                                                 self.heads_per_partition, self.groups_per_partition,
                                                 self.softmax_scale)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params=None) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by SDPAttention")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        dropout = self.dropout_p if self.training else 0.0
        if self.context_parallel is not None and packed_seq_params is not None \
                and not isinstance(packed_seq_params, RopeAngles) \
                and not (isinstance(packed_seq_params, PackedSegments) and packed_seq_params.cp_bounds):
            raise NotImplementedError("context parallelism runs unpacked batches or rows split by get_batch only")
        if isinstance(packed_seq_params, PackedSegments) and packed_seq_params.qkv_format == "thd":
            q, k = query, key
            if packed_seq_params.rope_freqs is not None:
                cos, sin = packed_rope_cos_sin(packed_seq_params, packed_seq_params.rope_freqs, q.dtype)
                q = apply_packed_rope(q, cos, sin, self.config.rotary_interleaved)
                k = apply_packed_rope(k, cos, sin, self.config.rotary_interleaved)
            if self.context_parallel is not None:
                return self.context_parallel.forward_packed(q, k, value, packed_seq_params, dropout)
            out = packed_attention(q, k, value, packed_seq_params, self.softmax_scale, dropout)
            return out.reshape(query.shape[0], -1)
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            # [t, n, hn] -> [1, n, t, hn]
            q, k, v = (x.unsqueeze(0).transpose(1, 2) for x in (query, key, value))
            mask = _packed_mask(packed_seq_params, q.shape[2], k.shape[2], q.device)
            out = self._sdpa(q, k, v, mask, False, dropout)
            return out.squeeze(0).transpose(0, 1).reshape(query.shape[0], -1)
        if isinstance(packed_seq_params, RopeAngles):
            cos, sin = rope_cos_sin(packed_seq_params.freqs, query.dtype)
            query = apply_packed_rope(query, cos, sin, self.config.rotary_interleaved)
            key = apply_packed_rope(key, cos, sin, self.config.rotary_interleaved)
        if self.context_parallel is not None:
            if attention_mask is not None or mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
                raise NotImplementedError("context parallelism runs causal attention without a mask only")
            return self.context_parallel(query, key, value, dropout)
        # [s, b, n, hn] -> [b, n, s, hn]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        sq, sk = q.shape[2], k.shape[2]
        mask, causal = None, False
        if attention_mask is not None:
            mask = ~attention_mask.bool()       # megatron: True = masked out; SDPA: True = may attend
        elif mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal):
            if sq == sk:
                causal = True
            else:                               # decoding with a KV cache: queries are the last sq positions
                mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
        out = self._sdpa(q, k, v, mask, causal, dropout)
        b = out.shape[0]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _sdpa(self, q, k, v, mask, causal, dropout):
        # Grouped-query attention inside the kernel: K/V are never repeated to the query heads.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                              scale=self.softmax_scale,
                                              enable_gqa=self.heads_per_partition != self.groups_per_partition)


def _packed_mask(params, sq: int, sk: int, device) -> torch.Tensor:
    """Block-diagonal causal mask [sq, sk] from `cu_seqlens` (True = may attend)."""
    cu_q = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
    cu_k = params.cu_seqlens_kv_padded if params.cu_seqlens_kv_padded is not None else params.cu_seqlens_kv
    doc_q = _doc_ids(cu_q.to(device), sq)
    doc_k = _doc_ids(cu_k.to(device), sk)
    same = doc_q[:, None] == doc_k[None, :]
    causal = torch.arange(sq, device=device)[:, None] >= torch.arange(sk, device=device)[None, :]
    return same & causal


def _doc_ids(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """Sample index of every token position; positions past the last boundary get their own id."""
    pos = torch.arange(length, device=cu_seqlens.device)
    return torch.bucketize(pos, cu_seqlens[1:].to(pos.dtype), right=True)
