"""Qwen3 dense: GQA with per-head RMSNorm on q and k, SwiGLU, RMSNorm, RoPE; tied or untied embeddings."""
from mindspeed_llm.models.family import Family, FusedQKV, GatedMLP, Replicated, RowSplit

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
