"""`--enable-hf2mg-convert`: the Hugging Face model in --load converted at start-up to the run's TP/PP layout, for
training, generation and evaluation alike."""
from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path
from typing import Optional

import torch

from mindspeed_llm.checkpoint.hf2mg import Hf2MgOptions, convert_hf_to_mg
from mindspeed_llm.errors import UserError
from mindspeed_llm.models.placement import parse_layer_list


def convert_at_startup(opts: Hf2MgOptions) -> None:
    """`--enable-hf2mg-convert`: rank 0 converts the HF model in `opts.load_dir` (--load) to the run's TP/PP/EP
    layout in `opts.save_dir` (`hf2mg_cache_dir`); every rank then loads from there. Collective."""
    hf_dir, cache = opts.load_dir, opts.save_dir
    if not any(Path(hf_dir).glob("*.safetensors")) and not any(Path(hf_dir).glob("*.bin")):
        raise UserError(f"--enable-hf2mg-convert: --load {hf_dir} has no *.safetensors; it must be a Hugging Face "
                        f"model directory (to resume from a Megatron save, drop --enable-hf2mg-convert)")
    # Rank 0 converts while the others wait in the broadcast: they learn whether it failed, and why.
    outcome: list = [None]
    failure: Optional[BaseException] = None
    if torch.distributed.get_rank() == 0:
        try:
            convert_hf_to_mg(opts, log=lambda msg: None)
        except UserError as exc:
            outcome[0] = ("user", f"--enable-hf2mg-convert: {exc}")
        except BaseException as exc:      # a bug or a failed write: rank 0 re-raises it with its traceback
            outcome[0], failure = ("bug", f"rank 0 failed converting --load {hf_dir}: {exc!r}"), exc
    torch.distributed.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        kind, message = outcome[0]
        if kind == "user":
            error = UserError(message)
            error.shared = True
            raise error
        raise RuntimeError(message)
    if torch.distributed.get_rank() == 0:
        print(f"--enable-hf2mg-convert: converted --load {hf_dir} to {cache} (TP{opts.tp} PP{opts.pp} EP{opts.ep}; "
              f"--mg-save-dir chooses where)", flush=True)


def startup_options(args: argparse.Namespace) -> Hf2MgOptions:
    """Generation's and evaluation's conversion at start-up, from their flags (real layers, no noop ones)."""
    return Hf2MgOptions(
        load_dir=Path(args.load), save_dir=Path(hf2mg_cache_dir(args.load, args.save, args.mg_save_dir,
                                                                args.tensor_model_parallel_size,
                                                                args.pipeline_model_parallel_size,
                                                                args.expert_model_parallel_size)),
        model_type_hf=args.model_type_hf, tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
        ep=args.expert_model_parallel_size, num_layer_list=parse_layer_list(args.num_layer_list),
        layers_per_vpp_stage=args.num_layers_per_virtual_pipeline_stage,
        params_dtype="bf16" if args.bf16 else "fp16" if args.fp16 else None,
        grouped_gemm=bool(args.moe_grouped_gemm), etp=args.expert_tensor_parallel_size)


def hf2mg_cache_dir(load: str, save: Optional[str], mg_save_dir: Optional[str], tp: int, pp: int, ep: int) -> str:
    """Where `--enable-hf2mg-convert` writes the HF model in `load` converted: --mg-save-dir, else beside the
    run's checkpoints under --save, else the user's cache directory. Never inside the HF directory, which may be
    read-only or shared."""
    name = f"megatron_cache_tp{tp}pp{pp}ep{ep}"
    if mg_save_dir:
        return str(mg_save_dir)
    if save:
        return str(Path(save) / name)
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    source = hashlib.sha256(str(Path(load).resolve()).encode()).hexdigest()[:16]
    return str(cache_home / "mindspeed_llm" / "hf2mg" / f"{Path(load).resolve().name}-{source}" / name)
