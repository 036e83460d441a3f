"""Our transformer layer spec: megatron-core local (non-TE) parallel layers, torch RMSNorm and SDPA attention,
and the `TransformerConfig` they read their kernel choices from."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from mindspeed_llm.errors import UserError
from mindspeed_llm.models.attention import PackedRopeSelfAttention, SDPAttention


@dataclass
class LayerConfig(TransformerConfig):
    """megatron-core's `TransformerConfig` plus the kernel choices of our layers (`--use-fused-rmsnorm`,
    `--use-fused-rotary-pos-emb`). Every choice computes the same function as the default path; only the kernels
    differ."""

    fused_rmsnorm: bool = False
    fused_rope: bool = False        # RoPE in core attention from cos/sin computed once (`attention.RopeAngles`)
    context_parallel_algo: str = "megatron_cp_algo"     # with CP > 1: `context_parallel.CP_ATTENTION`


class RMSNorm(torch.nn.Module):
    """RMSNorm as Qwen/Llama compute it: normalise in fp32, cast back to the input dtype, scale by the weight.

    With `config.fused_rmsnorm`, torch's `F.rms_norm` does the normalisation: one kernel forward and one backward
    on CUDA (fp32 accumulation, output in the input dtype) instead of six elementwise passes."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.eps = eps
        self.fused = bool(getattr(config, "fused_rmsnorm", False))
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # Under sequence parallelism every TP rank sees different tokens: megatron all-reduces these grads.
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def get_layer_spec(qk_layernorm: bool = True, moe: bool = False, grouped_experts: bool = False) -> ModuleSpec:
    """RMSNorm -> self-attention (fused QKV, optional per-head q/k RMSNorm, RoPE, SDPA or the packed varlen kernel,
    out proj) -> residual ->
    RMSNorm -> SwiGLU MLP (fused gate+up, down) -> residual.

    With `moe` the MLP is megatron-core's MoELayer: its TopKRouter and SwiGLU local experts, as SequentialMLP of
    column/row-parallel linears, or with `grouped_experts` (--moe-grouped-gemm) as GroupedMLP, whose `weight1` /
    `weight2` hold every local expert and run as one grouped GEMM (`platform.adapt_megatron_grouped_mlp`)."""
    qk_norm = RMSNorm if qk_layernorm else IdentityOp
    dense_mlp = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    experts = (ModuleSpec(module=GroupedMLP) if grouped_experts
               else ModuleSpec(module=SequentialMLP, submodules=dense_mlp))
    mlp = (ModuleSpec(module=MoELayer, submodules=MoESubmodules(experts=experts))
           if moe else ModuleSpec(module=MLP, submodules=dense_mlp))
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=PackedRopeSelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=SDPAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def layer_spec_for(spec_flag: Optional[Sequence[str]], qk_layernorm: bool) -> ModuleSpec:
    """The layer spec of a run: `--spec MODULE ATTR` when given (it must import; a callable is called) for a model
    with q/k norm (the Qwen3 spec), else `get_layer_spec` for the config (other families keep the spec that
    matches their config)."""
    spec = get_layer_spec(qk_layernorm)
    if not spec_flag:
        return spec
    module, attr = spec_flag
    try:
        given = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"--spec {module} {attr}: cannot import it ({exc})") from None
    if callable(given) and not hasattr(given, "module"):
        given = given()
    return given if qk_layernorm else spec
