"""HF `config.json` -> the model description we build and convert from -> megatron-core `TransformerConfig`."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from mindspeed_llm.errors import UserError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    """Everything about a decoder-only model that conversion and model building need, family-independent."""

    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    max_position_embeddings: int
    norm_epsilon: float
    rotary_base: float
    tie_word_embeddings: bool
    qk_layernorm: bool
    add_qkv_bias: bool
    rope_scaling_factor: Optional[float] = None      # Llama-3.x "llama3" rope scaling
    torch_dtype: Optional[str] = None
    # Mixture of experts (None: a dense model). Routed experts per MoE layer, experts per token, each expert's
    # SwiGLU width, whether the top-k weights are renormalised to sum to 1, the load-balancing loss weight, and
    # the layers that keep a dense MLP (of ffn_hidden_size) instead.
    num_experts: Optional[int] = None
    moe_router_topk: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None
    norm_topk_prob: bool = False
    moe_aux_loss_coeff: float = 0.0
    dense_layers: tuple[int, ...] = ()
    # MindSpeed's --noop-layers: global indices of weightless identity layers, counted in num_layers
    noop_layers: tuple[int, ...] = ()
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def untie_embeddings_and_output_weights(self) -> bool:
        return not self.tie_word_embeddings

    def is_moe_layer(self, layer: int) -> bool:
        """Whether global layer `layer` has a routed-experts MLP."""
        return self.num_experts is not None and layer not in self.dense_layers and layer not in self.noop_layers

    def to_dict(self) -> dict:
        return asdict(self)


class ConfigError(UserError):
    """A config.json that cannot describe a supported model; the message names the key and the fix."""


def read_hf_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: --load-dir/--hf-cfg-dir must be a Hugging Face model directory "
                          f"holding config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc})") from None


def _rope_theta(cfg: dict) -> float:
    """`rope_theta` at top level (published checkpoints) or under `rope_parameters` (transformers >= 5)."""
    if cfg.get("rope_theta") is not None:
        return float(cfg["rope_theta"])
    params = cfg.get("rope_parameters") or {}
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    return 10000.0


def _rope_scaling_factor(cfg: dict) -> Optional[float]:
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = scaling.get("rope_type") or scaling.get("type") if isinstance(scaling, dict) else None
    if kind in (None, "default"):
        return None
    if kind == "llama3":
        return float(scaling["factor"])
    raise ConfigError(f"config.json rope scaling type {kind!r} is not supported (supported: default, llama3)")


def _moe_fields(cfg: dict, num_layers: int, need) -> dict[str, Any]:
    """The MoE fields of a Qwen-MoE-style config.json. Published configs say `num_experts`; transformers >= 5
    saves `num_local_experts`. Layer i is MoE unless it is in `mlp_only_layers` or (i+1) is not a multiple of
    `decoder_sparse_step` (transformers' Qwen3MoeDecoderLayer)."""
    experts = cfg.get("num_experts", cfg.get("num_local_experts"))
    if experts is None:
        need("num_experts")
    if int(experts) < 1:
        raise ConfigError(f"config.json has num_experts = {experts}; a MoE model needs at least one expert")
    if int(need("num_experts_per_tok")) == 1 and cfg.get("norm_topk_prob"):
        raise ConfigError("config.json sets num_experts_per_tok = 1 with norm_topk_prob = true, which megatron-core's "
                          "router cannot compute (top-1 needs the softmax over all experts first)")
    step = int(cfg.get("decoder_sparse_step") or 1)
    mlp_only = {int(i) for i in cfg.get("mlp_only_layers") or ()}
    return dict(num_experts=int(experts), moe_router_topk=int(need("num_experts_per_tok")),
                moe_ffn_hidden_size=int(need("moe_intermediate_size")),
                norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                moe_aux_loss_coeff=float(cfg.get("router_aux_loss_coef", 0.0)),
                dense_layers=tuple(i for i in range(num_layers) if i in mlp_only or (i + 1) % step))


def model_config_from_hf(cfg: dict, family: str, *, qk_layernorm: bool, add_qkv_bias: bool,
                         moe: bool = False) -> ModelConfig:
    def need(key: str) -> Any:
        if key not in cfg:
            raise ConfigError(f"config.json has no {key!r}; it is required for a {family} model")
        return cfg[key]

    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ConfigError(f"config.json sets attention_bias/mlp_bias to true, which the {family} family does not "
                          f"support (only Qwen2-style q/k/v biases are); use a checkpoint without those biases")
    heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = cfg.get("head_dim") or hidden // heads
    num_layers = int(need("num_hidden_layers"))
    return ModelConfig(
        family=family,
        num_layers=num_layers,
        hidden_size=hidden,
        ffn_hidden_size=int(need("intermediate_size")),
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        kv_channels=int(head_dim),
        vocab_size=int(need("vocab_size")),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        rotary_base=_rope_theta(cfg),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qk_layernorm=qk_layernorm,
        add_qkv_bias=add_qkv_bias,
        rope_scaling_factor=_rope_scaling_factor(cfg),
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        **(_moe_fields(cfg, num_layers, need) if moe else {}),
    )


def pipeline_layout(num_layer_list: list[int]) -> list[list[str]]:
    """megatron-core `pipeline_model_parallel_layout` for uneven stages (`--num-layer-list 7,21`)."""
    stages = [["decoder"] * n for n in num_layer_list]
    stages[0] = ["embedding"] + stages[0]
    stages[-1] = stages[-1] + ["loss"]
    return stages


def moe_config(cfg: ModelConfig) -> dict[str, Any]:
    """megatron-core MoE fields that compute transformers' Qwen3-MoE routing: softmax over all experts, top-k,
    and with norm_topk_prob the k weights renormalised. megatron's default (top-k of the logits, then softmax
    over those k) equals the renormalised weights; `moe_router_pre_softmax` (softmax over all experts, then
    top-k, no renormalisation) equals norm_topk_prob = false. Experts are SequentialMLP on the `allgather`
    token dispatcher; the expert-parallel size comes from the parallel state (`build.build_model`)."""
    return dict(
        num_moe_experts=cfg.num_experts,
        moe_router_topk=cfg.moe_router_topk,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not cfg.norm_topk_prob,
        moe_router_load_balancing_type="aux_loss" if cfg.moe_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=cfg.moe_aux_loss_coeff,
        moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=False,
    )


def transformer_config(cfg: ModelConfig, *, tensor_model_parallel_size: int = 1,
                       pipeline_model_parallel_size: int = 1,
                       virtual_pipeline_model_parallel_size: Optional[int] = None,
                       num_layer_list: Optional[list[int]] = None, params_dtype: torch.dtype = torch.float32,
                       sequence_parallel: bool = False, **overrides: Any):
    """Our layers' `TransformerConfig` (`spec.LayerConfig`) for `cfg` at the given parallel sizes (no dropout,
    unfused kernels unless `overrides` choose fused ones)."""
    from mindspeed_llm.models.spec import LayerConfig

    kwargs: dict[str, Any] = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.add_qkv_bias,
        qk_layernorm=cfg.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        sequence_parallel=sequence_parallel and tensor_model_parallel_size > 1,
    )
    if cfg.num_experts is not None:
        kwargs.update(moe_config(cfg))
    if num_layer_list:
        kwargs["pipeline_model_parallel_layout"] = pipeline_layout(num_layer_list)
    elif virtual_pipeline_model_parallel_size:
        kwargs["virtual_pipeline_model_parallel_size"] = virtual_pipeline_model_parallel_size
    kwargs.update(overrides)
    return LayerConfig(**kwargs)
