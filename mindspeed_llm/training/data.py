"""Datasets and loaders of a fine-tuning run: sidecar check, train/valid splits, DP-aware resumable loaders,
and one iteration's micro-batches as model inputs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Optional

from mindspeed_llm.errors import UserError

if TYPE_CHECKING:
    from mindspeed_llm.training.run_config import RunConfig


@dataclass
class RunData:
    train: Any
    valid: Any
    collator: Any
    train_iter: Optional[Iterator] = None
    valid_iter: Optional[Iterator] = None


def check_run_data(run: RunConfig, tokenizer) -> Optional[dict]:
    """What can be checked of --data-path without a model: the dataset files are all there and the sidecar agrees
    with the flags and the tokenizer. Runs before the model is built and the checkpoint loaded, so a wrong path is
    the first thing a run reports. Returns the sidecar (None for data without one)."""
    from mindspeed_llm.training.batching import check_sidecar
    from mindspeed_llm.training.sft_dataset import PAIRWISE_FIELDS, find_fields

    data = run.data
    sidecar = check_sidecar(data.data_path, data, tokenizer)
    find_fields(data.data_path, PAIRWISE_FIELDS if data.is_pairwise_dataset else ("input_ids", "labels"))
    return sidecar


def build_run_data(run: RunConfig, tokenizer, consumed_samples: int, sidecar: Optional[dict]) -> RunData:
    """Datasets and loaders over --data-path, whose `check_run_data` result is `sidecar`."""
    from mindspeed_llm.training.batching import make_collator
    from mindspeed_llm.training.sft_dataset import build_sft_datasets, data_options

    data = run.data
    options = data_options(data, run.seed, run.batch.global_batch_size, sidecar)
    if options.eos_token_id is None:
        options.eos_token_id = tokenizer.eos_token_id
    if options.pad_token_id is None:
        options.pad_token_id = tokenizer.pad_token_id
    train, valid, _ = build_sft_datasets(data.data_path, data.split, num_samples(run), options)
    if train is None:
        raise UserError(f"--split {data.split} leaves no training samples in --data-path {data.data_path}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    result = RunData(train, valid, make_collator(data, pad))
    result.train_iter = loader(run, train, consumed_samples, result.collator)
    if valid is not None and run.loop.eval_iters > 0:
        result.valid_iter = loader(run, valid, 0, result.collator)
    return result


def num_samples(run: RunConfig) -> tuple[int, int, int]:
    """Samples drawn from the train, valid and test splits (Megatron's counts)."""
    from mindspeed_llm.training.sft_dataset import train_valid_test_num_samples

    return train_valid_test_num_samples(run.batch.global_batch_size, run.loop.train_iters, run.loop.eval_iters,
                                        run.loop.eval_interval)


def loader(run: RunConfig, dataset, consumed: int, collator) -> Iterator:
    """This DP rank's micro-batches of `dataset`, resuming after `consumed` samples."""
    from megatron.core import parallel_state as ps

    from mindspeed_llm.training.batching import build_data_loader

    return iter(build_data_loader(dataset, consumed, run.batch.micro_batch_size, ps.get_data_parallel_rank(),
                                  ps.get_data_parallel_world_size(), collator, num_workers=run.data.num_workers,
                                  seed=run.seed))


@dataclass
class MicroBatches:
    """One iteration's model inputs and what the log needs about them."""
    inputs: list[dict]
    seq_length: int               # what the pipeline schedule allocates per micro-batch (packed: rows * L)
    micro_batch_size: int         # rows: 1 for packed (THD rows are flattened into one), 2 x mbs for pairs
    tokens: int                   # real (non-padding) tokens, this DP rank
    flop_terms: list[tuple[int, int, float]]   # (rows, length, attention density) per micro-batch


def next_micro_batches(it: Iterator, count: int, packed: bool, device) -> MicroBatches:
    """`count` micro-batches from `it`; `packed`: THD rows (--reset-attention-mask)."""
    from mindspeed_llm.training.batching import get_batch

    inputs, tokens, terms = [], 0, []
    for _ in range(count):
        try:
            raw = next(it)
        except StopIteration:
            raise UserError("the dataset ran out of samples before --train-iters; the index map is shorter than "
                            "--train-iters x --global-batch-size (delete stale *_indexmap_*.npy files)") from None
        rows, length = raw["input_ids"].shape
        tokens += int((raw["attention_mask"] != 0).sum())
        if "cu_seqlens" in raw:
            seg = (raw["cu_seqlens"][1:] - raw["cu_seqlens"][:-1]).double()
            density = 0.5 * float((seg ** 2).sum()) / (rows * length * length)
        else:
            density = 0.5
        terms.append((rows, length, density))
        inputs.append(get_batch(raw, device))
    if packed:       # THD: the rows of a micro-batch are flattened into one
        return MicroBatches(inputs, max(rows * length for rows, length, _ in terms), 1, tokens, terms)
    longest = max(t[1] for t in terms)
    # Pairwise batches hold 2 x --micro-batch-size rows (chosen, then rejected); the schedule sizes by rows.
    return MicroBatches(inputs, longest, terms[0][0], tokens, terms)
