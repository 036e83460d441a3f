"""Hugging Face safetensors -> Megatron checkpoint (TP/PP/VPP shards), streaming tensor by tensor."""
from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from mindspeed_llm.checkpoint import layout
from mindspeed_llm.checkpoint.errors import ConversionError
from mindspeed_llm.checkpoint.hf_io import SafetensorsSource
from mindspeed_llm.checkpoint.mapping import chunk_state_dict
from mindspeed_llm.models.config import DTYPES, ModelConfig, read_hf_config
from mindspeed_llm.models.family import Family
from mindspeed_llm.models.placement import Placement, parse_noop_layers, place_layers, with_noop_layers
from mindspeed_llm.models.registry import get_family
from mindspeed_llm.models.resolve import model_args, resolve_model


@dataclass
class Hf2MgOptions:
    load_dir: Path
    save_dir: Path
    model_type_hf: Optional[str] = None
    tp: int = 1
    pp: int = 1
    ep: int = 1
    num_layer_list: Optional[list[int]] = None
    layers_per_vpp_stage: Optional[int] = None
    params_dtype: Optional[str] = None
    grouped_gemm: bool = False      # experts in megatron-core GroupedMLP's weight1 / weight2 (--moe-grouped-gemm)
    etp: Optional[int] = None       # expert-TP size: TP (default) or 1 (whole experts on every TP rank)
    noop_layers: Optional[str] = None       # MindSpeed's --noop-layers, e.g. "94,95" (global indices)

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp


def check_tensor_parallel(cfg: ModelConfig, tp: int, expert_tp: Optional[int] = None) -> None:
    """TP must split attention heads, KV groups, the MLP and the vocabulary into equal whole pieces."""
    if tp < 1:
        raise ConversionError(f"--target-tensor-parallel-size must be >= 1, got {tp}")
    expert_tp = tp if expert_tp is None else expert_tp
    checks = [("num_attention_heads", cfg.num_attention_heads), ("num_key_value_heads (KV groups)",
                                                                  cfg.num_query_groups)]
    if any(not cfg.is_moe_layer(i) for i in range(cfg.num_layers)):
        checks.append(("intermediate_size", cfg.ffn_hidden_size))
    if cfg.num_experts is not None and expert_tp > 1:       # experts split over TP too (expert-TP size = TP)
        checks.append(("moe_intermediate_size", cfg.moe_ffn_hidden_size))
    checks.append(("vocab_size", cfg.vocab_size))
    for name, value in checks:
        if value % tp:
            divisors = [d for d in range(1, value + 1) if value % d == 0 and cfg.num_query_groups % d == 0
                        and cfg.num_attention_heads % d == 0]
            raise ConversionError(f"--target-tensor-parallel-size {tp} does not divide {name}={value}; choose one "
                                  f"of {divisors[:8]}")


def check_expert_parallel(cfg: ModelConfig, ep: int, tp: int = 1, etp: Optional[int] = None) -> None:
    """EP ranks hold equal whole sets of experts; a dense model has none to spread; experts split over TP or not
    at all (MindSpeed's expert-TP values)."""
    if etp not in (None, tp, 1):
        raise ConversionError(f"--expert-tensor-parallel-size {etp}: only 1 (whole experts on every TP rank) or "
                              f"--target-tensor-parallel-size {tp} (the default) is implemented, as in MindSpeed")
    if etp not in (None, tp) and cfg.num_experts is None:
        raise ConversionError(f"--expert-tensor-parallel-size {etp}: {cfg.family} is a dense model (no experts)")
    if ep == 1:
        return
    if cfg.num_experts is None:
        raise ConversionError(f"--target-expert-parallel-size {ep}: {cfg.family} is a dense model (no experts); "
                              f"use 1")
    if cfg.num_experts % ep:
        divisors = [d for d in range(1, cfg.num_experts + 1) if cfg.num_experts % d == 0]
        raise ConversionError(f"--target-expert-parallel-size {ep} does not divide num_experts={cfg.num_experts}; "
                              f"choose one of {divisors[:8]}")


def checkpoint_args(hf_cfg: dict, fam: Family, cfg: ModelConfig, opts: Hf2MgOptions, placement: Placement,
                    iter_dir: Path) -> argparse.Namespace:
    """The `args` namespace stored in every rank file (MindSpeed v2 composition, with correct GQA fields)."""
    ns: dict = {k: v for k, v in hf_cfg.items() if isinstance(v, (int, float, str, bool, list))}
    ns.update(model_args(with_noop_layers(cfg, placement.noop)))      # num_layers counts the noop layers
    ns.update(
        num_key_value_heads=cfg.num_query_groups,
        group_query_attention=cfg.num_query_groups != cfg.num_attention_heads,
        vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_word_embeddings,
        rope_scaling_type="llama3" if cfg.rope_scaling_factor is not None else None,
        rope_scaling_factor=cfg.rope_scaling_factor, torch_dtype=cfg.torch_dtype,
        seq_length=4096, global_batch_size=64, add_position_embedding=True, use_rotary_position_embeddings=True,
        position_embedding_type="rope", add_bias_linear=False,
        gradient_accumulation_fusion=False, normalization="RMSNorm", swiglu=True,
        tokenizer_type="PretrainedFromHF", qkv_type="unpack", fc_type="gate_up_down",
        tensor_model_parallel_size=opts.tp, pipeline_model_parallel_size=opts.pp, expert_model_parallel_size=opts.ep,
        expert_tensor_parallel_size=opts.expert_tp,
        noop_layers=",".join(map(str, sorted(placement.noop))), moe_grouped_gemm=opts.grouped_gemm,
        moe_tp_extend_ep=False,
        mla_mm_split=False, mtp_num_layers=0, transformer_impl="local", model_type_hf=fam.name,
        load_model_type="hf", load_dir=str(opts.load_dir), save_dir=str(iter_dir), hf_path=str(opts.load_dir),
        save_layer_by_layer=False, params_dtype=opts.params_dtype or cfg.torch_dtype or "float32",
        iteration=1,
    )
    if opts.num_layer_list:
        ns["num_layer_list"] = ",".join(map(str, opts.num_layer_list))
    if opts.layers_per_vpp_stage:
        ns["num_layers_per_virtual_pipeline_stage"] = opts.layers_per_vpp_stage
        ns["vpp_size"] = placement.vpp
    return argparse.Namespace(**ns)


def convert_hf_to_mg(opts: Hf2MgOptions, log: Callable[[str], None] = print) -> Path:
    """Convert; returns the published iteration directory. Nothing looks complete until the end."""
    hf_cfg = read_hf_config(opts.load_dir)
    cfg = resolve_model(hf=hf_cfg, hf_source=str(Path(opts.load_dir) / "config.json"),
                        model_type_hf=opts.model_type_hf)
    fam = get_family(cfg.family)
    check_expert_parallel(cfg, opts.ep, opts.tp, opts.etp)
    check_tensor_parallel(cfg, opts.tp, opts.expert_tp)
    if opts.grouped_gemm and cfg.num_experts is None:
        raise ConversionError(f"--moe-grouped-gemm: {cfg.family} is a dense model (no experts to group); drop it")
    noop = parse_noop_layers(opts.noop_layers, real_layers=cfg.num_layers)
    placement = place_layers(cfg.num_layers + len(noop), opts.pp, opts.num_layer_list, opts.layers_per_vpp_stage,
                             noop)
    dtype = DTYPES[opts.params_dtype] if opts.params_dtype else None
    if dtype is not None and cfg.torch_dtype and DTYPES.get(cfg.torch_dtype) not in (None, dtype):
        log(f"[hf2mg] --params-dtype {opts.params_dtype}: casting weights from {cfg.torch_dtype}")
    save_dir = Path(opts.save_dir)
    if save_dir.resolve() == Path(opts.load_dir).resolve():
        raise ConversionError("--save-dir must differ from --load-dir")
    with SafetensorsSource(opts.load_dir) as src:
        _check_complete(fam, cfg, src)
        tmp = layout.new_iteration_dir(save_dir, 1)
        try:
            args = checkpoint_args(hf_cfg, fam, cfg, opts, placement, save_dir / layout.iter_dir_name(1))
            start = time.time()
            for p in range(opts.pp):
                for t, e in layout.rank_pairs(opts.tp, opts.ep, opts.expert_tp):
                    where = f"pp {p + 1}/{opts.pp} tp {t + 1}/{opts.tp}" + (f" ep {e + 1}/{opts.ep}"
                                                                           if opts.ep > 1 else "")
                    _write_rank(fam, cfg, src, placement, opts, p, t, e, dtype, args, tmp,
                                lambda layer, where=where: log(f"[hf2mg] {where}: layer {layer + 1}/"
                                                               f"{cfg.num_layers} ({time.time() - start:.1f}s)"))
            final = layout.publish_iteration(tmp, save_dir, 1)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log(f"[hf2mg] wrote {final} (TP {opts.tp}, PP {opts.pp}{f', EP {opts.ep}' if opts.ep > 1 else ''}"
        f"{f', expert TP {opts.expert_tp}' if opts.expert_tp != opts.tp else ''}"
        f"{f', VPP {placement.vpp}' if placement.vpp > 1 else ''}) in {time.time() - start:.1f}s")
    return final


def _write_rank(fam: Family, cfg: ModelConfig, src: SafetensorsSource, placement: Placement, opts: Hf2MgOptions,
                p: int, t: int, e: int, dtype: Optional[torch.dtype], args: argparse.Namespace, tmp: Path,
                progress: Callable[[int], None]) -> None:
    """Build, save and drop one (PP stage, TP rank, EP rank) file. Every kept tensor is a compact copy in anonymous
    memory and shards are unmapped after each layer, so memory is this rank's tensors plus the layer being split;
    the tensors die when this function returns, before the next rank is built."""
    def finish(x: torch.Tensor) -> torch.Tensor:
        if dtype is not None and x.is_floating_point() and x.dtype != dtype:
            x = x.to(dtype)
        return src.own(x)

    def on_layer(layer: int) -> None:
        src.release()
        progress(layer)

    models = {key: chunk_state_dict(fam, cfg, src, t, opts.tp, placement.hf_layers(p, v),
                                    first=placement.is_first(p, v), last=placement.is_last(p, v), ep_rank=e,
                                    ep=opts.ep, grouped=opts.grouped_gemm, expert_tp=opts.expert_tp,
                                    on_layer=on_layer, finish=finish)
              for v, key in enumerate(layout.model_keys(placement.vpp))}
    src.release()
    layout.save_rank_file(tmp, layout.rank_dir_name(t, p, opts.pp, e, opts.ep), layout.checkpoint_state(args, models))
    del models
    layout.release_freed_memory()


def _check_complete(fam: Family, cfg: ModelConfig, src: SafetensorsSource) -> None:
    """Every tensor the conversion will read exists (fail before writing anything)."""
    names = [fam.embedding.hf, fam.final_norm.hf] + [n for i in range(cfg.num_layers)
                                                     for n in fam.hf_layer_names(cfg, i)]
    if cfg.untie_embeddings_and_output_weights:
        names.append(fam.output.hf)
    missing = [n for n in names if n not in src]
    if missing:
        hint = (" (config.json says tie_word_embeddings=false; set it to true if the model ties its embeddings)"
                if missing == [fam.output.hf] else "")
        raise ConversionError(f"{src.dir}: tensor {missing[0]} is missing from the safetensors index"
                              f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}{hint}")
