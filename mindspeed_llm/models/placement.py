"""Which decoder layers live on which pipeline stage and virtual chunk (megatron-core's offsets)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional

from mindspeed_llm.errors import UserError

if TYPE_CHECKING:
    from mindspeed_llm.models.config import ModelConfig


class PlacementError(UserError):
    """A pipeline split that cannot hold the model; the message names the flag and the fix."""


@dataclass(frozen=True)
class Placement:
    """`layers[p][v]` = global layer indices of virtual chunk v on pipeline stage p (local index = position)."""

    layers: tuple[tuple[tuple[int, ...], ...], ...]
    noop: frozenset[int] = frozenset()      # MindSpeed's --noop-layers: weightless identity layers

    def hf_layer(self, layer: int) -> Optional[int]:
        """The HF layer index of global layer `layer` (the noop layers below it skipped); None for a noop layer."""
        if layer in self.noop:
            return None
        return layer - sum(1 for n in self.noop if n < layer)

    def hf_layers(self, p: int, v: int) -> tuple[Optional[int], ...]:
        """Chunk v of stage p by local index: the HF layer each position holds, None where a noop layer sits
        (the local numbering keeps the gap, as MindSpeed's)."""
        return tuple(self.hf_layer(layer) for layer in self.layers[p][v])

    @property
    def pp(self) -> int:
        return len(self.layers)

    @property
    def vpp(self) -> int:
        return len(self.layers[0])

    def chunks(self):
        """(pp_rank, vp_stage, global layer ids) in execution order: chunk c = v * PP + p."""
        for v in range(self.vpp):
            for p in range(self.pp):
                yield p, v, self.layers[p][v]

    def is_first(self, p: int, v: int) -> bool:
        return p == 0 and v == 0

    def is_last(self, p: int, v: int) -> bool:
        return p == self.pp - 1 and v == self.vpp - 1


def parse_layer_list(text: Optional[str | list[int]]) -> Optional[list[int]]:
    if text is None or text == "":
        return None
    if isinstance(text, list):
        return [int(x) for x in text]
    try:
        return [int(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        raise PlacementError(f"--num-layer-list {text!r} must be comma-separated integers such as 7,21") from None


def parse_noop_layers(text: Optional[str], num_layers: Optional[int] = None, *,
                      real_layers: Optional[int] = None) -> frozenset[int]:
    """`--noop-layers 94,95`: distinct global layer indices below `num_layers` (which counts them), or with
    `real_layers` (an HF model's layer count) below real_layers + their number."""
    if text is None or str(text).strip() == "":
        return frozenset()
    try:
        noop = [int(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        raise PlacementError(f"--noop-layers {text!r} must be comma-separated layer indices such as 94,95") from None
    if num_layers is None:
        num_layers = int(real_layers or 0) + len(noop)
    bad = [i for i in noop if not 0 <= i < num_layers]
    if bad or len(set(noop)) != len(noop) or len(noop) >= num_layers:
        raise PlacementError(f"--noop-layers {text}: indices must be distinct, within 0..{num_layers - 1} "
                             f"(--num-layers {num_layers} counts the noop layers) and leave at least one real layer")
    return frozenset(noop)


def with_noop_layers(cfg: "ModelConfig", noop: frozenset[int]) -> "ModelConfig":
    """`cfg` (the HF model's layers) renumbered with the noop layers inserted at their global indices: what
    megatron builds and checkpoints record (num_layers counts the noop layers)."""
    if not noop:
        return cfg
    real = [i for i in range(cfg.num_layers + len(noop)) if i not in noop]
    return replace(cfg, num_layers=len(real) + len(noop), dense_layers=tuple(real[i] for i in cfg.dense_layers),
                   noop_layers=tuple(sorted(noop)))


def saved_without_noop(saved: argparse.Namespace) -> tuple[argparse.Namespace, frozenset[int]]:
    """A checkpoint's saved args described in HF layers (the noop layers recorded in `noop_layers` removed from
    num_layers and a per-layer moe_layer_freq), and those noop layer indices."""
    num_layers = getattr(saved, "num_layers", None)
    if num_layers is None:
        return saved, frozenset()
    noop = parse_noop_layers(getattr(saved, "noop_layers", None), int(num_layers))
    if not noop:
        return saved, noop
    fields = {**vars(saved), "num_layers": int(num_layers) - len(noop)}
    freq = getattr(saved, "moe_layer_freq", None)
    if isinstance(freq, (list, tuple)):
        fields["moe_layer_freq"] = [f for i, f in enumerate(freq) if i not in noop]
    return argparse.Namespace(**fields), noop


def place_layers(num_layers: int, pp: int = 1, num_layer_list: Optional[list[int]] = None,
                 layers_per_vpp_stage: Optional[int] = None, noop: frozenset[int] = frozenset()) -> Placement:
    """Split `num_layers` (noop layers included) over `pp` stages (evenly, by `--num-layer-list`, or interleaved
    in VPP chunks)."""
    placement = _place(num_layers, pp, num_layer_list, layers_per_vpp_stage)
    if not noop:
        return placement
    if num_layer_list:
        raise PlacementError("--num-layer-list cannot be combined with --noop-layers (as in MindSpeed); drop one")
    return replace(placement, noop=frozenset(noop))


def _place(num_layers: int, pp: int, num_layer_list: Optional[list[int]],
           layers_per_vpp_stage: Optional[int]) -> Placement:
    if pp < 1:
        raise PlacementError(f"pipeline parallel size must be >= 1, got {pp}")
    if num_layer_list:
        if layers_per_vpp_stage:
            raise PlacementError("--num-layer-list cannot be combined with --num-layers-per-virtual-pipeline-stage; "
                                 "drop one of them")
        if len(num_layer_list) != pp or sum(num_layer_list) != num_layers or min(num_layer_list) < 1:
            raise PlacementError(
                f"--num-layer-list {','.join(map(str, num_layer_list))} must have {pp} positive entries (one per "
                f"pipeline stage) summing to the model's {num_layers} layers")
        starts = [sum(num_layer_list[:p]) for p in range(pp)]
        return Placement(tuple((tuple(range(s, s + n)),) for s, n in zip(starts, num_layer_list)))
    if num_layers % pp:
        raise PlacementError(f"{num_layers} layers cannot be split evenly over pipeline parallel size {pp}; "
                             f"choose a PP size dividing {num_layers} or pass --num-layer-list")
    per_stage = num_layers // pp
    if not layers_per_vpp_stage:
        return Placement(tuple((tuple(range(p * per_stage, (p + 1) * per_stage)),) for p in range(pp)))
    lv = layers_per_vpp_stage
    if lv < 1 or per_stage % lv or lv >= per_stage:
        raise PlacementError(
            f"--num-layers-per-virtual-pipeline-stage {lv} must divide the {per_stage} layers per pipeline stage "
            f"and be smaller than it (otherwise layers would be dropped or there is nothing to interleave); "
            f"choose a proper divisor of {per_stage}")
    vpp = per_stage // lv
    return Placement(tuple(tuple(tuple(range((v * pp + p) * lv, (v * pp + p + 1) * lv)) for v in range(vpp))
                           for p in range(pp)))
