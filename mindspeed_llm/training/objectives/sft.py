"""Supervised fine-tuning (`--stage sft`): next-token loss over the answer tokens of preprocessed instruction data
(`training.sft_dataset`, batched by `training.batching`); the loss and its averaging are `training.loss`."""
from __future__ import annotations

from functools import partial
from typing import Any, Iterator, Optional

from mindspeed_llm.models.context_parallel import context_parallel_group
from mindspeed_llm.training.data import MicroBatches, RunData, build_run_data, check_run_data, next_micro_batches
from mindspeed_llm.training.loss import sft_loss_func
from mindspeed_llm.training.run_config import RunConfig


def model_forward(model, batch: dict):
    """The model's per-token loss [b, s] (labels already shifted) for one micro-batch of `batching.get_batch`."""
    return model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"],
                 packed_seq_params=batch["packed_seq_params"])


class SFTObjective:
    def __init__(self, run: RunConfig) -> None:
        self.run = run
        self.sidecar: Optional[dict] = None

    def check_data(self, tokenizer) -> None:
        self.sidecar = check_run_data(self.run, tokenizer)

    def setup(self, loaded) -> None:
        pass

    def recorded(self) -> dict[str, Any]:
        return {}

    def build_data(self, tokenizer, consumed_samples: int) -> RunData:
        return build_run_data(self.run, tokenizer, consumed_samples, self.sidecar)

    def micro_batches(self, iterator: Iterator, device) -> MicroBatches:
        return next_micro_batches(iterator, self.run.batch.num_microbatches, self.run.data.reset_attention_mask,
                                  device)

    def before_schedule(self, mb: MicroBatches) -> None:
        pass

    def forward_step(self, data_iterator: Iterator, model):
        batch = next(data_iterator)
        return model_forward(model, batch), partial(sft_loss_func, batch["loss_mask"],
                                                    per_token=self.run.loop.calculate_per_token_loss,
                                                    cp_group=context_parallel_group())

    def metrics(self, reports: list[dict[str, Any]], group) -> dict[str, float]:
        return {}
