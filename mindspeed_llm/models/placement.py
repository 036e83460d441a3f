"""Which decoder layers live on which pipeline stage and virtual chunk (megatron-core's offsets)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mindspeed_llm.errors import UserError


class PlacementError(UserError):
    """A pipeline split that cannot hold the model; the message names the flag and the fix."""


@dataclass(frozen=True)
class Placement:
    """`layers[p][v]` = global layer indices of virtual chunk v on pipeline stage p (local index = position)."""

    layers: tuple[tuple[tuple[int, ...], ...], ...]

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


def place_layers(num_layers: int, pp: int = 1, num_layer_list: Optional[list[int]] = None,
                 layers_per_vpp_stage: Optional[int] = None) -> Placement:
    """Split `num_layers` over `pp` stages (evenly, by `--num-layer-list`, or interleaved in VPP chunks)."""
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
