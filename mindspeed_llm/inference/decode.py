"""Lean forward pass for generation over the megatron model's own parameters.

megatron-core's inference path is written for training-shaped modules: autograd functions in every parallel
linear, process-group lookups per call, RoPE cos/sin recomputed per call and re-applied to the whole cached key
every step, K/V repeated for grouped-query attention. `DecodeStage` runs the same math on the same Parameter
objects (no second copy of the weights) with only what one step needs:

- a static KV cache per layer [b, ng, max_len, hn] whose keys are rotated once, when written;
- cos/sin computed once per stage (from the model's own `RotaryEmbedding`, so its scaling applies);
- SDPA with `enable_gqa=True` (no repeated K/V);
- the tensor-parallel group looked up once; row-parallel outputs all-reduced, vocabulary shards all-gathered;
- prefill and decode through the same code (a window of s tokens after the cache offset).

Pipeline stages exchange activations [b, s, h] with `comm.send_to_next` / `comm.recv_from_prev`; every stage
of a replica takes this path or none does (`supported` depends on the config and layer types only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mindspeed_llm.inference import comm
from mindspeed_llm.platform import to_comm_device


@dataclass
class _Layer:
    ln1: torch.Tensor
    eps1: float
    qkv: torch.Tensor
    qkv_bias: Optional[torch.Tensor]
    q_norm: Optional[tuple[torch.Tensor, float]]
    k_norm: Optional[tuple[torch.Tensor, float]]
    proj: torch.Tensor
    proj_bias: Optional[torch.Tensor]
    ln2: torch.Tensor
    eps2: float
    fc1: torch.Tensor
    fc1_bias: Optional[torch.Tensor]
    fc2: torch.Tensor
    fc2_bias: Optional[torch.Tensor]
    scale: float


def unsupported_reason(model: torch.nn.Module) -> Optional[str]:
    """Why `DecodeStage` cannot run this model chunk (None: it can). Depends on the config and the layer types
    only, so every pipeline stage of a replica answers the same."""
    from mindspeed_llm.models.spec import RMSNorm

    cfg = model.config
    checks = (
        (getattr(model, "position_embedding_type", None) == "rope", "position embedding is not RoPE"),
        (not getattr(cfg, "sequence_parallel", False), "sequence parallelism"),
        (getattr(cfg, "context_parallel_size", 1) == 1, "context parallelism"),
        (not getattr(cfg, "num_moe_experts", None), "mixture of experts"),
        (not getattr(cfg, "rotary_interleaved", False), "interleaved RoPE"),
        (not getattr(cfg, "multi_latent_attention", False), "multi-latent attention"),
        (not getattr(cfg, "fp32_residual_connection", False), "fp32 residual connection"),
        (not getattr(cfg, "apply_residual_connection_post_layernorm", False), "post-layernorm residual"),
        (getattr(cfg, "gated_linear_unit", False) and cfg.activation_func is F.silu, "MLP is not SwiGLU"),
        (not getattr(cfg, "attention_output_gate", False), "gated attention output"),
        (getattr(model, "rotary_pos_emb", None) is not None and
         not hasattr(model.rotary_pos_emb, "mrope_section"), "no plain rotary embedding"),
    )
    for ok, reason in checks:
        if not ok:
            return reason
    tp = _tp_size()
    if cfg.num_query_groups is not None and cfg.num_query_groups < tp:
        return "fewer query groups than tensor-parallel ranks"
    from megatron.core.transformer.attention import SelfAttention

    for layer in model.decoder.layers:
        att = layer.self_attention
        if not isinstance(att, SelfAttention):
            return f"attention {type(att).__name__}"
        for norm in (layer.input_layernorm, layer.pre_mlp_layernorm):
            if not isinstance(norm, RMSNorm):
                return f"layer norm {type(norm).__name__}"
        for norm in (getattr(att, "q_layernorm", None), getattr(att, "k_layernorm", None)):
            if norm is not None and not isinstance(norm, RMSNorm):
                return f"q/k norm {type(norm).__name__}"
        if not hasattr(layer.mlp, "linear_fc1"):
            return f"MLP {type(layer.mlp).__name__}"
    return None


def _tp_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size()


class StaticKVCache:
    """Per local layer: keys (rotated) and values [b, ng, max_len, hn]; `offset` = positions written so far."""

    def __init__(self, layers: int, batch: int, groups: int, head_dim: int, max_len: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        shape = (batch, groups, max_len, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.max_len = max_len
        self.offset = 0

    def advance(self, n: int) -> None:
        self.offset += n

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: row i of the cache becomes the old row `rows[i]`."""
        for buf in self.keys + self.values:
            buf.copy_(buf.index_select(0, rows.to(buf.device)))


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # the same formula as models.spec.RMSNorm (normalise in fp32, cast back, scale): bitwise equal results
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class DecodeStage:
    """Runs token windows through this rank's pipeline stage, like `forward.StageForward` with a KV cache.

    `__call__(tokens [b, s], cache)` feeds the window after `cache.offset`; the last stage returns the logits of
    the window's last position [b, V] in fp32 (all vocabulary shards), other stages return None.
    """

    def __init__(self, model: torch.nn.Module, compile_step: bool = False) -> None:
        from megatron.core import parallel_state as ps

        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"DecodeStage does not support this model: {reason}")
        cfg = model.config
        self.model = model
        self.config = cfg
        self.device = next(model.parameters()).device
        self.dtype = cfg.params_dtype
        self.first = comm.is_first_stage()
        self.last = comm.is_last_stage()
        self.tp = ps.get_tensor_model_parallel_world_size()
        self.tp_group = ps.get_tensor_model_parallel_group() if self.tp > 1 else None
        self.heads = cfg.num_attention_heads // self.tp
        self.groups = (cfg.num_query_groups or cfg.num_attention_heads) // self.tp
        self.head_dim = cfg.kv_channels
        self.hidden = cfg.hidden_size
        self.layers = [self._layer(layer) for layer in model.decoder.layers]
        self.grouped_single_query = self.device.type == "cpu"
        if self.first:
            emb = model.embedding.word_embeddings
            self.embedding = emb.weight
            self.vocab_start, self.vocab_end = emb.vocab_start_index, emb.vocab_end_index
        if self.last:
            self.final_norm = model.decoder.final_layernorm      # a module call per step: whatever norm it is
            self.output = (model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights
                           else model.output_layer.weight)
        self._rope_len = 0
        self._ensure_rope(getattr(model, "max_sequence_length", 0) or cfg.max_position_embeddings or 1)
        # Optional whole-step compilation for accelerators (CUDA graphs need static shapes: not on CPU by default)
        self._layers_fn = torch.compile(self._run_layers, dynamic=True) if compile_step else self._run_layers

    def _layer(self, layer) -> _Layer:
        att, mlp = layer.self_attention, layer.mlp

        def bias(linear):
            b = getattr(linear, "bias", None)
            return b if isinstance(b, torch.Tensor) and b.numel() else None

        def norm(n):
            return (n.weight, n.eps) if n is not None and hasattr(n, "weight") else None

        core = att.core_attention
        scale = getattr(core, "softmax_scale", None) or 1.0 / math.sqrt(self.config.kv_channels)
        return _Layer(ln1=layer.input_layernorm.weight, eps1=layer.input_layernorm.eps,
                      qkv=att.linear_qkv.weight, qkv_bias=bias(att.linear_qkv),
                      q_norm=norm(getattr(att, "q_layernorm", None)), k_norm=norm(getattr(att, "k_layernorm", None)),
                      proj=att.linear_proj.weight, proj_bias=bias(att.linear_proj),
                      ln2=layer.pre_mlp_layernorm.weight, eps2=layer.pre_mlp_layernorm.eps,
                      fc1=mlp.linear_fc1.weight, fc1_bias=bias(mlp.linear_fc1),
                      fc2=mlp.linear_fc2.weight, fc2_bias=bias(mlp.linear_fc2), scale=float(scale))

    def _ensure_rope(self, length: int) -> None:
        """cos/sin [length, hn] in the model dtype, from megatron's RotaryEmbedding (its scaling included)."""
        if length <= self._rope_len:
            return
        rope = self.model.rotary_pos_emb
        freqs = rope.get_freqs_non_repeated(length).to(self.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = torch.cos(emb).to(self.dtype)
        self.sin = torch.sin(emb).to(self.dtype)
        self._rope_len = length

    def new_cache(self, batch: int, max_len: int) -> StaticKVCache:
        self._ensure_rope(max_len)
        return StaticKVCache(len(self.layers), batch, self.groups, self.head_dim, max_len, self.dtype, self.device)

    # ---- tensor-parallel pieces ----------------------------------------------------------------------------

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_group is not None:
            x = to_comm_device(x, self.tp_group)
            dist.all_reduce(x, group=self.tp_group)
        return x

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tp_group is None:
            return F.embedding(tokens, self.embedding)
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
        local = (tokens - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.embedding).masked_fill(outside.unsqueeze(-1), 0.0)
        return self._reduce(out)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        local = F.linear(h, self.output)
        if self.tp_group is None:
            return local
        local = to_comm_device(local.contiguous(), self.tp_group)
        parts = [torch.empty_like(local) for _ in range(self.tp)]
        dist.all_gather(parts, local, group=self.tp_group)
        return torch.cat(parts, dim=-1)

    # ---- the step --------------------------------------------------------------------------------------------

    def _run_layers(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: list, values: list,
                    start: int) -> torch.Tensor:
        b, s, _ = h.shape
        end = start + s
        per_group = self.heads // self.groups
        hd = self.head_dim
        mask = None
        if s > 1 and start > 0:      # a window after cached positions: query i sees keys up to start + i
            mask = torch.ones(s, end, dtype=torch.bool, device=h.device).tril(diagonal=start)
        causal = s > 1 and start == 0
        for layer, k_cache, v_cache in zip(self.layers, keys, values):
            x = _rms(h, layer.ln1, layer.eps1)
            qkv = F.linear(x, layer.qkv, layer.qkv_bias).view(b, s, self.groups, per_group + 2, hd)
            q = qkv[:, :, :, :per_group].reshape(b, s, self.heads, hd)
            k = qkv[:, :, :, per_group]
            v = qkv[:, :, :, per_group + 1]
            if layer.q_norm is not None:
                q = _rms(q, *layer.q_norm)
            if layer.k_norm is not None:
                k = _rms(k, *layer.k_norm)
            q = _rotate(q, cos, sin)
            k_cache[:, :, start:end] = _rotate(k, cos, sin).transpose(1, 2)
            v_cache[:, :, start:end] = v.transpose(1, 2)
            out = self._attend(q, k_cache[:, :, :end], v_cache[:, :, :end], mask, causal, layer.scale)
            out = self._reduce(F.linear(out, layer.proj))
            if layer.proj_bias is not None:
                out = out + layer.proj_bias
            h = h + out
            x = _rms(h, layer.ln2, layer.eps2)
            gate, up = F.linear(x, layer.fc1, layer.fc1_bias).chunk(2, dim=-1)
            out = self._reduce(F.linear(F.silu(gate) * up, layer.fc2))
            if layer.fc2_bias is not None:
                out = out + layer.fc2_bias
            h = h + out
        return h

    def _attend(self, q, k, v, mask, causal, scale) -> torch.Tensor:
        """q [b, s, n, hn], k/v [b, ng, sk, hn] -> [b, s, n * hn]."""
        b, s = q.shape[:2]
        if s == 1 and self.grouped_single_query:
            # One query per row: the heads of a group become the rows of that group's matmul (no repeated K/V).
            # On the CPU this beats SDPA's flash kernel, which is slow for one query and stalls the thread pool.
            qg = q.view(b, self.groups, self.heads // self.groups, self.head_dim)
            scores = torch.matmul(qg, k.transpose(-1, -2)) * scale
            out = torch.matmul(scores.float().softmax(dim=-1).to(v.dtype), v)     # softmax in fp32, as SDPA
            return out.reshape(b, 1, self.heads * self.head_dim)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                             enable_gqa=self.heads != self.groups)
        return out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, cache: StaticKVCache) -> Optional[torch.Tensor]:
        batch, seq = tokens.shape
        start = cache.offset
        if start + seq > cache.max_len:
            raise ValueError(f"window ends at {start + seq}, past the cache length {cache.max_len}")
        if self.first:
            h = self._embed(tokens.to(self.device))
        else:
            h = comm.recv_from_prev((batch, seq, self.hidden), self.dtype, self.device)
        # [s, 1, hn]: broadcasts over batch and heads of q [b, s, n, hn]
        cos = self.cos[start:start + seq].unsqueeze(1)
        sin = self.sin[start:start + seq].unsqueeze(1)
        h = self._layers_fn(h, cos, sin, cache.keys, cache.values, start)
        cache.advance(seq)
        if not self.last:
            comm.send_to_next(h)
            return None
        h = self.final_norm(h[:, -1])
        return self._logits(h).float()


def decode_stage_for(step) -> Optional[DecodeStage]:
    """The `DecodeStage` over a `forward.StageForward`'s model, built once and kept on it; None when the model
    needs megatron's own forward."""
    cached = getattr(step, "_decode_stage", False)
    if cached is False:
        cached = DecodeStage(step.model) if unsupported_reason(step.model) is None else None
        step._decode_stage = cached
    return cached
