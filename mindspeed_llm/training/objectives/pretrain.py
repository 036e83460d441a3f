"""Pretraining (pretrain_gpt.py): next-token loss over every token of megatron-core `GPTDataset` samples
(`training.pretrain_data`), except after EODs with --eod-mask-loss; averaged as SFT's (`training.loss`)."""
from __future__ import annotations

from typing import Iterator

from mindspeed_llm.training.data import MicroBatches, RunData, loader, num_samples
from mindspeed_llm.training.objectives.sft import SFTObjective
from mindspeed_llm.training.pretrain_data import (build_pretrain_datasets, check_sidecars, collate,
                                                 next_pretrain_micro_batches)
from mindspeed_llm.training.run_config import RunConfig


class PretrainObjective(SFTObjective):
    """SFT's forward step, loss and (no) extra metrics over other data: GPTDataset samples, every token trained."""

    def __init__(self, run: RunConfig) -> None:
        super().__init__(run)
        self.eod = None

    def check_data(self, tokenizer) -> None:
        # The prefixes and weights were checked with the flags (`validate`); EOD is the tokenizer's eos.
        check_sidecars(self.run.data, tokenizer)
        self.eod = tokenizer.eos_token_id

    def build_data(self, tokenizer, consumed_samples: int) -> RunData:
        run = self.run
        train, valid, _ = build_pretrain_datasets(run.data, run.seed, tokenizer, num_samples(run))
        data = RunData(train, valid, collate)
        if train is not None and run.loop.train_iters > 0:
            data.train_iter = loader(run, train, consumed_samples, collate)
        if valid is not None and run.loop.eval_iters > 0:
            data.valid_iter = loader(run, valid, 0, collate)
        return data

    def micro_batches(self, iterator: Iterator, device) -> MicroBatches:
        return next_pretrain_micro_batches(iterator, self.run.batch.num_microbatches, self.eod,
                                           self.run.data.reset_attention_mask, device)
