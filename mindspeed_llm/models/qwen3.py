"""Qwen3 dense (GQA with per-head RMSNorm on q and k, SwiGLU, RMSNorm, RoPE; tied or untied embeddings) and
Qwen3-MoE (the same attention, routed SwiGLU experts)."""
from mindspeed_llm.models.family import Family, FusedQKV, GatedMLP, GroupedExperts, PerExpert, Replicated, RowSplit

QWEN3 = Family(
    name="qwen3",
    architectures=("Qwen3ForCausalLM",),
    aliases=("qwen3",),
    qk_layernorm=True,
    layer=(
        Replicated("input_layernorm.weight", "input_layernorm.weight"),
        FusedQKV("self_attention.linear_qkv.weight", q="self_attn.q_proj.weight", k="self_attn.k_proj.weight",
                 v="self_attn.v_proj.weight"),
        Replicated("self_attention.q_layernorm.weight", "self_attn.q_norm.weight"),
        Replicated("self_attention.k_layernorm.weight", "self_attn.k_norm.weight"),
        RowSplit("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
        Replicated("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
        GatedMLP("mlp.linear_fc1.weight", gate="mlp.gate_proj.weight", up="mlp.up_proj.weight"),
        RowSplit("mlp.linear_fc2.weight", "mlp.down_proj.weight"),
    ),
)

# Qwen3-MoE: Qwen3's attention; each MoE layer has a router (`mlp.gate`, no bias) and per-expert SwiGLU MLPs,
# published as `mlp.experts.{e}.{gate,up,down}_proj` (megatron-core: TopKRouter and SequentialMLP local experts).
# Layers listed in mlp_only_layers keep Qwen3's dense MLP.
# With --moe-grouped-gemm the same expert shards are stored as megatron-core GroupedMLP's weight1 / weight2
# (MindSpeed's grouped layout).
_EXPERT_FC1 = PerExpert(GatedMLP("mlp.experts.local_experts.{local}.linear_fc1.weight",
                                 gate="mlp.experts.{expert}.gate_proj.weight",
                                 up="mlp.experts.{expert}.up_proj.weight"))
_EXPERT_FC2 = PerExpert(RowSplit("mlp.experts.local_experts.{local}.linear_fc2.weight",
                                 "mlp.experts.{expert}.down_proj.weight"))
QWEN3_MOE = Family(
    name="qwen3-moe",
    architectures=("Qwen3MoeForCausalLM",),
    aliases=("qwen3-moe", "qwen3_moe"),
    qk_layernorm=True,
    layer=QWEN3.layer,
    moe_mlp=(Replicated("mlp.router.weight", "mlp.gate.weight"), _EXPERT_FC1, _EXPERT_FC2),
    grouped_experts=(GroupedExperts("mlp.experts.weight1", _EXPERT_FC1, hidden_first=True),
                     GroupedExperts("mlp.experts.weight2", _EXPERT_FC2, hidden_first=False)),
)
