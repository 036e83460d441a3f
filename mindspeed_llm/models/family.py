"""The declarative model-family table: HF tensor name <-> megatron-core name, and how each splits over TP.

A `Family` lists one rule per tensor. Each rule knows how to cut the HF tensor(s) into the shard of one tensor-
parallel rank (`shard`) and how to put the shards of all ranks back together (`merge`). Conversion, model loading
and export all read these tables, so a QKV or gate/up layout is written once, here.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Protocol, Sequence, Union

import torch

from mindspeed_llm.models.config import ModelConfig, model_config_from_hf

Tensor = torch.Tensor


class TensorSource(Protocol):
    """Where rules read HF tensors from (a safetensors directory, or an in-memory dict)."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> Tensor: ...

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> Tensor: ...


class DictSource:
    """A `TensorSource` over a plain {name: tensor} dict."""

    def __init__(self, tensors: dict[str, Tensor]):
        self.tensors = tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def get(self, name: str) -> Tensor:
        return self.tensors[name]

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> Tensor:
        return self.tensors[name].narrow(dim, start, stop - start)


def _chunk_bounds(size: int, rank: int, tp: int, what: str) -> tuple[int, int]:
    if size % tp:
        raise ValueError(f"{what}: size {size} is not divisible by tensor parallel size {tp}")
    step = size // tp
    return rank * step, (rank + 1) * step


@dataclass(frozen=True)
class Replicated:
    """Same tensor on every TP rank (norms, q/k norms)."""

    mg: str
    hf: str

    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,)

    def shard(self, src: TensorSource, rank: int, tp: int, cfg: ModelConfig, prefix: str = "") -> Tensor:
        return src.get(prefix + self.hf)

    def merge(self, shards: Sequence[Tensor], cfg: ModelConfig, prefix: str = "") -> dict[str, Tensor]:
        return {prefix + self.hf: shards[0]}


@dataclass(frozen=True)
class ColumnSplit:
    """Contiguous equal chunks of dim 0 (column-parallel linear, vocab-parallel embedding / output layer)."""

    mg: str
    hf: str
    dim: int = 0

    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,)

    def shard(self, src: TensorSource, rank: int, tp: int, cfg: ModelConfig, prefix: str = "") -> Tensor:
        name = prefix + self.hf
        start, stop = _chunk_bounds(src.shape(name)[self.dim], rank, tp, name)
        return src.get_slice(name, self.dim, start, stop)

    def merge(self, shards: Sequence[Tensor], cfg: ModelConfig, prefix: str = "") -> dict[str, Tensor]:
        return {prefix + self.hf: torch.cat(list(shards), dim=self.dim)}


def RowSplit(mg: str, hf: str) -> ColumnSplit:
    """Contiguous equal chunks of dim 1 (row-parallel linear: attention output and MLP down projections)."""
    return ColumnSplit(mg, hf, dim=1)


@dataclass(frozen=True)
class FusedQKV:
    """q/k/v projections (weights or biases) fused per KV group: for each group g, [q heads of g; k_g; v_g].

    The fused tensor is split over TP as contiguous equal row chunks, which is exactly megatron-core's
    column-parallel partition of `linear_qkv`.
    """

    mg: str
    q: str
    k: str
    v: str

    def hf_names(self) -> tuple[str, ...]:
        return (self.q, self.k, self.v)

    @staticmethod
    def _group_shape(cfg: ModelConfig) -> tuple[int, int, int]:
        return cfg.num_query_groups, cfg.num_attention_heads // cfg.num_query_groups, cfg.kv_channels

    def fuse(self, q: Tensor, k: Tensor, v: Tensor, cfg: ModelConfig) -> Tensor:
        ng, r, d = self._group_shape(cfg)
        rest = q.shape[1:]
        fused = torch.cat([q.reshape(ng, r * d, *rest), k.reshape(ng, d, *rest), v.reshape(ng, d, *rest)], dim=1)
        return fused.reshape(ng * (r + 2) * d, *rest)

    def shard(self, src: TensorSource, rank: int, tp: int, cfg: ModelConfig, prefix: str = "") -> Tensor:
        ng, r, d = self._group_shape(cfg)
        if tp <= ng and ng % tp == 0:
            # Rank `rank` holds whole KV groups g0..g1: read only those rows of q, k and v.
            g0, g1 = rank * ng // tp, (rank + 1) * ng // tp
            part = ModelConfig(**{**cfg.to_dict(), "num_query_groups": g1 - g0,
                                  "num_attention_heads": (g1 - g0) * r})
            return self.fuse(src.get_slice(prefix + self.q, 0, g0 * r * d, g1 * r * d),
                             src.get_slice(prefix + self.k, 0, g0 * d, g1 * d),
                             src.get_slice(prefix + self.v, 0, g0 * d, g1 * d), part)
        fused = self.fuse(src.get(prefix + self.q), src.get(prefix + self.k), src.get(prefix + self.v), cfg)
        start, stop = _chunk_bounds(fused.shape[0], rank, tp, prefix + self.mg)
        return fused[start:stop]

    def merge(self, shards: Sequence[Tensor], cfg: ModelConfig, prefix: str = "") -> dict[str, Tensor]:
        ng, r, d = self._group_shape(cfg)
        fused = torch.cat(list(shards), dim=0)
        rest = fused.shape[1:]
        grouped = fused.reshape(ng, (r + 2) * d, *rest)
        q, k, v = grouped.split([r * d, d, d], dim=1)
        return {prefix + self.q: q.reshape(ng * r * d, *rest), prefix + self.k: k.reshape(ng * d, *rest),
                prefix + self.v: v.reshape(ng * d, *rest)}


@dataclass(frozen=True)
class GatedMLP:
    """SwiGLU gate/up projections: TP rank t holds [gate rows of chunk t ; up rows of chunk t]."""

    mg: str
    gate: str
    up: str

    def hf_names(self) -> tuple[str, ...]:
        return (self.gate, self.up)

    def shard(self, src: TensorSource, rank: int, tp: int, cfg: ModelConfig, prefix: str = "") -> Tensor:
        start, stop = _chunk_bounds(src.shape(prefix + self.gate)[0], rank, tp, prefix + self.gate)
        return torch.cat([src.get_slice(prefix + self.gate, 0, start, stop),
                          src.get_slice(prefix + self.up, 0, start, stop)], dim=0)

    def merge(self, shards: Sequence[Tensor], cfg: ModelConfig, prefix: str = "") -> dict[str, Tensor]:
        halves = [s.chunk(2, dim=0) for s in shards]
        return {prefix + self.gate: torch.cat([h[0] for h in halves], dim=0),
                prefix + self.up: torch.cat([h[1] for h in halves], dim=0)}


Rule = Union[Replicated, ColumnSplit, FusedQKV, GatedMLP, "Grouped"]


@dataclass(frozen=True)
class PerExpert:
    """`rule` once per routed expert. Its names hold `{expert}` (the HF expert index e) and `{local}` (the index j
    of that expert among the megatron-core SequentialMLP `local_experts` of its expert-parallel rank): expert e
    lives on EP rank e // E_loc as local expert e % E_loc, E_loc = num_experts / EP (MindSpeed's layout). Each
    expert is split over TP as `rule` says, as megatron-core splits a local expert over the expert-TP group."""

    rule: Rule

    def expand(self, cfg: ModelConfig, ep_rank: int, ep: int) -> list[Rule]:
        """The concrete rules of the experts on EP rank `ep_rank` of `ep`."""
        local = cfg.num_experts // ep
        return [replace(self.rule, **{f.name: getattr(self.rule, f.name).format(expert=ep_rank * local + j, local=j)
                                      for f in fields(self.rule) if isinstance(getattr(self.rule, f.name), str)})
                for j in range(local)]


def group_experts(blocks: Sequence[Tensor], hidden_first: bool) -> Tensor:
    """megatron-core GroupedMLP's (and MindSpeed's) layout of the local experts' TP shards `blocks` (each as
    SequentialMLP holds it: fc1 [2F/T, H], fc2 [H, F/T]): each transposed, stacked, and the memory viewed as 2-D,
    [H, E_loc*2F/T] for weight1 (`hidden_first`), [E_loc*F/T, H] for weight2. A raw view, not a concatenation."""
    stacked = torch.stack([b.t() for b in blocks])
    return stacked.reshape(stacked.shape[1], -1) if hidden_first else stacked.reshape(-1, stacked.shape[2])


def ungroup_experts(grouped: Tensor, num_local: int, hidden_size: int, hidden_first: bool) -> list[Tensor]:
    """The inverse of `group_experts`, as GroupedMLP's forward views its weights:
    `local_experts.j.linear_fc1.weight == weight1.view(E_loc, H, -1)[j].T` (weight2: `.view(E_loc, -1, H)`)."""
    blocks = grouped.reshape(num_local, hidden_size, -1) if hidden_first else \
        grouped.reshape(num_local, -1, hidden_size)
    return [b.t() for b in blocks.unbind(0)]


@dataclass(frozen=True)
class Grouped:
    """All routed experts of one EP rank in one tensor (megatron-core GroupedMLP, `--moe-grouped-gemm`): the
    TP shards of `experts`' rules (one per local expert, as `PerExpert.expand` gives them), joined by
    `group_experts`."""

    mg: str
    experts: tuple[Rule, ...]
    hidden_first: bool

    def hf_names(self) -> tuple[str, ...]:
        return tuple(n for r in self.experts for n in r.hf_names())

    def shard(self, src: TensorSource, rank: int, tp: int, cfg: ModelConfig, prefix: str = "") -> Tensor:
        return group_experts([r.shard(src, rank, tp, cfg, prefix) for r in self.experts], self.hidden_first)

    def merge(self, shards: Sequence[Tensor], cfg: ModelConfig, prefix: str = "") -> dict[str, Tensor]:
        per_rank = [ungroup_experts(s, len(self.experts), cfg.hidden_size, self.hidden_first) for s in shards]
        out: dict[str, Tensor] = {}
        for j, rule in enumerate(self.experts):
            out.update(rule.merge([blocks[j] for blocks in per_rank], cfg, prefix))
        return out


@dataclass(frozen=True)
class GroupedExperts:
    """`per_expert`'s experts of each EP rank as one `Grouped` tensor named `mg`; `hidden_first` as in
    `group_experts` (True for fc1 -> weight1, False for fc2 -> weight2)."""

    mg: str
    per_expert: PerExpert
    hidden_first: bool

    def expand(self, cfg: ModelConfig, ep_rank: int, ep: int) -> list[Rule]:
        return [Grouped(self.mg, tuple(self.per_expert.expand(cfg, ep_rank, ep)), self.hidden_first)]


MG_LAYER_PREFIX = "decoder.layers.{}."
HF_LAYER_PREFIX = "model.layers.{}."
# megatron-core names of a dense MLP's weights: a MoE layer has the family's `moe_mlp` in their place.
DENSE_MLP_PREFIX = "mlp.linear_fc"


@dataclass(frozen=True)
class Family:
    """A model family: which HF architectures it reads, its per-layer tensor table and its global tensors."""

    name: str
    architectures: tuple[str, ...]
    aliases: tuple[str, ...]
    layer: tuple[Rule, ...]
    qk_layernorm: bool = False
    add_qkv_bias: bool = False
    embedding: Rule = ColumnSplit("embedding.word_embeddings.weight", "model.embed_tokens.weight")
    final_norm: Rule = Replicated("decoder.final_layernorm.weight", "model.norm.weight")
    output: Rule = ColumnSplit("output_layer.weight", "lm_head.weight")
    # A mixture-of-experts family: the router and `PerExpert` rules that replace the dense MLP in MoE layers,
    # and the experts in megatron-core's GroupedMLP layout (`--moe-grouped-gemm`) in place of the `PerExpert` ones.
    moe_mlp: tuple[Union[Rule, PerExpert], ...] = ()
    grouped_experts: tuple[GroupedExperts, ...] = ()

    def config(self, hf_config: dict) -> ModelConfig:
        """HF config.json (as a dict) -> ModelConfig."""
        return model_config_from_hf(hf_config, self.name, qk_layernorm=self.qk_layernorm,
                                    add_qkv_bias=self.add_qkv_bias, moe=bool(self.moe_mlp))

    def layer_rules(self, cfg: ModelConfig, layer: int) -> tuple[Rule, ...]:
        """Rules of global layer `layer` whose tensors every expert-parallel rank holds (all of a dense layer)."""
        if not cfg.is_moe_layer(layer):
            return self.layer
        return (tuple(r for r in self.layer if not r.mg.startswith(DENSE_MLP_PREFIX))
                + tuple(r for r in self.moe_mlp if not isinstance(r, PerExpert)))

    def expert_rules(self, cfg: ModelConfig, layer: int, ep_rank: int = 0, ep: int = 1,
                     grouped: bool = False) -> list[Rule]:
        """Rules of the routed experts of layer `layer` that EP rank `ep_rank` of `ep` holds (none: dense layer):
        one per local expert and weight, or with `grouped` one per weight (GroupedMLP's weight1 / weight2)."""
        if not cfg.is_moe_layer(layer):
            return []
        table = self.grouped_experts if grouped else [r for r in self.moe_mlp if isinstance(r, PerExpert)]
        return [x for r in table for x in r.expand(cfg, ep_rank, ep)]

    def hf_layer_names(self, cfg: ModelConfig, layer: int) -> list[str]:
        """Every HF tensor name of global layer `layer`."""
        prefix = HF_LAYER_PREFIX.format(layer)
        rules = [*self.layer_rules(cfg, layer), *self.expert_rules(cfg, layer)]
        return [prefix + n for rule in rules for n in rule.hf_names()]
