"""The forward pass of generation and scoring: this rank's pipeline stage over a static KV cache.

megatron-core's inference path is written for training-shaped modules: autograd functions in every parallel
linear, process-group lookups per call, RoPE cos/sin recomputed per call and re-applied to the whole cached key
every step, K/V repeated for grouped-query attention. `DecodeStage` runs attention on the layer's own Parameter
objects (no second copy of the weights) with only what one step needs, and calls the layer's own modules for the
rest -- the norms' forward, and the MLP (megatron-core's MoELayer: router, token dispatcher, experts; a plain
SwiGLU MLP runs on its two weights, which is all its module computes, without its per-call overhead), so every
MLP the model can have runs here as it runs in training:

- a static KV cache per layer [b, ng, max_len, hn] whose keys are rotated once, when written;
- cos/sin computed once per stage (from the model's own `RotaryEmbedding`, so its scaling applies);
- SDPA with `enable_gqa=True` (no repeated K/V);
- the tensor-parallel group looked up once; row-parallel outputs all-reduced, vocabulary shards all-gathered;
- prefill, decode and whole-sequence scoring through the same code (a window of s tokens after the cache offset);
- a MoE layer gets a share of the window's tokens on each rank of its tensor x expert-parallel group (the ranks
  of a replica hold the same tokens, see `comm.replica_group`) and the outputs are all-gathered.

Pipeline stages exchange activations [b, s, h] with `comm.send_to_next` / `comm.recv_from_prev`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, gather_from_sequence_parallel_region
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.moe_layer import MoELayer

from mindspeed_llm.errors import UserError
from mindspeed_llm.inference import comm
from mindspeed_llm.platform import to_comm_device


@dataclass
class _Layer:
    input_norm: Callable[[torch.Tensor], torch.Tensor]
    qkv: torch.Tensor
    qkv_bias: Optional[torch.Tensor]
    q_norm: Optional[Callable[[torch.Tensor], torch.Tensor]]
    k_norm: Optional[Callable[[torch.Tensor], torch.Tensor]]
    proj: torch.Tensor
    proj_bias: Optional[torch.Tensor]
    pre_mlp_norm: Callable[[torch.Tensor], torch.Tensor]
    mlp: torch.nn.Module
    fc1: Optional[torch.Tensor]         # the weights of a plain SwiGLU MLP (None: the MLP runs as its module)
    fc2: Optional[torch.Tensor]
    moe: bool
    scale: float


def unsupported_reason(model: torch.nn.Module) -> Optional[str]:
    """Why `DecodeStage` cannot run this model chunk (None: it can). Depends on the config and the layer types
    only, so every pipeline stage of a replica answers the same."""
    cfg = model.config
    checks = (
        (getattr(model, "position_embedding_type", None) == "rope", "position embedding is not RoPE"),
        (not getattr(cfg, "sequence_parallel", False), "sequence parallelism"),
        (getattr(cfg, "context_parallel_size", 1) == 1, "context parallelism"),
        (not getattr(cfg, "rotary_interleaved", False), "interleaved RoPE"),
        (not getattr(cfg, "multi_latent_attention", False), "multi-latent attention"),
        (not getattr(cfg, "fp32_residual_connection", False), "fp32 residual connection"),
        (not getattr(cfg, "apply_residual_connection_post_layernorm", False), "post-layernorm residual"),
        (not getattr(cfg, "attention_output_gate", False), "gated attention output"),
        (getattr(model, "rotary_pos_emb", None) is not None and
         not hasattr(model.rotary_pos_emb, "mrope_section"), "no plain rotary embedding"),
    )
    for ok, reason in checks:
        if not ok:
            return reason
    if cfg.num_query_groups is not None and cfg.num_query_groups < ps.get_tensor_model_parallel_world_size():
        return "fewer query groups than tensor-parallel ranks"
    for layer in model.decoder.layers:
        if not isinstance(layer.self_attention, SelfAttention):
            return f"attention {type(layer.self_attention).__name__}"
        for norm in (layer.input_layernorm, layer.pre_mlp_layernorm):
            if not hasattr(norm, "weight"):     # e.g. a norm fused into the next linear: attention needs it here
                return f"layer norm {type(norm).__name__}"
    return None


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

    def rewind(self) -> None:
        """Forget every position: the next window starts at 0 (recomputing the whole prefix)."""
        self.offset = 0

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: row i of the cache becomes the old row `rows[i]`."""
        for buf in self.keys + self.values:
            buf.copy_(buf.index_select(0, rows.to(buf.device)))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _bias(linear) -> Optional[torch.Tensor]:
    b = getattr(linear, "bias", None)
    return b if isinstance(b, torch.Tensor) and b.numel() else None


def _norm(norm) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The norm module's own forward (None where the layer has none: megatron's IdentityOp has no weight), called
    without `Module.__call__`'s hook handling, which costs more than the norm itself at decode sizes."""
    return norm.forward if norm is not None and hasattr(norm, "weight") else None


def _plain_swiglu(mlp: torch.nn.Module) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(fc1, fc2) weights when `mlp` is megatron-core's MLP computing exactly fc2(silu(gate) * up) (fused gate+up
    fc1, no bias, no clamp or offset, plain parallel linears); Nones for any other MLP, which runs as its module.
    megatron's MLP costs about 80 us of Python per call on top of its two GEMMs (autograd functions and process-group
    lookups in each parallel linear): more than the GEMMs of a small model's decode step."""
    cfg = mlp.config
    plain = (type(mlp) is MLP and cfg.gated_linear_unit and cfg.activation_func is F.silu
             and not cfg.use_te_activation_func and cfg.activation_func_clamp_value is None
             and not cfg.glu_linear_offset and type(mlp.linear_fc1) is ColumnParallelLinear
             and type(mlp.linear_fc2) is RowParallelLinear and _bias(mlp.linear_fc1) is None
             and _bias(mlp.linear_fc2) is None)
    return (mlp.linear_fc1.weight, mlp.linear_fc2.weight) if plain else (None, None)


class DecodeStage:
    """Runs token windows through this rank's pipeline stage.

    `__call__(tokens [b, s], cache)` feeds the window after `cache.offset` (no cache: the whole sequence from
    position 0); the last stage returns the logits [b, V] in fp32 (all vocabulary shards) of the window's last
    position, or of position `last[row]` per row (right-padded rows of different lengths: causal attention keeps
    each row's logits at its own last token exact); other stages return None.
    """

    def __init__(self, model: torch.nn.Module, compile_step: bool = False) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise UserError(f"generation does not support this model: {reason}")
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
        # The ranks a MoE layer's tokens are shared out over (each computes its share; see `_moe`)
        moe = any(layer.moe for layer in self.layers)
        self.moe_group = ps.get_expert_tensor_and_model_parallel_group() if moe else None
        self.moe_ranks = dist.get_world_size(self.moe_group) if moe else 1
        self.moe_rank = dist.get_rank(self.moe_group) if moe else 0
        self.grouped_single_query = self.device.type == "cpu"
        if self.first:
            emb = model.embedding.word_embeddings
            self.embedding = emb.weight
            self.vocab_start, self.vocab_end = emb.vocab_start_index, emb.vocab_end_index
        if self.last:
            self.final_norm = model.decoder.final_layernorm
            self.output = (model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights
                           else model.output_layer.weight)
        self._rope_len = 0
        self._ensure_rope(getattr(model, "max_sequence_length", 0) or cfg.max_position_embeddings or 1)
        # Optional whole-step compilation for accelerators (CUDA graphs need static shapes: not on CPU by default)
        self._layers_fn = torch.compile(self._run_layers, dynamic=True) if compile_step else self._run_layers

    def _layer(self, layer) -> _Layer:
        att = layer.self_attention
        core = att.core_attention
        scale = getattr(core, "softmax_scale", None) or 1.0 / math.sqrt(self.config.kv_channels)
        fc1, fc2 = _plain_swiglu(layer.mlp)
        return _Layer(input_norm=_norm(layer.input_layernorm), qkv=att.linear_qkv.weight,
                      qkv_bias=_bias(att.linear_qkv), q_norm=_norm(getattr(att, "q_layernorm", None)),
                      k_norm=_norm(getattr(att, "k_layernorm", None)), proj=att.linear_proj.weight,
                      proj_bias=_bias(att.linear_proj), pre_mlp_norm=_norm(layer.pre_mlp_layernorm), mlp=layer.mlp,
                      fc1=fc1, fc2=fc2, moe=isinstance(layer.mlp, MoELayer), scale=float(scale))

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

    # ---- the MLP ---------------------------------------------------------------------------------------------

    def _mlp(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        """The layer's MLP module (megatron-core's MoELayer: router, token dispatcher, experts; any MLP but a plain
        SwiGLU one) on x [b, s, h]: every token on its own, the layout of the leading dims does not matter to it."""
        if layer.moe and self.moe_ranks > 1:
            return self._moe(layer.mlp, x)
        out, bias = layer.mlp(x)
        return out if bias is None else out + bias

    def _moe(self, mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """megatron-core's MoELayer takes each rank's input as that rank's own tokens (it gathers them over the
        tensor x expert-parallel group to route and compute, and hands every rank its tokens' outputs back). Every
        rank of a replica holds the same x: each passes an equal share (zero rows pad the last), and the shares'
        outputs are all-gathered back into x's shape."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        n = flat.shape[0]
        share = -(-n // self.moe_ranks)
        if share * self.moe_ranks != n:
            flat = F.pad(flat, (0, 0, 0, share * self.moe_ranks - n))
        mine = flat[self.moe_rank * share:(self.moe_rank + 1) * share].unsqueeze(1)     # [share, 1, h]
        out, bias = mlp(mine)
        if bias is not None:
            out = out + bias
        gathered = gather_from_sequence_parallel_region(to_comm_device(out, self.moe_group), group=self.moe_group)
        return gathered.to(x.device).reshape(-1, shape[-1])[:n].reshape(shape)

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
            x = layer.input_norm(h)
            qkv = F.linear(x, layer.qkv, layer.qkv_bias).view(b, s, self.groups, per_group + 2, hd)
            q = qkv[:, :, :, :per_group].reshape(b, s, self.heads, hd)
            k = qkv[:, :, :, per_group]
            v = qkv[:, :, :, per_group + 1]
            if layer.q_norm is not None:
                q = layer.q_norm(q)
            if layer.k_norm is not None:
                k = layer.k_norm(k)
            q = _rotate(q, cos, sin)
            k_cache[:, :, start:end] = _rotate(k, cos, sin).transpose(1, 2)
            v_cache[:, :, start:end] = v.transpose(1, 2)
            out = self._attend(q, k_cache[:, :, :end], v_cache[:, :, :end], mask, causal, layer.scale)
            out = self._reduce(F.linear(out, layer.proj))
            if layer.proj_bias is not None:
                out = out + layer.proj_bias
            h = h + out
            x = layer.pre_mlp_norm(h)
            if layer.fc1 is not None:
                gate, up = F.linear(x, layer.fc1).chunk(2, dim=-1)
                h = h + self._reduce(F.linear(F.silu(gate) * up, layer.fc2))
            else:
                h = h + self._mlp(layer, x)
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
    def __call__(self, tokens: torch.Tensor, cache: Optional[StaticKVCache] = None,
                 last: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        batch, seq = tokens.shape
        if cache is None:
            cache = self.new_cache(batch, seq)
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
        h = h[:, -1] if last is None else h[torch.arange(batch, device=h.device), last.to(h.device)]
        return self._logits(self.final_norm(h)).float()
