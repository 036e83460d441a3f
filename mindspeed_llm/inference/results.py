"""What every generation loop returns, and the streaming callback it calls after each step."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Generated:
    """Per row: the generated ids (the stop token included, as `transformers.generate` returns it) and whether a
    stop token ended the row (False: it ran out of --max-new-tokens)."""

    outputs: list[list[int]] = field(default_factory=list)
    stopped: list[bool] = field(default_factory=list)


# on_step(row, outputs_so_far)
StepCallback = Callable[[int, list[list[int]]], None]
