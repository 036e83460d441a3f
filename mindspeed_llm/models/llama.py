"""Llama-2 / Llama-3: GQA (or MHA), SwiGLU, RMSNorm, RoPE (Llama-3.x rope scaling read from config)."""
from mindspeed_llm.models.family import Family, FusedQKV, GatedMLP, Replicated, RowSplit

LLAMA = Family(
    name="llama3",
    architectures=("LlamaForCausalLM",),
    aliases=("llama3", "llama2", "llama"),
    layer=(
        Replicated("input_layernorm.weight", "input_layernorm.weight"),
        FusedQKV("self_attention.linear_qkv.weight", q="self_attn.q_proj.weight", k="self_attn.k_proj.weight",
                 v="self_attn.v_proj.weight"),
        RowSplit("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
        Replicated("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
        GatedMLP("mlp.linear_fc1.weight", gate="mlp.gate_proj.weight", up="mlp.up_proj.weight"),
        RowSplit("mlp.linear_fc2.weight", "mlp.down_proj.weight"),
    ),
)
