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
from mindspeed_llm.checkpoint.load import expert_tensor_parallel_size
from mindspeed_llm.checkpoint.mapping import MissingKey, merge_adapter_layer, merge_embedding, merge_head, merge_layer
from mindspeed_llm.models import lora
from mindspeed_llm.models.config import ModelConfig, read_hf_config
from mindspeed_llm.models.family import Family
from mindspeed_llm.models.placement import (Placement, parse_layer_list, parse_noop_layers, place_layers,
                                            saved_without_noop, with_noop_layers)
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
    ep: Optional[int] = None
    grouped_gemm: Optional[bool] = None       # --moe-grouped-gemm: the experts must be in GroupedMLP's layout
    etp: Optional[int] = None
    num_layer_list: Optional[list[int]] = None
    layers_per_vpp_stage: Optional[int] = None
    noop_layers: Optional[str] = None       # --noop-layers: must match the checkpoint's when given
    # LoRA: adapters from --lora-load (or inside --load-dir: an unfiltered LoRA save), merged into the weights,
    # or with --save-lora-to-hf exported alone as a PEFT adapter directory.
    lora_load: Optional[Path] = None
    lora_r: Optional[int] = None
    lora_alpha: Optional[float] = None
    lora_target_modules: Optional[list[str]] = None
    save_lora_to_hf: bool = False
    lora_ignore_base_mismatch: bool = False   # merge onto a base other than the one the adapters trained on


def model_from_args(args: argparse.Namespace, model_type_hf: Optional[str] = None,
                    hf_cfg_dir: Optional[Path] = None, source: str = "checkpoint args") -> tuple[Family, ModelConfig]:
    """Family and ModelConfig of a Megatron checkpoint, from its saved args (`source`), which must agree with
    --hf-cfg-dir's config.json when given (`models.resolve.resolve_model`)."""
    args, _ = saved_without_noop(args)       # the HF model has only the real layers
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
        "--target-expert-parallel-size": (opts.ep, expert_parallel_size(args)),
        "--expert-tensor-parallel-size": (opts.etp, expert_tensor_parallel_size(args)),
        "--moe-grouped-gemm": (opts.grouped_gemm, grouped_experts(args)),
        "--num-layer-list": (opts.num_layer_list, parse_layer_list(getattr(args, "num_layer_list", None))),
        "--num-layers-per-virtual-pipeline-stage": (opts.layers_per_vpp_stage,
                                                    getattr(args, "num_layers_per_virtual_pipeline_stage", None)),
    }
    if opts.noop_layers is not None:
        saved["--noop-layers"] = tuple(",".join(map(str, sorted(noop))) or "(none)" for noop in (
            parse_noop_layers(opts.noop_layers, int(args.num_layers)), saved_without_noop(args)[1]))
    for flag, (given, stored) in saved.items():
        if given is not None and given != stored:
            if isinstance(given, bool):
                raise ConversionError(f"{flag}: the checkpoint holds its experts in the "
                                      f"{'GroupedMLP' if stored else 'SequentialMLP (local_experts)'} layout; drop "
                                      f"the flag (mg -> hf reads the layout from the checkpoint)")
            raise ConversionError(f"{flag} {given} disagrees with the checkpoint, which was saved with {stored}; "
                                  f"drop the flag (mg -> hf reads the layout from the checkpoint) or fix --load-dir")


def expert_parallel_size(args: argparse.Namespace) -> int:
    """EP of a checkpoint from its saved args (1 when not recorded: a dense or EP-1 save)."""
    return int(getattr(args, "expert_model_parallel_size", None) or 1)


def grouped_experts(args: argparse.Namespace) -> bool:
    """Whether a checkpoint holds its experts in megatron-core GroupedMLP's layout (saved with --moe-grouped-gemm)."""
    return bool(getattr(args, "moe_grouped_gemm", False))


def checkpoint_placement(args: argparse.Namespace, cfg: ModelConfig) -> Placement:
    """Where the saved args put `cfg`'s (real) layers, noop layers included."""
    noop = saved_without_noop(args)[1]
    return place_layers(cfg.num_layers + len(noop), int(args.pipeline_model_parallel_size),
                        parse_layer_list(getattr(args, "num_layer_list", None)),
                        getattr(args, "num_layers_per_virtual_pipeline_stage", None), noop)


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
    ep = expert_parallel_size(args)
    etp = expert_tensor_parallel_size(args)
    pairs = layout.rank_pairs(tp, ep, etp)
    grouped = grouped_experts(args)
    placement = checkpoint_placement(args, cfg)
    keys = layout.model_keys(placement.vpp)
    adapters = _adapter_source(opts, args, iter_dir, cfg, placement, ep) if opts is not None else None
    if adapters is not None and etp != tp:
        raise ConversionError(f"{iter_dir}: merging or exporting LoRA adapters of a checkpoint saved with "
                              f"--expert-tensor-parallel-size {etp} under TP {tp} is not implemented")
    if adapters is not None and opts.save_lora_to_hf and grouped:
        raise ConversionError(f"--save-lora-to-hf: {iter_dir} holds grouped experts (--moe-grouped-gemm), whose "
                              f"adapters have no PEFT form; merge them instead (drop --save-lora-to-hf)")
    if adapters is not None:      # what was resolved (flags, else the LoRA checkpoint's args) is what is written
        opts.lora_r, opts.lora_alpha = adapters.spec.r, adapters.spec.alpha
        if opts.save_lora_to_hf and cfg.num_experts is not None and {"linear_fc1", "linear_fc2"} & set(
                adapters.spec.targets):
            from mindspeed_llm.platform import notice

            notice("--save-lora-to-hf: expert adapters are written under MindSpeed's per-expert names "
                   "(mlp.experts.E.gate_proj/up_proj/down_proj); transformers 5 fuses Qwen3-MoE experts, so peft "
                   "loads only the attention adapters of this file: merge (drop --save-lora-to-hf) to keep them all")

    def generate():
        start = time.time()
        for p in range(pp):
            files = {(t, e): iter_dir / layout.rank_dir_name(t, p, pp, e, ep) for t, e in pairs}
            loaded = {pair: layout.load_rank_file(path / layout.FILE_NAME) for pair, path in files.items()}
            # The non-expert tensors of TP rank t come from its first file; the experts of EP rank e from its files
            # of every expert-TP rank (one file with whole experts under expert-TP 1).
            dense_pairs = [next(pair for pair in pairs if pair[0] == t) for t in range(tp)]
            expert_pairs = [[pair for pair in pairs if pair[1] == e][:etp] for e in range(ep)]
            # expert_states[e][t]: EP rank e's files (EP rank 0's hold every non-expert tensor), as the adapters'
            expert_states = [[loaded[pair] for pair in e_pairs] for e_pairs in expert_pairs]
            lora_states = adapters.stage(p, expert_states) if adapters is not None else None
            for v in range(placement.vpp):
                shards = [_model_entry(loaded[pair], keys[v], files[pair], placement.vpp) for pair in dense_pairs]
                expert_shards = [[_model_entry(loaded[pair], keys[v], files[pair], placement.vpp) for pair in e_pairs]
                                 for e_pairs in expert_pairs]
                if lora_states is not None:
                    lora_shards = [[_model_entry(state, keys[v], adapters.root / layout.rank_dir_name(t, p, pp, e, ep),
                                                 placement.vpp) for t, state in enumerate(tp_states)]
                                   for e, tp_states in enumerate(lora_states)]
                    if not opts.save_lora_to_hf:
                        expert_shards = [[adapters.merge(s, a, iter_dir / layout.rank_dir_name(t, p, pp, e, ep))
                                          for t, (s, a) in enumerate(zip(base_tp, lora_tp))]
                                         for e, (base_tp, lora_tp) in enumerate(zip(expert_shards, lora_shards))]
                    shards = expert_shards[0]       # the merged non-expert tensors
                try:
                    for local, layer in enumerate(placement.hf_layers(p, v)):
                        if layer is None:       # a noop layer: no weights, no HF layer
                            continue
                        if lora_states is not None and opts.save_lora_to_hf:
                            tensors = merge_adapter_layer(fam, cfg, lora_shards[0], local, layer, lora_shards)
                            log(f"[mg2hf] layer {layer + 1}/{cfg.num_layers} ({time.time() - start:.1f}s)")
                            yield layer, tensors
                            continue
                        tensors = merge_layer(fam, cfg, shards, local, layer, expert_shards, grouped)
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
            del loaded, expert_states, shards, expert_shards, lora_states
            layout.release_freed_memory()

    return fam, cfg, generate()


def _model_entry(state: dict, key: str, rank_dir: Path, vpp: int) -> dict:
    if key not in state:
        raise ConversionError(f"{rank_dir} has no {key!r} entry; its args say VPP size {vpp}")
    return state[key]


@dataclass
class _Adapters:
    """Where the LoRA tensors of each pipeline stage come from: --lora-load's rank files, or the base rank files
    themselves (an unfiltered LoRA save)."""
    spec: lora.LoraSpec
    root: Path
    iter_dir: Optional[Path]          # None: the adapters are in the --load-dir rank files
    tp: int
    pp: int
    to_save: set[str]                 # modules trained in full (`lora.saved_modules`), taken from the LoRA save
    ep: int = 1

    def stage(self, p: int, base_states: list[list[dict]]) -> list[list[dict]]:
        """The LoRA rank files of pipeline stage `p`, [EP rank][TP rank] as `base_states`."""
        if self.iter_dir is None:
            return base_states
        return [[layout.load_rank_file(self.iter_dir / layout.rank_dir_name(t, p, self.pp, e, self.ep) /
                                       layout.FILE_NAME) for t in range(self.tp)] for e in range(self.ep)]

    def merge(self, base: dict, adapters: dict, rank_dir: Path) -> dict:
        try:
            return lora.merge_adapters(base, adapters, self.spec.scale, self.to_save)
        except KeyError as exc:
            raise ConversionError(f"{rank_dir}: tensor {exc.args[0]} is missing; the adapters of {self.root} do "
                                  f"not fit this model") from None
        except ValueError as exc:
            raise ConversionError(f"{rank_dir}: {exc}; the adapters of {self.root} do not fit this model") from None


def _adapter_source(opts: Mg2HfOptions, args: argparse.Namespace, iter_dir: Path, cfg: ModelConfig,
                    placement: Placement, ep: int = 1) -> Optional[_Adapters]:
    """The adapters to merge or export (None for a plain conversion). With --lora-load its layout and model must
    be the base's, and the base the one the adapters were trained on (by its fingerprint)."""
    from mindspeed_llm.checkpoint.load import check_args, check_lora_base
    from mindspeed_llm.models.resolve import weight_args
    from mindspeed_llm.platform import notice

    tp, pp = int(args.tensor_model_parallel_size), int(args.pipeline_model_parallel_size)
    flags = argparse.Namespace(lora_target_modules=opts.lora_target_modules, lora_r=opts.lora_r,
                               lora_alpha=opts.lora_alpha)
    first = layout.load_rank_file(iter_dir / layout.rank_dir_name(0, 0, pp, 0, ep) / layout.FILE_NAME)
    first = next((v for k, v in first.items() if k.startswith("model") and isinstance(v, dict)), {})
    if lora.has_adapters(first) and not lora.holds_base(first):
        raise ConversionError(f"--load-dir {opts.load_dir} holds LoRA adapters only (saved with --lora-ckpt-filter): "
                              f"pass the base model's checkpoint as --load-dir and this one as --lora-load")
    if opts.lora_load is None:
        if not lora.has_adapters(first):
            if opts.save_lora_to_hf or opts.lora_target_modules:
                raise ConversionError("--save-lora-to-hf/--lora-target-modules: no adapters to export; pass the LoRA "
                                      "checkpoint with --lora-load")
            return None
        del first
        spec = lora.spec_from_args(flags, args, f"--load-dir {opts.load_dir}")
        to_save = lora.saved_modules(getattr(args, "lora_modules_to_save", None), cfg.tie_word_embeddings)
        return _Adapters(spec, Path(opts.load_dir), None, tp, pp, to_save, ep)
    lora_iter = layout.iteration_dir(Path(opts.lora_load))
    lora_args = layout.read_args(lora_iter)
    source = f"--lora-load {opts.lora_load}"
    for name, flag in (("tensor_model_parallel_size", "TP"), ("pipeline_model_parallel_size", "PP"),
                       ("expert_model_parallel_size", "EP"),
                       ("num_layers_per_virtual_pipeline_stage", "VPP layers"), ("num_layer_list", "layer list")):
        ours, theirs = getattr(args, name, None), getattr(lora_args, name, None)
        if name == "expert_model_parallel_size":
            ours, theirs = ep, expert_parallel_size(lora_args)
        if ours != theirs and (ours or theirs):
            raise ConversionError(f"{source} was saved with {flag} {theirs} but --load-dir {opts.load_dir} with "
                                  f"{ours}; the adapters must come from a run on that layout")
    base = f"--load-dir {opts.load_dir}"
    check_args(lora_args, weight_args(with_noop_layers(cfg, placement.noop)), source, adapters_for=base)
    check_lora_base(lora_args, _files_fingerprint(iter_dir, cfg, placement, tp, ep), base, str(opts.lora_load),
                    opts.lora_ignore_base_mismatch, notice)
    if opts.save_lora_to_hf and getattr(lora_args, "lora_modules_to_save", None):
        raise ConversionError(f"--save-lora-to-hf: {source} also trained --lora-modules-to-save "
                              f"{' '.join(lora_args.lora_modules_to_save)} in full; a PEFT adapter holds adapters "
                              f"only, so merge instead (drop --save-lora-to-hf)")
    spec = lora.spec_from_args(flags, lora_args, source)
    if spec is None:
        raise ConversionError(f"{source}: its args name no LoRA target modules; pass --lora-target-modules")
    to_save = lora.saved_modules(getattr(lora_args, "lora_modules_to_save", None), cfg.tie_word_embeddings)
    return _Adapters(spec, Path(opts.lora_load), lora_iter, tp, pp, to_save, ep)


def _files_fingerprint(iter_dir: Path, cfg: ModelConfig, placement: Placement, tp: int, ep: int = 1) -> str:
    """The base fingerprint (`models.lora.fingerprint_share`) of the checkpoint in `iter_dir`: only the rank files
    of EP rank 0 (the fingerprint leaves routed experts out) of the stages that hold its first or last decoder
    layer are read."""
    keys = layout.model_keys(placement.vpp)
    ends = {0, cfg.num_layers - 1}
    total = 0
    for p in range(placement.pp):
        if not ends & {layer for chunk in placement.layers[p] for layer in chunk}:
            continue
        for t in range(tp):
            state = layout.load_rank_file(iter_dir / layout.rank_dir_name(t, p, placement.pp, 0, ep) /
                                          layout.FILE_NAME)
            total += lora.fingerprint_share([(state[keys[v]], layers) for v, layers in enumerate(placement.layers[p])
                                             if keys[v] in state], cfg.num_layers)
            del state
    return lora.fingerprint_text(total)


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
    if opts.save_lora_to_hf:
        try:
            write_peft_adapter(tmp, tensors, opts)
            publish_dir(tmp, save_dir, last=PEFT_CONFIG)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(f"[mg2hf] wrote the PEFT adapter {save_dir / PEFT_WEIGHTS} and {PEFT_CONFIG}")
        return save_dir
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


PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def write_peft_adapter(out_dir: Path, layers: Iterator[tuple[int, dict[str, torch.Tensor]]],
                       opts: Mg2HfOptions) -> None:
    """--save-lora-to-hf: every layer's adapters as one PEFT LoRA adapter (`peft.PeftModel.from_pretrained` on the
    HF base model loads it)."""
    import json

    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for _, layer_tensors in layers:
        tensors.update({k: v.clone() for k, v in layer_tensors.items()})   # the shared factor: one copy each
    if not tensors:
        raise ConversionError("--save-lora-to-hf: the LoRA checkpoint holds no adapters")
    modules = sorted({k.split(".")[-3] for k in tensors})
    save_file(tensors, str(out_dir / PEFT_WEIGHTS), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": opts.lora_r, "lora_alpha": opts.lora_alpha,
              "target_modules": modules, "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
              "base_model_name_or_path": str(opts.hf_cfg_dir) if opts.hf_cfg_dir else None}
    (out_dir / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
