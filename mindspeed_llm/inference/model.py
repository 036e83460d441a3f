"""Model for generation: the model shape from the flags (checkpoint values fill what the flags leave out), the
parallel state, this rank's GPTModel stage and its checkpoint shard."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch

from mindspeed_llm.arguments import params_dtype
from mindspeed_llm.errors import UserError
from mindspeed_llm.models.config import ModelConfig


def resolve_model_config(args: argparse.Namespace, saved: Optional[argparse.Namespace], tokenizer_len: int,
                         source: str) -> ModelConfig:
    """Flags + the checkpoint's saved args (read from `source`) -> ModelConfig (`models.resolve.resolve_model`)."""
    from mindspeed_llm.explicit import explicit_of
    from mindspeed_llm.inference.args import build_parser
    from mindspeed_llm.models.resolve import resolve_model

    return resolve_model(args, explicit_of(args, build_parser()), saved=saved, saved_source=source,
                         tokenizer_len=tokenizer_len)


def read_checkpoint_args(load: str) -> tuple[Optional[argparse.Namespace], str]:
    """(saved args, the rank file they were read from) of a Megatron checkpoint root; errors name --load."""
    from mindspeed_llm.checkpoint import layout
    from mindspeed_llm.checkpoint.errors import ConversionError
    from mindspeed_llm.checkpoint.load import saved_args

    root = Path(load)
    if (root / "config.json").is_file() and not (root / layout.TRACKER).is_file():
        raise UserError(f"--load {load} is a Hugging Face model directory; convert it first (convert_ckpt.py "
                        f"--load-model-type hf --save-model-type mg ...) and pass the output to --load")
    try:
        return saved_args(root)
    except ConversionError as exc:     # the layout's messages name the converter's flag
        raise UserError(str(exc).replace("--load-dir", "--load")) from None


def build_and_load(args: argparse.Namespace, cfg: ModelConfig) -> torch.nn.Module:
    """This rank's GPTModel stage (eval mode, full-vocabulary logits) with its checkpoint shard loaded."""
    from mindspeed_llm.checkpoint.load import load_checkpoint
    from mindspeed_llm.models import build_model, parse_layer_list
    from mindspeed_llm.models.resolve import model_args

    layer_list = parse_layer_list(args.num_layer_list)
    chunks = build_model(cfg, params_dtype=params_dtype(args), num_layer_list=layer_list, parallel_output=False)
    expected = model_args(cfg)
    if layer_list:
        expected["num_layer_list"] = layer_list
    load_checkpoint(chunks, args.load, expected=expected, strict=not args.load_checkpoint_loosely)
    return chunks[0]
