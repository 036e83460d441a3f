"""Pretraining (pretrain_gpt.py): next-token loss over every token of megatron-core `GPTDataset` samples
(`training.pretrain_data`), except after EODs with --eod-mask-loss; averaged as SFT's (`training.loss`)."""
from __future__ import annotations

import argparse
from typing import Iterator

from mindspeed_llm.training.data import MicroBatches, RunData
from mindspeed_llm.training.objectives.sft import SFTObjective
from mindspeed_llm.training.pretrain_data import build_pretrain_datasets, collate, next_pretrain_micro_batches
from mindspeed_llm.training.sft_dataset import train_valid_test_num_samples


class PretrainObjective(SFTObjective):
    """SFT's forward step, loss and (no) extra metrics over other data: GPTDataset samples, every token trained."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.eod = None

    def check_data(self, tokenizer) -> None:
        # The prefixes and weights were checked with the flags (`validate`); EOD is the tokenizer's eos.
        self.eod = tokenizer.eos_token_id

    def build_data(self, tokenizer, consumed_samples: int) -> RunData:
        from megatron.core import parallel_state as ps

        from mindspeed_llm.training.batching import build_data_loader

        args = self.args
        train, valid, _ = build_pretrain_datasets(args, tokenizer, train_valid_test_num_samples(args))
        data = RunData(train, valid, collate)

        def loader(dataset, consumed: int) -> Iterator:
            return iter(build_data_loader(dataset, consumed, args.micro_batch_size, ps.get_data_parallel_rank(),
                                          ps.get_data_parallel_world_size(), collate, num_workers=args.num_workers,
                                          seed=args.seed))

        if train is not None and args.train_iters > 0:
            data.train_iter = loader(train, consumed_samples)
        if valid is not None and args.eval_iters > 0:
            data.valid_iter = loader(valid, 0)
        return data

    def micro_batches(self, iterator: Iterator, device) -> MicroBatches:
        return next_pretrain_micro_batches(iterator, self.args.num_microbatches, self.eod,
                                           self.args.reset_attention_mask, device)

