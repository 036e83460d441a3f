"""Megatron checkpoint (any TP/PP/VPP) -> Hugging Face safetensors, one output file per decoder layer."""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from mindspeed_llm.checkpoint import layout
from mindspeed_llm.checkpoint.errors import ConversionError
from mindspeed_llm.checkpoint.hf_io import INDEX_NAME, SafetensorsWriter, copy_hf_cfg, publish_dir
from mindspeed_llm.checkpoint.mapping import MissingKey, merge_embedding, merge_head, merge_layer
from mindspeed_llm.models.config import ModelConfig, read_hf_config
from mindspeed_llm.models.family import Family
from mindspeed_llm.models.placement import Placement, parse_layer_list, place_layers
from mindspeed_llm.models.registry import get_family
from mindspeed_llm.models.resolve import resolve_model


@dataclass
class Mg2HfOptions:
    load_dir: Path
    save_dir: Path
    hf_cfg_dir: Optional[Path] = None
    model_type_hf: Optional[str] = None
    # Parallel flags given on the command line; they must agree with the checkpoint's saved args when set.
    tp: Optional[int] = None
    pp: Optional[int] = None
    num_layer_list: Optional[list[int]] = None
    layers_per_vpp_stage: Optional[int] = None


def model_from_args(args: argparse.Namespace, model_type_hf: Optional[str] = None,
                    hf_cfg_dir: Optional[Path] = None, source: str = "checkpoint args") -> tuple[Family, ModelConfig]:
    """Family and ModelConfig of a Megatron checkpoint, from its saved args (`source`), which must agree with
    --hf-cfg-dir's config.json when given (`models.resolve.resolve_model`)."""
    hf = read_hf_config(hf_cfg_dir) if hf_cfg_dir is not None else None
    if hf is None and not model_type_hf and not getattr(args, "model_type_hf", None) \
            and not getattr(args, "architectures", None):
        raise ConversionError(f"{source} name no model family; pass --model-type-hf")
    cfg = resolve_model(saved=args, saved_source=source, hf=hf,
                        hf_source=str(Path(hf_cfg_dir) / "config.json") if hf_cfg_dir else "",
                        model_type_hf=model_type_hf)
    return get_family(cfg.family), cfg


def _check_flags(args: argparse.Namespace, opts: Mg2HfOptions) -> None:
    saved = {
        "--target-tensor-parallel-size": (opts.tp, args.tensor_model_parallel_size),
        "--target-pipeline-parallel-size": (opts.pp, args.pipeline_model_parallel_size),
        "--num-layer-list": (opts.num_layer_list, parse_layer_list(getattr(args, "num_layer_list", None))),
        "--num-layers-per-virtual-pipeline-stage": (opts.layers_per_vpp_stage,
                                                    getattr(args, "num_layers_per_virtual_pipeline_stage", None)),
    }
    for flag, (given, stored) in saved.items():
        if given is not None and given != stored:
            raise ConversionError(f"{flag} {given} disagrees with the checkpoint, which was saved with {stored}; "
                                  f"drop the flag (mg -> hf reads the layout from the checkpoint) or fix --load-dir")


def checkpoint_placement(args: argparse.Namespace, cfg: ModelConfig) -> Placement:
    return place_layers(cfg.num_layers, int(args.pipeline_model_parallel_size),
                        parse_layer_list(getattr(args, "num_layer_list", None)),
                        getattr(args, "num_layers_per_virtual_pipeline_stage", None))


def iter_hf_tensors(load_dir: Path, model_type_hf: Optional[str] = None, hf_cfg_dir: Optional[Path] = None,
                    opts: Optional[Mg2HfOptions] = None, log: Callable[[str], None] = lambda s: None
                    ) -> tuple[Family, ModelConfig, Iterator[tuple[int, dict[str, torch.Tensor]]]]:
    """(family, config, generator of (hf_layer, tensors)): each layer's HF tensors, embedding with layer 0 and
    final norm / lm_head with the last layer; one pipeline stage's rank files are open at a time."""
    iter_dir = layout.iteration_dir(load_dir)
    args = layout.read_args(iter_dir)
    if opts is not None:
        _check_flags(args, opts)
    source = str(sorted(iter_dir.glob(f"mp_rank_*/{layout.FILE_NAME}"))[0])
    fam, cfg = model_from_args(args, model_type_hf, hf_cfg_dir, source=source)
    tp, pp = int(args.tensor_model_parallel_size), int(args.pipeline_model_parallel_size)
    placement = checkpoint_placement(args, cfg)
    keys = layout.model_keys(placement.vpp)

    def generate():
        start = time.time()
        for p in range(pp):
            states = [layout.load_rank_file(iter_dir / layout.rank_dir_name(t, p, pp) / layout.FILE_NAME)
                      for t in range(tp)]
            for v, layers in enumerate(placement.layers[p]):
                shards = []
                for t, state in enumerate(states):
                    if keys[v] not in state:
                        raise ConversionError(f"{iter_dir / layout.rank_dir_name(t, p, pp)} has no {keys[v]!r} "
                                              f"entry; its args say VPP size {placement.vpp}")
                    shards.append(state[keys[v]])
                try:
                    for local, layer in enumerate(layers):
                        tensors = merge_layer(fam, cfg, shards, local, layer)
                        if layer == 0:
                            tensors.update(merge_embedding(fam, cfg, shards))
                        if layer == cfg.num_layers - 1:
                            tensors.update(merge_head(fam, cfg, shards))
                        log(f"[mg2hf] layer {layer + 1}/{cfg.num_layers} ({time.time() - start:.1f}s)")
                        yield layer, tensors
                        del tensors   # else this layer's tensors stay alive while the next one is merged
                except MissingKey as exc:
                    raise ConversionError(f"{iter_dir / layout.rank_dir_name(0, p, pp)}: tensor {exc.args[0]} is "
                                          f"missing ({keys[v]}); the checkpoint does not match its saved args") from None
            del states, shards
            layout.release_freed_memory()

    return fam, cfg, generate()


def _inside(path: Path, directory: Path) -> bool:
    """Whether `path` is `directory` or lies inside it (after resolving symlinks and `..`)."""
    path, directory = path.resolve(), directory.resolve()
    return path == directory or directory in path.parents


def convert_mg_to_hf(opts: Mg2HfOptions, log: Callable[[str], None] = print) -> Path:
    save_dir = Path(opts.save_dir)
    if save_dir.resolve() == Path(opts.load_dir).resolve():
        raise ConversionError("--save-dir must differ from --load-dir")
    if opts.hf_cfg_dir is not None and not Path(opts.hf_cfg_dir).is_dir():
        raise ConversionError(f"--hf-cfg-dir {opts.hf_cfg_dir} is not a directory; point it at the original "
                              f"Hugging Face model directory (config.json and tokenizer files)")
    if opts.hf_cfg_dir is not None and _inside(save_dir, Path(opts.hf_cfg_dir)):
        # publishing replaces the index there, orphaning the original shards
        raise ConversionError(f"--save-dir {save_dir} is (or lies inside) --hf-cfg-dir "
                              f"{opts.hf_cfg_dir}; writing there would overwrite the original model: choose a new "
                              f"--save-dir")
    fam, cfg, tensors = iter_hf_tensors(Path(opts.load_dir), opts.model_type_hf, opts.hf_cfg_dir, opts, log)
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{save_dir.name}.tmp-", dir=save_dir.parent))
    try:
        writer = SafetensorsWriter(tmp, num_files=cfg.num_layers)
        for layer, layer_tensors in tensors:
            writer.write(layer + 1, layer_tensors)
            del layer_tensors
        if opts.hf_cfg_dir is not None:
            copy_hf_cfg(Path(opts.hf_cfg_dir), tmp)
        writer.finish()
        publish_dir(tmp, save_dir, last=INDEX_NAME)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"[mg2hf] wrote {save_dir} ({cfg.num_layers} safetensors files"
        f"{', config and tokenizer from ' + str(opts.hf_cfg_dir) if opts.hf_cfg_dir else ''})")
    return save_dir
