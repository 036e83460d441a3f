"""Training objectives: what `training.loop` trains. Each module says how its data is read and batched, its forward
step and loss, and the extra values it logs; `OBJECTIVES` maps --stage to one. A new objective is one module here
and one entry in the table."""
from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol

import torch

from mindspeed_llm.training.data import MicroBatches, RunData
from mindspeed_llm.training.objectives.dpo import DPOObjective
from mindspeed_llm.training.objectives.pretrain import PretrainObjective
from mindspeed_llm.training.objectives.sft import SFTObjective
from mindspeed_llm.training.run_config import RunConfig


class Objective(Protocol):
    def check_data(self, tokenizer) -> None:
        """Checks of the data that need no model; they run first, so a wrong path is the first thing reported."""

    def setup(self, loaded) -> None:
        """After the model is built and `loaded` (`checkpointing.Loaded`): e.g. DPO's reference model."""

    def recorded(self) -> dict[str, Any]:
        """Saved-args fields the objective settled at set-up (DPO: its reference), recorded by every save."""

    def build_data(self, tokenizer, consumed_samples: int) -> RunData:
        """Train/valid datasets and loaders, the train loader resuming after `consumed_samples`."""

    def micro_batches(self, iterator: Iterator, device) -> MicroBatches:
        """One iteration's model inputs from a loader of `build_data`."""

    def before_schedule(self, mb: MicroBatches) -> None:
        """Runs before each forward(-backward) pass over `mb`."""

    def forward_step(self, data_iterator: Iterator, model) -> tuple[torch.Tensor, Callable]:
        """megatron-core's forward step: (output, loss function); the loss function reports `lm loss`."""

    def metrics(self, reports: list[dict[str, Any]], group) -> dict[str, float]:
        """Values logged after `lm loss`, from the last pipeline stage's loss reports (DP means over `group`)."""


OBJECTIVES: dict[str, Callable[[RunConfig], Objective]] = {
    "sft": SFTObjective,
    "dpo": DPOObjective,
    "pretrain": PretrainObjective,
}
