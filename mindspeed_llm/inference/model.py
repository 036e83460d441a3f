"""Model for generation: the model shape from the flags (checkpoint values fill what the flags leave out), the
parallel state, this rank's GPTModel stage and its checkpoint shard."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

import torch

from mindspeed_llm.arguments import params_dtype
from mindspeed_llm.errors import UserError
from mindspeed_llm.models.config import ModelConfig

# ModelConfig field <- (flag destination, saved-args key). Flags win; a flag that contradicts the checkpoint is
# an error naming both values.
_SHAPE = (
    ("num_layers", "num_layers", "num_layers"),
    ("hidden_size", "hidden_size", "hidden_size"),
    ("ffn_hidden_size", "ffn_hidden_size", "ffn_hidden_size"),
    ("num_attention_heads", "num_attention_heads", "num_attention_heads"),
    ("num_query_groups", "num_query_groups", "num_query_groups"),
    ("kv_channels", "kv_channels", "kv_channels"),
    ("max_position_embeddings", "max_position_embeddings", "max_position_embeddings"),
    ("norm_epsilon", "norm_epsilon", "norm_epsilon"),
    ("rotary_base", "rotary_base", "rotary_base"),
    ("vocab_size", "padded_vocab_size", "padded_vocab_size"),
    ("qk_layernorm", "qk_layernorm", "qk_layernorm"),
    ("add_qkv_bias", "add_qkv_bias", "add_qkv_bias"),
)


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _saved_value(saved: Optional[argparse.Namespace], key: str) -> Any:
    value = getattr(saved, key, None) if saved is not None else None
    if key == "num_query_groups" and value is None and saved is not None:
        value = getattr(saved, "num_key_value_heads", None)
    return value


def resolve_model_config(args: argparse.Namespace, saved: Optional[argparse.Namespace], tokenizer_len: int,
                         source: str) -> ModelConfig:
    """Flags + checkpoint args -> ModelConfig; raises UserError naming the flag on a mismatch or a gap."""
    explicit = getattr(args, "explicit", set())
    values: dict[str, Any] = {}
    for field, dest, key in _SHAPE:
        given = getattr(args, dest, None)
        stored = _saved_value(saved, key)
        if dest == "num_query_groups" and dest in explicit and not args.group_query_attention:
            given = None        # Megatron ignores --num-query-groups without --group-query-attention
        if dest in explicit and given is not None:
            if stored is not None and not _same(given, stored):
                raise UserError(f"{flag(dest)} {given} disagrees with the checkpoint {source}, which was saved "
                                f"with {stored}; use {flag(dest)} {stored} or the matching checkpoint")
            values[field] = given
        elif stored is not None:
            values[field] = stored
        else:
            values[field] = given
    untie_flag = args.untie_embeddings_and_output_weights
    untie_saved = _saved_value(saved, "untie_embeddings_and_output_weights")
    if untie_flag and untie_saved is False:
        raise UserError(f"--untie-embeddings-and-output-weights disagrees with the checkpoint {source}, which ties "
                        f"the output layer to the embeddings; drop the flag")
    untie = bool(untie_flag or untie_saved)
    for field, dest in (("num_layers", "num_layers"), ("hidden_size", "hidden_size"),
                        ("num_attention_heads", "num_attention_heads")):
        if values[field] is None:
            raise UserError(f"{flag(dest)} is required (the checkpoint {source} does not record it)")
    heads, hidden = int(values["num_attention_heads"]), int(values["hidden_size"])
    values["num_query_groups"] = values["num_query_groups"] or heads
    values["kv_channels"] = values["kv_channels"] or hidden // heads
    if values["ffn_hidden_size"] is None:
        raise UserError(f"--ffn-hidden-size is required (the checkpoint {source} does not record it)")
    if values["max_position_embeddings"] is None:
        values["max_position_embeddings"] = args.seq_length or 4096
    if values["vocab_size"] is None:
        multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
        values["vocab_size"] = -(-tokenizer_len // multiple) * multiple
    return ModelConfig(
        family=args.model_type_hf or getattr(saved, "model_type_hf", None) or "qwen3",
        num_layers=int(values["num_layers"]), hidden_size=hidden, ffn_hidden_size=int(values["ffn_hidden_size"]),
        num_attention_heads=heads, num_query_groups=int(values["num_query_groups"]),
        kv_channels=int(values["kv_channels"]), vocab_size=int(values["vocab_size"]),
        max_position_embeddings=int(values["max_position_embeddings"]), norm_epsilon=float(values["norm_epsilon"]),
        rotary_base=float(values["rotary_base"]), tie_word_embeddings=not untie,
        qk_layernorm=bool(values["qk_layernorm"]), add_qkv_bias=bool(values["add_qkv_bias"]),
        rope_scaling_factor=args.rope_scaling_factor if args.rope_scaling_type else None,
    )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))
        except (TypeError, ValueError):
            return False
    return a == b


def read_checkpoint_args(load: str) -> tuple[Optional[argparse.Namespace], str]:
    """(saved args or None, iteration dir) of a Megatron checkpoint root; errors name --load."""
    from mindspeed_llm.checkpoint import layout
    from mindspeed_llm.checkpoint.errors import ConversionError

    root = Path(load)
    if (root / "config.json").is_file() and not (root / layout.TRACKER).is_file():
        raise UserError(f"--load {load} is a Hugging Face model directory; convert it first (convert_ckpt.py "
                        f"--load-model-type hf --save-model-type mg ...) and pass the output to --load")
    try:
        iter_dir = layout.iteration_dir(root)
        return layout.read_args(iter_dir), str(iter_dir)
    except ConversionError as exc:
        raise UserError(str(exc).replace("--load-dir", "--load")) from None


def build_and_load(args: argparse.Namespace, cfg: ModelConfig) -> torch.nn.Module:
    """This rank's GPTModel stage (eval mode, full-vocabulary logits) with its checkpoint shard loaded."""
    from mindspeed_llm.checkpoint.errors import ConversionError
    from mindspeed_llm.checkpoint.load import load_checkpoint
    from mindspeed_llm.models import PlacementError, build_model, parse_layer_list

    try:
        layer_list = parse_layer_list(args.num_layer_list)
        chunks = build_model(cfg, params_dtype=params_dtype(args), num_layer_list=layer_list, parallel_output=False)
    except (PlacementError, ValueError) as exc:
        raise UserError(str(exc)) from None
    expected = {"num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
                "num_attention_heads": cfg.num_attention_heads,
                "untie_embeddings_and_output_weights": cfg.untie_embeddings_and_output_weights}
    if layer_list:
        expected["num_layer_list"] = layer_list
    try:
        load_checkpoint(chunks, args.load, expected=expected, strict=not args.load_checkpoint_loosely)
    except ConversionError as exc:
        raise UserError(str(exc)) from None
    return chunks[0]
