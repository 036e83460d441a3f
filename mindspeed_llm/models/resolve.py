"""One model shape for a run, from what describes it: explicit flags, a Megatron checkpoint's saved args and a
Hugging Face config.json. Training, generation and both conversion directions resolve through `resolve_model`.

Precedence, as Megatron users expect it: a flag the user typed wins only when it agrees with the checkpoint (a
disagreement is a one-line UserError naming the flag, the file and both values); the checkpoint's saved args and
config.json fill what the user did not type (they must agree with each other); parser defaults fill the rest.

Run settings (`RUN_SETTINGS`) are the exception: they size no weight and change no number the checkpoint's
weights were trained with, so the typed value wins and a difference is one notice in the log.
"""
from __future__ import annotations

import argparse
import functools
import math
from dataclasses import asdict
from typing import Any, Collection, Optional

from mindspeed_llm.errors import UserError
from mindspeed_llm.models.config import ModelConfig
from mindspeed_llm.models.registry import family_for_config, get_family
from mindspeed_llm.platform import notice

_MISSING = object()

# ModelConfig field -> (flag destination, config.json key) for the fields a source can record.
FIELDS: dict[str, tuple[str, str]] = {
    "num_layers": ("num_layers", "num_hidden_layers"),
    "hidden_size": ("hidden_size", "hidden_size"),
    "ffn_hidden_size": ("ffn_hidden_size", "intermediate_size"),
    "num_attention_heads": ("num_attention_heads", "num_attention_heads"),
    "num_query_groups": ("num_query_groups", "num_key_value_heads"),
    "kv_channels": ("kv_channels", "head_dim"),
    "vocab_size": ("padded_vocab_size", "vocab_size"),
    "max_position_embeddings": ("max_position_embeddings", "max_position_embeddings"),
    "norm_epsilon": ("norm_epsilon", "rms_norm_eps"),
    "rotary_base": ("rotary_base", "rope_theta"),
    "tie_word_embeddings": ("untie_embeddings_and_output_weights", "tie_word_embeddings"),
    "qk_layernorm": ("qk_layernorm", "(family) q/k norm"),
    "add_qkv_bias": ("add_qkv_bias", "(family) q/k/v bias"),
    "rope_scaling_factor": ("rope_scaling_factor", "rope_scaling.factor"),
    "num_experts": ("num_experts", "num_experts"),
    "moe_router_topk": ("moe_router_topk", "num_experts_per_tok"),
    "moe_ffn_hidden_size": ("moe_ffn_hidden_size", "moe_intermediate_size"),
    "norm_topk_prob": ("norm_topk_prob", "norm_topk_prob"),
    "moe_aux_loss_coeff": ("moe_aux_loss_coeff", "router_aux_loss_coef"),
    "dense_layers": ("moe_layer_freq", "mlp_only_layers/decoder_sparse_step"),
}

# Fields that describe the run, not the weights. max_position_embeddings: with RoPE no weight depends on it; it
# bounds --seq-length and sizes the RoPE tables (MindSpeed's Qwen3 recipes pass 4096 or 32768 where the published
# config.json records 40960, and the long-context recipes pass the sequence length). Every other field sizes a
# weight (layers, widths, heads, groups, vocabulary, tying, q/k norm, q/k/v bias) or changes the numbers the
# weights were trained with (norm eps, RoPE base and scaling), so those must agree.
# moe_aux_loss_coeff only weighs the load-balancing loss of a training run.
RUN_SETTINGS = frozenset({"max_position_embeddings", "moe_aux_loss_coeff"})

# Saved-args names of the resolved model's weights and numerics: what a load compares (see `model_args`, which
# records these and the run settings).
MODEL_ARG_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                  "kv_channels", "padded_vocab_size", "norm_epsilon", "rotary_base",
                  "untie_embeddings_and_output_weights", "qk_layernorm", "add_qkv_bias", "num_experts",
                  "moe_router_topk", "moe_ffn_hidden_size", "norm_topk_prob")


def flag_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def same(a: Any, b: Any) -> bool:
    """Equal, with floats compared to a relative 1e-9 (1e-6 written as 1e-06 or 0.000001 is the same eps)."""
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None or isinstance(a, bool) or isinstance(b, bool):
            return a == b
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _saved_values(saved: argparse.Namespace) -> dict[str, Any]:
    """The fields a checkpoint's saved args record (a value of None means "not recorded")."""
    def get(*names: str) -> Any:
        for n in names:
            value = getattr(saved, n, None)
            if value is not None:
                return value
        return None

    out: dict[str, Any] = {
        "num_layers": get("num_layers", "num_hidden_layers"), "hidden_size": get("hidden_size"),
        "ffn_hidden_size": get("ffn_hidden_size", "intermediate_size"),
        "num_attention_heads": get("num_attention_heads"),
        "kv_channels": get("kv_channels", "head_dim"), "vocab_size": get("padded_vocab_size", "vocab_size"),
        "max_position_embeddings": get("max_position_embeddings"),
        "norm_epsilon": get("norm_epsilon", "rms_norm_eps"), "rotary_base": get("rotary_base", "rope_theta"),
        "qk_layernorm": get("qk_layernorm"), "add_qkv_bias": get("add_qkv_bias"),
        "num_experts": get("num_experts", "num_local_experts"),
    }
    if out["num_experts"] is not None:
        out.update(moe_router_topk=get("moe_router_topk", "num_experts_per_tok"),
                   moe_ffn_hidden_size=get("moe_ffn_hidden_size", "moe_intermediate_size"),
                   norm_topk_prob=bool(get("norm_topk_prob")),
                   moe_aux_loss_coeff=get("moe_aux_loss_coeff", "router_aux_loss_coef"),
                   dense_layers=dense_layers(saved, out["num_layers"]))
    groups = get("num_query_groups", "num_key_value_heads")
    if groups is None and out["num_attention_heads"] is not None and not getattr(saved, "group_query_attention", 0):
        groups = out["num_attention_heads"]       # saved without GQA: one KV group per head
    out["num_query_groups"] = groups
    untie = get("untie_embeddings_and_output_weights")
    tie = get("tie_word_embeddings")
    out["tie_word_embeddings"] = (not untie) if untie is not None else tie
    if hasattr(saved, "rope_scaling_type"):
        out["rope_scaling_factor"] = (float(saved.rope_scaling_factor) if saved.rope_scaling_type == "llama3"
                                      else None)
    else:
        out["rope_scaling_factor"] = _MISSING
    return {k: v for k, v in out.items() if v is not None or k == "rope_scaling_factor"}


def dense_layers(saved: argparse.Namespace, num_layers: Optional[int]) -> Optional[tuple[int, ...]]:
    """The layers without experts, from MoE saved args: MindSpeed's `first_k_dense_replace` k with
    `moe_layer_freq` f (layer i is MoE iff i >= k and i % f == 0; -1/-1 makes every layer MoE), else megatron's
    `moe_layer_freq` (an int f: layer i is MoE iff i % f == 0; or a 0/1 list per layer). Unrecorded: all MoE."""
    if num_layers is None:
        return None
    freq = getattr(saved, "moe_layer_freq", None)
    first_k = getattr(saved, "first_k_dense_replace", None)
    if isinstance(freq, (list, tuple)):
        return tuple(i for i, moe in enumerate(freq) if not moe)
    if first_k is not None:
        f = int(freq or 1)
        return tuple(i for i in range(num_layers) if not (i >= int(first_k) and i % f == 0))
    f = int(freq or 1)
    return tuple(i for i in range(num_layers) if i % f)


def _flag_values(args: argparse.Namespace, explicit: Collection[str]) -> dict[str, Any]:
    """ModelConfig field -> value, for the model flags the user typed."""
    out: dict[str, Any] = {}
    for field, (dest, _) in FIELDS.items():
        if dest not in explicit or getattr(args, dest, None) is None:
            continue
        value = getattr(args, dest)
        if field == "tie_word_embeddings":
            if not value:
                continue            # --no-... does not exist: only the untie switch can be typed
            value = False
        elif field in ("qk_layernorm", "add_qkv_bias", "norm_topk_prob") and not value:
            continue
        elif field == "dense_layers":
            continue            # no flag sets the MoE layer pattern; it comes from the checkpoint or config.json
        elif field == "rope_scaling_factor":
            value = float(value) if getattr(args, "rope_scaling_type", None) == "llama3" else None
        out[field] = value
    if "group_query_attention" in explicit and args.group_query_attention and "num_query_groups" not in out:
        out["num_query_groups"] = 1      # Megatron: --group-query-attention alone keeps --num-query-groups' default 1
    if "rope_scaling_type" in explicit and "rope_scaling_factor" not in out and args.rope_scaling_type:
        raise UserError(f"--rope-scaling-type {args.rope_scaling_type} needs --rope-scaling-factor")
    return out


_RUN_SETTING_EFFECT = {
    "max_position_embeddings": "used as this run's position limit and RoPE table size; no weight depends on it",
    "moe_aux_loss_coeff": "used as this run's load-balancing loss weight; no weight depends on it",
}


@functools.lru_cache(maxsize=None)
def _notice_once(message: str) -> None:
    """Training, generation and each checkpoint load resolve the model; say a run-setting difference once."""
    notice(message)


def _show(field: str, value: Any) -> str:
    return f"{FIELDS[field][1] if field == 'tie_word_embeddings' else field} = {value}"


def _flag_text(field: str, value: Any, explicit: Collection[str]) -> str:
    dest = FIELDS[field][0]
    if field == "num_query_groups" and dest not in explicit:
        return "--group-query-attention without --num-query-groups (1 query group, as in Megatron)"
    if field == "tie_word_embeddings":
        return flag_name(dest)
    if isinstance(value, bool):
        return flag_name(dest)
    return f"{flag_name(dest)} {value}"


def _fix(field: str, stored: Any) -> str:
    dest = FIELDS[field][0]
    if field == "tie_word_embeddings" or isinstance(stored, bool):
        return "drop the flag"
    return f"drop the flag or pass {flag_name(dest)} {stored}"


def _family(args: Optional[argparse.Namespace], explicit: Collection[str], model_type_hf: Optional[str],
            saved: Optional[argparse.Namespace], saved_source: str, hf: Optional[dict], hf_source: str):
    """The model family: config.json architectures, else the checkpoint's, else --model-type-hf (all agreeing)."""
    requested = model_type_hf or (args.model_type_hf if args is not None and getattr(args, "model_type_hf", None)
                                  else None)
    fam = family_for_config(hf, requested, source=hf_source) if hf is not None else None
    recorded = None
    if saved is not None:
        if getattr(saved, "architectures", None):
            recorded = family_for_config(vars(saved), None, source=saved_source)
        elif getattr(saved, "model_type_hf", None):
            recorded = get_family(saved.model_type_hf)
    if fam is not None and recorded is not None and fam is not recorded:
        raise UserError(f"{saved_source} was saved from a {recorded.name} model but {hf_source} describes a "
                        f"{fam.name} model; pass the config of the model this checkpoint came from")
    fam = fam or recorded
    if requested is not None:
        wanted = get_family(requested)
        if fam is not None and wanted is not fam:
            raise UserError(f"--model-type-hf {requested} disagrees with {hf_source if hf else saved_source}, "
                            f"which holds a {fam.name} model; drop the flag or pass --model-type-hf {fam.name}")
        fam = wanted
    return fam


def resolve_model(args: Optional[argparse.Namespace] = None, explicit: Collection[str] = (), *,
                  saved: Optional[argparse.Namespace] = None, saved_source: str = "the checkpoint args",
                  hf: Optional[dict] = None, hf_source: str = "config.json", model_type_hf: Optional[str] = None,
                  tokenizer_len: Optional[int] = None) -> ModelConfig:
    """The one model shape of a run.

    `args`: the parsed flags (None for conversion, which has no model flags); `explicit`: the flag destinations
    the user typed (`mindspeed_llm.explicit.explicit_dests`); `saved`: a Megatron checkpoint's saved args, read
    from `saved_source`; `hf`: config.json as a dict, read from `hf_source`; `tokenizer_len` pads the vocabulary
    when nothing records it. Raises UserError naming the flag or file on any disagreement or gap.
    """
    fam = _family(args, explicit, model_type_hf, saved, saved_source, hf, hf_source)
    recorded: dict[str, tuple[Any, str]] = {}
    if saved is not None:
        recorded = {k: (v, saved_source) for k, v in _saved_values(saved).items() if v is not _MISSING}
    if hf is not None:
        hf_cfg = fam.config(hf)
        for field, value in asdict(hf_cfg).items():
            if field not in FIELDS:
                continue
            if field in recorded and field in RUN_SETTINGS:
                continue                    # the run that saved the checkpoint set it; config.json keeps its own
            if field in recorded and not same(recorded[field][0], value):
                raise UserError(f"{saved_source} records {_show(field, recorded[field][0])} but {hf_source} has "
                                f"{FIELDS[field][1]} = {value}; pass the config of the model this checkpoint came "
                                f"from")
            recorded[field] = (value, hf_source)
    flags = _flag_values(args, explicit) if args is not None else {}
    if flags.get("norm_topk_prob") and flags.get("num_experts") is None and \
            recorded.get("num_experts", (None,))[0] is None and (saved is not None or hf is not None):
        # MindSpeed's dense Qwen3-1.7B pretraining recipe passes it: a dense model has no router to normalise.
        del flags["norm_topk_prob"]
        _notice_once("--norm-topk-prob: accepted, no effect: the model is dense (no MoE router)")
    for field, given in flags.items():
        if field in recorded and not same(given, recorded[field][0]):
            stored, source = recorded[field]
            if field in RUN_SETTINGS:
                _notice_once(f"{_flag_text(field, given, explicit)} differs from {source} "
                             f"({_show(field, stored)}): {_RUN_SETTING_EFFECT[field]}")
                continue
            raise UserError(f"{_flag_text(field, given, explicit)} disagrees with {source}, which records "
                            f"{_show(field, stored)}; {_fix(field, stored)}")
    values = {k: v for k, (v, _) in recorded.items()}
    values.update(flags)
    where = " or ".join(s for s in (saved_source if saved is not None else "",
                                    hf_source if hf is not None else "") if s) or "a checkpoint"

    def need(field: str) -> Any:
        if values.get(field) is None:
            raise UserError(f"{flag_name(FIELDS[field][0])} is required ({where} does not record it)")
        return values[field]

    heads, hidden = int(need("num_attention_heads")), int(need("hidden_size"))
    default = (lambda dest, fallback=None: getattr(args, dest, fallback) if args is not None else fallback)
    if values.get("vocab_size") is None:
        if tokenizer_len is None:
            need("vocab_size")
        step = max(int(default("make_vocab_size_divisible_by", 1)), 1) * int(default("tensor_model_parallel_size", 1))
        values["vocab_size"] = -(-int(tokenizer_len) // step) * step
    rope_type = default("rope_scaling_type")
    qk_norm = bool(values.get("qk_layernorm", default("qk_layernorm", False)))
    qkv_bias = bool(values.get("add_qkv_bias", default("add_qkv_bias", False)))
    num_experts = values.get("num_experts")
    family = fam.name if fam is not None else ("qwen3-moe" if num_experts and qk_norm else "qwen3" if qk_norm
                                               else "qwen2" if qkv_bias else "llama3")
    torch_dtype = (hf.get("torch_dtype") or hf.get("dtype")) if hf is not None else None
    if torch_dtype is None and saved is not None:
        torch_dtype = getattr(saved, "torch_dtype", None) or getattr(saved, "dtype", None)
    return ModelConfig(
        family=family,
        num_layers=int(need("num_layers")),
        hidden_size=hidden,
        ffn_hidden_size=int(values.get("ffn_hidden_size") or 4 * hidden),
        num_attention_heads=heads,
        num_query_groups=int(values.get("num_query_groups") or heads),
        kv_channels=int(values.get("kv_channels") or hidden // heads),
        vocab_size=int(values["vocab_size"]),
        max_position_embeddings=int(values.get("max_position_embeddings") or default("seq_length") or 4096),
        norm_epsilon=float(values.get("norm_epsilon", default("norm_epsilon", 1e-6))),
        rotary_base=float(values.get("rotary_base", default("rotary_base", 10000.0))),
        tie_word_embeddings=bool(values.get("tie_word_embeddings",
                                            not default("untie_embeddings_and_output_weights", False))),
        qk_layernorm=qk_norm,
        add_qkv_bias=qkv_bias,
        rope_scaling_factor=values.get("rope_scaling_factor",
                                       default("rope_scaling_factor") if rope_type == "llama3" else None),
        torch_dtype=torch_dtype if isinstance(torch_dtype, str) else None,
        **(_moe_values(values, need) if num_experts else {}),
    )


def _moe_values(values: dict[str, Any], need) -> dict[str, Any]:
    """The MoE fields of the resolved model (every one that sizes a weight must be recorded somewhere)."""
    return dict(num_experts=int(values["num_experts"]), moe_router_topk=int(need("moe_router_topk")),
                moe_ffn_hidden_size=int(need("moe_ffn_hidden_size")),
                norm_topk_prob=bool(values.get("norm_topk_prob", False)),
                moe_aux_loss_coeff=float(values.get("moe_aux_loss_coeff") or 0.0),
                dense_layers=tuple(values.get("dense_layers") or ()))


def require_dense(cfg: ModelConfig, source: str, what: str) -> ModelConfig:
    """`cfg` itself; a mixture-of-experts model is one UserError naming `source` (conversion is what supports it)."""
    if cfg.num_experts is not None:
        raise UserError(f"{source} holds a mixture-of-experts model ({cfg.family}, {cfg.num_experts} experts): "
                        f"{what} of MoE models is not implemented yet (convert_ckpt.py converts them)")
    return cfg


def model_args(cfg: ModelConfig) -> dict[str, Any]:
    """Saved-args names -> values of `cfg`: what a save records (a load compares the `MODEL_ARG_KEYS` among them,
    see `weight_args`)."""
    return {"num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "ffn_hidden_size": cfg.ffn_hidden_size,
            "num_attention_heads": cfg.num_attention_heads, "num_query_groups": cfg.num_query_groups,
            "kv_channels": cfg.kv_channels, "padded_vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.max_position_embeddings, "norm_epsilon": cfg.norm_epsilon,
            "rotary_base": cfg.rotary_base, "untie_embeddings_and_output_weights": not cfg.tie_word_embeddings,
            "qk_layernorm": cfg.qk_layernorm, "add_qkv_bias": cfg.add_qkv_bias, **_moe_args(cfg)}


def _moe_args(cfg: ModelConfig) -> dict[str, Any]:
    """Saved-args names of the MoE fields (all None for a dense model); `moe_layer_freq` in megatron's form: 1
    when every layer is MoE, else a 0/1 list per layer."""
    if cfg.num_experts is None:
        return {"num_experts": None, "moe_router_topk": None, "moe_ffn_hidden_size": None, "norm_topk_prob": None}
    pattern = [int(cfg.is_moe_layer(i)) for i in range(cfg.num_layers)]
    return {"num_experts": cfg.num_experts, "moe_router_topk": cfg.moe_router_topk,
            "moe_ffn_hidden_size": cfg.moe_ffn_hidden_size, "norm_topk_prob": cfg.norm_topk_prob,
            "moe_aux_loss_coeff": cfg.moe_aux_loss_coeff, "moe_layer_freq": 1 if all(pattern) else pattern}


def weight_args(cfg: ModelConfig) -> dict[str, Any]:
    """The saved args a checkpoint's weights depend on: what a load compares."""
    return {key: value for key, value in model_args(cfg).items() if key in MODEL_ARG_KEYS}


def model_record(cfg: ModelConfig) -> dict[str, Any]:
    """What a training save records of the model that ran (mg -> hf and later loads read it): `model_args` and
    the derived Megatron names."""
    return {**model_args(cfg), "group_query_attention": cfg.num_query_groups != cfg.num_attention_heads,
            "rope_scaling_type": "llama3" if cfg.rope_scaling_factor is not None else None,
            "rope_scaling_factor": cfg.rope_scaling_factor, "torch_dtype": cfg.torch_dtype}
