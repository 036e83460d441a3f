"""Pretraining data: megatron-core's GPT dataset machinery over `preprocess_data.py --handler-name
GeneralPretrainHandler` output (`PREFIX_text_document.{bin,idx}`), so the sample order for a seed is Megatron-LM's.

`GPTDataset` joins the documents of a split into one token stream (in an order shuffled by --seed), cuts it into
samples of --seq-length + 1 tokens (inputs and shifted labels), and shuffles the samples; `BlendedDataset` draws
from several such datasets by weight (`--data-path 0.3 A 0.7 B`). Index files are cached in --data-cache-path
(default: a `cache/` folder beside the data). `--reset-position-ids`, `--reset-attention-mask` and
`--eod-mask-loss` act at the EOD tokens as in Megatron-LM; a reset attention mask runs as packed (THD) rows, the
segments ending after each EOD (`models.packed`)."""
from __future__ import annotations

import argparse
import glob
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from mindspeed_llm.errors import UserError
from mindspeed_llm.models.context_parallel import context_parallel_group, split_batch_for_cp
from mindspeed_llm.data.preprocess import SIDECAR_SUFFIX
from mindspeed_llm.training.batching import (batch_cu_seqlens, build_packed_seq_params, check_data_files,
                                             check_sidecar_tokenizer)
from mindspeed_llm.training.data import MicroBatches
from mindspeed_llm.training.sft_dataset import read_sidecar

if TYPE_CHECKING:
    from mindspeed_llm.training.run_config import DataSettings

Blend = tuple[list[str], Optional[list[float]]]
PRETRAIN_SUFFIX = "_text_document"      # GeneralPretrainHandler's output for --json-keys text


def parse_blend(values: Sequence[str], flag: str) -> Blend:
    """Megatron's blend syntax: `PREFIX [PREFIX ...]` or `WEIGHT PREFIX [WEIGHT PREFIX ...]` (also as one quoted
    string). Returns (prefixes, weights or None)."""
    words = [w for value in values for w in str(value).split()]
    if not words:
        raise UserError(f"{flag}: no dataset prefix given")

    def weight(word: str) -> Optional[float]:
        try:
            return float(word)
        except ValueError:
            return None

    if len(words) % 2 == 0 and weight(words[0]) is not None:
        weights, prefixes = words[0::2], words[1::2]
        parsed = [weight(w) for w in weights]
        for raw, value in zip(weights, parsed):
            if value is None or not np.isfinite(value) or value < 0:
                raise UserError(f"{flag}: blend weight {raw!r} does not parse as a non-negative number; expected "
                                f"WEIGHT PREFIX pairs such as 0.3 A 0.7 B")
        if sum(parsed) <= 0:
            raise UserError(f"{flag}: the blend weights {' '.join(weights)} sum to 0")
        return prefixes, parsed
    numbers = [w for w in words if weight(w) is not None]
    if numbers:
        raise UserError(f"{flag}: {' '.join(words)!r} mixes weights and prefixes; expected PREFIX ... or WEIGHT "
                        f"PREFIX pairs such as 0.3 A 0.7 B (a prefix may not be a number)")
    return words, None


def check_prefix(prefix: str, flag: str) -> None:
    """`prefix` names an indexed dataset of pretraining text: PREFIX.bin and PREFIX.idx."""
    missing = [ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
    if not missing:
        return
    if glob.glob(glob.escape(prefix) + "_packed_*_document.idx"):
        raise UserError(f"{flag} {prefix}: instruction data (preprocess_data.py with an instruction or pairwise "
                        f"handler); it trains with posttrain_gpt.py. pretrain_gpt.py reads GeneralPretrainHandler "
                        f"output, PREFIX{PRETRAIN_SUFFIX}")
    hint = (f"; did you mean {prefix}{PRETRAIN_SUFFIX}?" if os.path.isfile(prefix + PRETRAIN_SUFFIX + ".idx")
            else f" (give the --output-prefix of preprocess_data.py --handler-name GeneralPretrainHandler followed "
                 f"by {PRETRAIN_SUFFIX})")
    raise UserError(f"{flag} {prefix}: missing {' and '.join(os.path.basename(prefix) + e for e in missing)}{hint}")


def blends_from_args(args: Union[argparse.Namespace, DataSettings]) -> tuple[Optional[Blend],
                                                                          Optional[list[Optional[Blend]]]]:
    """(blend split by --split, or None; per-split blends [train, valid, test], or None), every prefix checked."""
    if args.data_path:
        blend = parse_blend(args.data_path, "--data-path")
        for prefix in blend[0]:
            check_prefix(prefix, "--data-path")
        return blend, None
    per_split = []
    for flag, values in (("--train-data-path", args.train_data_path), ("--valid-data-path", args.valid_data_path),
                         ("--test-data-path", args.test_data_path)):
        blend = parse_blend(values, flag) if values else None
        for prefix in (blend[0] if blend else []):
            check_prefix(prefix, flag)
        per_split.append(blend)
    return None, per_split


def check_sidecars(data: DataSettings, tokenizer) -> None:
    """Every prefix of the blends whose preprocessing left a sidecar (`PREFIX_preprocess.json` beside
    `PREFIX_{key}_document`): its files are the ones the sidecar records, and the tokenizer is the one the text was
    tokenized with (token ids of another vocabulary would train silently)."""
    blend, per_split = blends_from_args(data)
    prefixes = [p for b in ([blend] if blend else per_split or []) if b for p in b[0]]
    for prefix in dict.fromkeys(prefixes):
        found = _sidecar_of(prefix)
        if found is not None:
            output_prefix, sidecar = found
            where = output_prefix + SIDECAR_SUFFIX
            check_data_files(output_prefix, sidecar.get("data_files") or {}, where)
            check_sidecar_tokenizer(sidecar, where, data.tokenizer_name_or_path, tokenizer)


def _sidecar_of(prefix: str) -> Optional[tuple[str, dict]]:
    """(output prefix, sidecar) of `prefix` = OUTPUT_{key}_document when OUTPUT's sidecar lists that key."""
    if not prefix.endswith("_document"):
        return None
    stem = prefix[:-len("_document")]
    for cut in (i for i, ch in enumerate(stem) if ch == "_"):
        sidecar = read_sidecar(stem[:cut])
        if sidecar is not None and stem[cut + 1:] in (sidecar.get("fields") or ()):
            return stem[:cut], sidecar
    return None


@dataclass
class DatasetTokenizer:
    """What megatron-core's datasets read of a tokenizer: the EOD id, the vocabulary size (token dtype) and an
    identity for the index cache. No `pad`: samples are never padded (megatron-core then uses -1)."""
    eod: int
    vocab_size: int
    name: str

    @property
    def unique_identifiers(self) -> dict:
        return {"class": "DatasetTokenizer", "eod": self.eod, "vocab_size": self.vocab_size, "name": self.name}


def gpt_dataset_config(data: DataSettings, seed: int, tokenizer, blend: Optional[Blend],
                       blend_per_split: Optional[list[Optional[Blend]]]) -> GPTDatasetConfig:
    if tokenizer.eos_token_id is None:
        raise UserError(f"--tokenizer-name-or-path {data.tokenizer_name_or_path}: the tokenizer has no eos token, "
                        f"which pretraining uses as the end-of-document (EOD) token")
    return GPTDatasetConfig(
        random_seed=seed, sequence_length=data.seq_length, blend=blend, blend_per_split=blend_per_split,
        split=data.split if blend is not None else None, path_to_cache=data.data_cache_path,
        tokenizer=DatasetTokenizer(int(tokenizer.eos_token_id), len(tokenizer),
                                   os.path.basename(str(tokenizer.name_or_path).rstrip("/"))),
        reset_position_ids=data.reset_position_ids, reset_attention_mask=data.reset_attention_mask,
        eod_mask_loss=data.eod_mask_loss, create_attention_mask=False)


def build_pretrain_datasets(data: DataSettings, seed: int, tokenizer, num_samples: Sequence[int]) -> list:
    """[train, valid, test] (None where a split is empty) drawing `num_samples` each, as Megatron-LM builds them
    (every rank builds; rank 0 first writes the index cache)."""
    blend, per_split = blends_from_args(data)
    config = gpt_dataset_config(data, seed, tokenizer, blend, per_split)
    try:
        return BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config).build()
    except (AssertionError, ValueError) as exc:
        raise UserError(f"--data-path / --split {data.split}: megatron-core could not build the datasets "
                        f"({exc or type(exc).__name__})") from None


def collate(samples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """`GPTDataset` samples stacked into [b, L] tensors."""
    return {key: torch.stack([s[key] for s in samples]) for key in ("tokens", "labels", "loss_mask", "position_ids")}


def document_bounds(tokens: torch.Tensor, eod: int) -> np.ndarray:
    """cu_seqlens of one row: a document ends after each EOD token (Megatron's reset attention mask)."""
    length = tokens.shape[0]
    ends = (torch.nonzero(tokens == eod).flatten() + 1).tolist()
    return np.array([0] + [e for e in ends if e < length] + [length], dtype=np.int64)


def model_inputs(raw: dict[str, torch.Tensor], eod: int, reset_attention_mask: bool, device) -> dict:
    """Model inputs of one micro-batch (keys as `batching.get_batch`). With a reset attention mask the rows are
    flattened into one packed row whose segments end after each EOD; positions are the dataset's (reset only with
    --reset-position-ids, as in Megatron-LM)."""
    def to(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=True) if device is not None else t

    tokens, labels, loss_mask, positions = raw["tokens"], raw["labels"], raw["loss_mask"], raw["position_ids"]
    if not reset_attention_mask:
        inputs = {"tokens": to(tokens), "labels": to(labels), "loss_mask": to(loss_mask),
                  "position_ids": to(positions), "attention_mask": None, "packed_seq_params": None}
        return split_batch_for_cp(inputs, context_parallel_group())
    length = tokens.shape[1]
    cu = batch_cu_seqlens([document_bounds(row, eod) for row in tokens], length)
    # max_seqlen bounds the segments and sizes the RoPE table, which positions not reset at EODs index past them.
    max_seqlen = max(int((cu[1:] - cu[:-1]).max()), int(positions.max()) + 1)
    params = build_packed_seq_params(cu, max_seqlen, device=device)
    params.positions = to(positions.reshape(-1))
    return {"tokens": to(tokens.reshape(1, -1)), "labels": to(labels.reshape(1, -1)),
            "loss_mask": to(loss_mask.reshape(1, -1)), "position_ids": params.positions[None],
            "attention_mask": None, "packed_seq_params": params}


def next_pretrain_micro_batches(it: Iterator, count: int, eod: int, reset_attention_mask: bool,
                                device) -> MicroBatches:
    inputs, terms = [], []
    for _ in range(count):
        try:
            raw = next(it)
        except StopIteration:
            raise UserError("the pretraining dataset ran out of samples before --train-iters") from None
        rows, length = raw["tokens"].shape
        density = 0.5
        if reset_attention_mask:
            seg = np.concatenate([np.diff(document_bounds(row, eod)) for row in raw["tokens"]]).astype(np.float64)
            density = 0.5 * float((seg ** 2).sum()) / (rows * length * length)
        terms.append((rows, length, density))
        inputs.append(model_inputs(raw, eod, reset_attention_mask, device))
    rows, length = terms[0][0], terms[0][1]
    tokens = sum(r * n for r, n, _ in terms)
    if reset_attention_mask:        # THD: the rows of a micro-batch are flattened into one
        return MicroBatches(inputs, rows * length, 1, tokens, terms)
    return MicroBatches(inputs, length, rows, tokens, terms)
