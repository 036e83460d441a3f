"""Apply a family table: HF tensors -> one (TP rank, PP stage, VPP chunk) state dict, and back."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from mindspeed_llm.models.config import ModelConfig
from mindspeed_llm.models.family import HF_LAYER_PREFIX, MG_LAYER_PREFIX, Family, TensorSource

Tensor = torch.Tensor


def chunk_state_dict(fam: Family, cfg: ModelConfig, src: TensorSource, tp_rank: int, tp: int,
                     layers: Sequence[Optional[int]], *, first: bool, last: bool, ep_rank: int = 0, ep: int = 1,
                     grouped: bool = False, expert_tp: Optional[int] = None,
                     on_layer: Optional[Callable[[int], None]] = None,
                     finish: Optional[Callable[[Tensor], Tensor]] = None) -> dict[str, Tensor]:
    """megatron-core state dict of one model chunk on one (TP rank, EP rank); `layers` are its global layer
    indices (None: a weightless noop layer, whose local index stays unused). Every EP rank holds all non-expert
    tensors and its own experts (with `grouped`, in GroupedMLP's weight1 / weight2), split over `expert_tp` ranks
    (default TP; 1: whole experts on every TP rank).

    `finish` is applied to each tensor as soon as it is cut (cast, copy out of a mapped shard), so a chunk never
    holds more than its own tensors plus the one being split.
    """
    sd: dict[str, Tensor] = {}
    done = finish or (lambda t: t)
    if first:
        sd[fam.embedding.mg] = done(fam.embedding.shard(src, tp_rank, tp, cfg))
    expert_tp = tp if expert_tp is None else expert_tp
    expert_tp_rank = tp_rank if expert_tp == tp else 0
    for local, layer in enumerate(layers):
        if layer is None:
            continue
        mg_prefix, hf_prefix = MG_LAYER_PREFIX.format(local), HF_LAYER_PREFIX.format(layer)
        for rule in fam.layer_rules(cfg, layer):
            sd[mg_prefix + rule.mg] = done(rule.shard(src, tp_rank, tp, cfg, prefix=hf_prefix))
        for rule in fam.expert_rules(cfg, layer, ep_rank, ep, grouped):
            sd[mg_prefix + rule.mg] = done(rule.shard(src, expert_tp_rank, expert_tp, cfg, prefix=hf_prefix))
        if on_layer is not None:
            on_layer(layer)
    if last:
        sd[fam.final_norm.mg] = done(fam.final_norm.shard(src, tp_rank, tp, cfg))
        if cfg.untie_embeddings_and_output_weights:
            sd[fam.output.mg] = done(fam.output.shard(src, tp_rank, tp, cfg))
        elif not first:
            # Tied embeddings with the output layer on another stage: megatron allocates `output_layer.weight`
            # there and keeps it equal to the embedding (first-stage / last-stage gradient all-reduce).
            sd[fam.output.mg] = done(fam.embedding.shard(src, tp_rank, tp, cfg))
    return sd


def merge_layer(fam: Family, cfg: ModelConfig, shards: Sequence[dict[str, Tensor]], local: int,
                layer: int, expert_shards: Sequence[Sequence[dict[str, Tensor]]] = (),
                grouped: bool = False) -> dict[str, Tensor]:
    """HF tensors of global layer `layer`, from the TP-rank state dicts where it has local index `local`.
    `expert_shards[e]` are the TP-rank state dicts of EP rank e (default: `shards` alone, EP 1); the tensors
    every EP rank holds are read from `shards`. `grouped`: the experts are in GroupedMLP's layout."""
    mg_prefix, hf_prefix = MG_LAYER_PREFIX.format(local), HF_LAYER_PREFIX.format(layer)
    by_ep = list(expert_shards) or [shards]

    def merged(rule, tp_shards) -> dict[str, Tensor]:
        return rule.merge([sd[_need(sd, mg_prefix + rule.mg)] for sd in tp_shards], cfg, prefix=hf_prefix)

    out: dict[str, Tensor] = {}
    for rule in fam.layer_rules(cfg, layer):
        out.update(merged(rule, shards))
    for ep_rank, tp_shards in enumerate(by_ep):
        for rule in fam.expert_rules(cfg, layer, ep_rank, len(by_ep), grouped):
            out.update(merged(rule, tp_shards))
    return out


def merge_embedding(fam: Family, cfg: ModelConfig, shards: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    return fam.embedding.merge([sd[_need(sd, fam.embedding.mg)] for sd in shards], cfg)


def merge_head(fam: Family, cfg: ModelConfig, shards: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Final norm and (untied only) lm_head from the last chunk's TP-rank state dicts."""
    out = fam.final_norm.merge([sd[_need(sd, fam.final_norm.mg)] for sd in shards], cfg)
    if cfg.untie_embeddings_and_output_weights:
        out.update(fam.output.merge([sd[_need(sd, fam.output.mg)] for sd in shards], cfg))
    return out


def merge_adapter_layer(fam: Family, cfg: ModelConfig, shards: Sequence[dict[str, Tensor]], local: int,
                        layer: int, expert_shards: Sequence[Sequence[dict[str, Tensor]]] = ()) -> dict[str, Tensor]:
    """PEFT tensors (`base_model.model.<hf module>.lora_{A,B}.weight`) of global layer `layer`'s adapters, from the
    TP-rank LoRA state dicts (`expert_shards[e]`: those of EP rank e, for the routed experts; as in `merge_layer`).
    The TP-split factor (B of a column-parallel layer, A of a row-parallel one) is joined by the layer's own rule
    (so QKV groups and [gate; up] halves come apart as the weight's do); the other factor is the same on every
    rank and is shared by every HF module the rule yields (an expert's fc1 A goes to its gate_proj and up_proj)."""
    from mindspeed_llm.models.lora import A_SUFFIX, B_SUFFIX

    mg_prefix, hf_prefix = MG_LAYER_PREFIX.format(local), HF_LAYER_PREFIX.format(layer)
    by_ep = list(expert_shards) or [shards]
    out: dict[str, Tensor] = {}

    def adapters(rule, tp_shards) -> None:
        module = mg_prefix + rule.mg[:-len(".weight")]
        if not rule.mg.endswith(".weight") or module + A_SUFFIX not in tp_shards[0]:
            return
        a = [sd[_need(sd, module + A_SUFFIX)] for sd in tp_shards]
        b = [sd[_need(sd, module + B_SUFFIX)] for sd in tp_shards]
        row_parallel = getattr(rule, "dim", 0) == 1
        split, whole = (a, b[0]) if row_parallel else (b, a[0])
        for hf_name, joined in rule.merge(split, cfg, prefix=hf_prefix).items():
            peft = "base_model.model." + hf_name[:-len(".weight")]
            out[peft + ".lora_A.weight"] = joined if row_parallel else whole
            out[peft + ".lora_B.weight"] = whole if row_parallel else joined

    for rule in fam.layer_rules(cfg, layer):
        adapters(rule, shards)
    for ep_rank, tp_shards in enumerate(by_ep):
        for rule in fam.expert_rules(cfg, layer, ep_rank, len(by_ep)):
            adapters(rule, tp_shards)
    return out


class MissingKey(KeyError):
    pass


def _need(sd: dict, key: str) -> str:
    if key not in sd:
        raise MissingKey(key)
    return key
