"""Supervised fine-tuning (`--stage sft`): next-token loss over the answer tokens of preprocessed instruction data
(`training.sft_dataset`, batched by `training.batching`); the loss and its averaging are `training.loss`."""
from __future__ import annotations

import argparse
from functools import partial
from typing import Any, Iterator, Optional

from mindspeed_llm.models.context_parallel import context_parallel_group
from mindspeed_llm.training.data import MicroBatches, RunData, build_run_data, check_run_data, next_micro_batches
from mindspeed_llm.training.loss import sft_loss_func


def model_forward(model, batch: dict):
    """The model's per-token loss [b, s] (labels already shifted) for one micro-batch of `batching.get_batch`."""
    return model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"],
                 packed_seq_params=batch["packed_seq_params"])


class SFTObjective:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sidecar: Optional[dict] = None

    def check_data(self, tokenizer) -> None:
        self.sidecar = check_run_data(self.args, tokenizer)

    def setup(self, cfg, loaded) -> None:
        pass

    def build_data(self, tokenizer, consumed_samples: int) -> RunData:
        return build_run_data(self.args, tokenizer, consumed_samples, self.sidecar)

    def micro_batches(self, iterator: Iterator, device) -> MicroBatches:
        return next_micro_batches(self.args, iterator, self.args.num_microbatches, device)

    def before_schedule(self, mb: MicroBatches) -> None:
        pass

    def forward_step(self, data_iterator: Iterator, model):
        batch = next(data_iterator)
        return model_forward(model, batch), partial(sft_loss_func, batch["loss_mask"],
                                                    per_token=self.args.calculate_per_token_loss,
                                                    cp_group=context_parallel_group())

    def metrics(self, reports: list[dict[str, Any]], group) -> dict[str, float]:
        return {}
