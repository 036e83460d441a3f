"""Qwen2 / Qwen2.5 dense: like Qwen3 without q/k norms, with biases on the q/k/v projections."""
from mindspeed_llm.models.family import Family, FusedQKV, GatedMLP, Replicated, RowSplit

QWEN2 = Family(
    name="qwen2",
    architectures=("Qwen2ForCausalLM",),
    aliases=("qwen2", "qwen25", "qwen2.5"),
    add_qkv_bias=True,
    layer=(
        Replicated("input_layernorm.weight", "input_layernorm.weight"),
        FusedQKV("self_attention.linear_qkv.weight", q="self_attn.q_proj.weight", k="self_attn.k_proj.weight",
                 v="self_attn.v_proj.weight"),
        FusedQKV("self_attention.linear_qkv.bias", q="self_attn.q_proj.bias", k="self_attn.k_proj.bias",
                 v="self_attn.v_proj.bias"),
        RowSplit("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
        Replicated("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
        GatedMLP("mlp.linear_fc1.weight", gate="mlp.gate_proj.weight", up="mlp.up_proj.weight"),
        RowSplit("mlp.linear_fc2.weight", "mlp.down_proj.weight"),
    ),
)
