"""The SFT dataset over `preprocess_data.py` output (`PREFIX_packed_*_document.{bin,idx}`).

One sample is one sequence of every field file. `SFTDataset[i]` returns a dict of int64 numpy arrays:

* unpacked (fixed or dynamic batches): `input_ids`, `labels`, `attention_mask` (ones). Samples longer than
  `seq_length` are re-truncated turn by turn with LLaMA-Factory's `infer_seqlen` rule (see `cut_instruction`).
* packed (`--reset-attention-mask`, data written with `--pack`): additionally `position_ids` (restarting at 0 in
  every segment, 0 on padding) and `cu_seqlens` (segment boundaries `[0, ..., S]`, variable length).
  Segments come from the segment ids of `--neat-pack` data, or, for plain `--pack` data, end after each
  trained eos (see `eos_segments`). The padding tail is one segment of its own.
* pairwise: `chosen_*` and `rejected_*` versions of `input_ids`, `labels`, `attention_mask`.

Labels are stored and returned unshifted; `loss.shift_labels` aligns them with the next-token logits.
"""
from __future__ import annotations

import glob
import json
import os
import random
import tempfile
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch

from mindspeed_llm.errors import UserError

from mindspeed_llm.data.preprocess import SIDECAR_SUFFIX
from mindspeed_llm.data.templates import IGNORE_INDEX, infer_seqlen

if TYPE_CHECKING:
    from mindspeed_llm.training.run_config import DataSettings

SFT_FIELDS = ("input_ids", "attention_mask", "labels")
PAIRWISE_FIELDS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------

def _expected_files(prefix: str, fields: Sequence[str]) -> str:
    names = ",".join(fields)
    return f"{prefix}_packed_{{{names}}}_document.{{bin,idx}}"


def find_fields(prefix: str, required: Sequence[str] = ("input_ids", "labels")) -> dict[str, str]:
    """Map field name -> indexed-dataset path prefix for every `PREFIX_packed_<field>_document.{bin,idx}` pair.

    Raises UserError (one line, naming the expected files) when a required field or half a pair is missing.
    """
    head = f"{prefix}_packed_"
    found: dict[str, set[str]] = {}
    for path in glob.glob(glob.escape(prefix) + "_packed_*_document*"):
        stem, ext = os.path.splitext(path)
        if ext not in (".bin", ".idx") or not stem.endswith("_document"):
            continue
        field = stem[len(head):-len("_document")]
        found.setdefault(field, set()).add(ext)
    expected = SFT_FIELDS if not any(f.startswith("chosen_") for f in required) else PAIRWISE_FIELDS
    missing = []
    for f in sorted(set(required) | set(found)):
        missing += [f"{head}{f}_document{ext}" for ext in (".bin", ".idx") if ext not in found.get(f, ())]
    if missing:
        have = ", ".join(f for f, exts in sorted(found.items()) if len(exts) == 2) or "none"
        raise UserError(
            f"--data-path {prefix}: "
            + (f"missing {', '.join(os.path.basename(m) for m in missing)}" if found else "no dataset files")
            + "; expected "
            f"{_expected_files(prefix, expected)} (complete fields found: {have}); "
            "give the --output-prefix used with preprocess_data.py")
    return {f: f"{head}{f}_document" for f, exts in sorted(found.items()) if len(exts) == 2}


def read_sidecar(prefix: str) -> dict[str, Any] | None:
    """The `PREFIX_preprocess.json` written by preprocessing, or None when absent (e.g. data from elsewhere)."""
    path = prefix + SIDECAR_SUFFIX
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not valid JSON ({exc}); preprocess the data again") from None


def split_ranges(split: str, n: int) -> list[tuple[int, int]]:
    """Megatron's `--split` ("969,30,1", "100,0,0", "0.9/0.1"): contiguous [start, end) ranges of n samples.

    Weights are normalised; each part gets round(weight * n); the rounding error is taken off every boundary.
    """
    parts = [float(s) for s in split.replace("/", ",").split(",") if s.strip()]
    if not parts or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise UserError(f"--split {split!r}: expected up to three non-negative weights such as 100,0,0")
    parts = (parts + [0.0, 0.0])[:3]
    total = sum(parts)
    bounds = [0]
    for p in parts:
        bounds.append(bounds[-1] + int(round(p / total * n)))
    diff = bounds[-1] - n
    bounds = [bounds[0]] + [b - diff for b in bounds[1:]]
    return [(max(bounds[i], 0), max(bounds[i + 1], 0)) for i in range(3)]


# ---------------------------------------------------------------------------------------------------------------
# Truncation
# ---------------------------------------------------------------------------------------------------------------

def turn_spans(labels: np.ndarray) -> list[tuple[int, int, int]]:
    """(source_start, target_start, target_end) per turn: a run of ignored labels, then a run of trained ones.

    A leading trained run gets an empty source and a trailing ignored run an empty target, so every token
    belongs to exactly one turn.
    """
    trained = labels != IGNORE_INDEX
    n = len(labels)
    # Run starts: index 0 and every change of trained-ness.
    changes = np.flatnonzero(trained[1:] != trained[:-1]) + 1
    starts = np.concatenate(([0], changes, [n])).tolist()
    spans = []
    i = 0
    runs = list(zip(starts[:-1], starts[1:]))
    while i < len(runs):
        a, b = runs[i]
        if trained[a]:  # target with no source before it
            spans.append((a, a, b))
            i += 1
        elif i + 1 < len(runs):
            spans.append((a, b, runs[i + 1][1]))
            i += 2
        else:
            spans.append((a, b, b))
            i += 1
    return spans


def cut_instruction(input_ids: np.ndarray, labels: np.ndarray, seq_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Fit a sample into `seq_length` tokens turn by turn (`infer_seqlen` per turn, budget = what is left).

    Ids and labels are cut at the same indices, so they stay aligned (the reference's efficient_eos branch
    did not: it shifted one boundary and could copy -100 into the ids).
    """
    if len(input_ids) <= seq_length:
        return input_ids, labels
    keep: list[np.ndarray] = []
    total = 0
    for s0, t0, t1 in turn_spans(labels):
        if total >= seq_length:
            break
        s, t = infer_seqlen(t0 - s0, t1 - t0, seq_length - total)
        keep.append(np.arange(s0, s0 + s))
        keep.append(np.arange(t0, t0 + t))
        total += s + t
    idx = np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)
    return input_ids[idx], labels[idx]


def cut_pairwise(chosen_ids: np.ndarray, chosen_labels: np.ndarray, rejected_ids: np.ndarray,
                 rejected_labels: np.ndarray, seq_length: int) -> dict[str, np.ndarray]:
    """Shared prompt and both responses cut with `infer_seqlen(prompt, longer response, seq_length)`."""
    trained = np.flatnonzero(chosen_labels != IGNORE_INDEX)
    prompt_len = int(trained[0]) if len(trained) else len(chosen_ids)
    resp_len = max(len(chosen_ids), len(rejected_ids)) - prompt_len
    s, t = infer_seqlen(prompt_len, max(resp_len, 0), seq_length)
    out = {}
    for side, ids, labels in (("chosen", chosen_ids, chosen_labels), ("rejected", rejected_ids, rejected_labels)):
        idx = np.concatenate((np.arange(s), np.arange(prompt_len, min(prompt_len + t, len(ids)))))
        lab = labels[idx].copy()
        lab[:s] = IGNORE_INDEX
        out[f"{side}_input_ids"] = ids[idx]
        out[f"{side}_labels"] = lab
        out[f"{side}_attention_mask"] = np.ones(len(idx), dtype=np.int64)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Packed rows: segments -> position ids and cu_seqlens
# ---------------------------------------------------------------------------------------------------------------

def _positions(bounds: np.ndarray, length: int, pad_start: int) -> np.ndarray:
    """arange within each [bounds[k], bounds[k+1]); 0 from `pad_start` on."""
    pos = np.arange(length, dtype=np.int64)
    seg_start = np.repeat(bounds[:-1], np.diff(bounds))
    pos = pos - seg_start
    pos[pad_start:] = 0
    return pos


def neat_segments(segment_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position_ids, cu_seqlens) from neat-pack segment ids (1..k, 0 for padding).

    Example: [1,1,1,2,2,0,0,0] -> positions [0,1,2,0,1,0,0,0], cu_seqlens [0,3,5,8]. The padding tail is one
    segment (the reference made every pad token a length-1 segment; pads carry no loss either way).
    """
    n = len(segment_ids)
    change = np.flatnonzero(segment_ids[1:] != segment_ids[:-1]) + 1
    bounds = np.concatenate(([0], change, [n])).astype(np.int64)
    pads = np.flatnonzero(segment_ids != 0)
    pad_start = int(pads[-1]) + 1 if len(pads) else 0
    return _positions(bounds, n, pad_start), bounds


def eos_segments(input_ids: np.ndarray, labels: np.ndarray, eos_token_id: int,
                 pad_token_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(position_ids, cu_seqlens) for plain `--pack` rows, which store no sample boundaries.

    A segment ends with the trained run that contains a trained eos, so the template's tokens after the eos
    (Qwen's "\\n" after <|im_end|>) stay with their sample, while eos tokens inside prompts (end of a user
    turn) do not split anything. Multi-turn samples still split per assistant turn: use --neat-pack for
    exact per-sample attention. The trailing run of pad tokens with ignored labels is its own segment.
    """
    n = len(input_ids)
    trained = labels != IGNORE_INDEX
    pad_start = n
    if pad_token_id is not None:
        not_pad = np.flatnonzero((input_ids != pad_token_id) | trained)
        pad_start = int(not_pad[-1]) + 1 if len(not_pad) else 0
    eos = np.flatnonzero((input_ids[:pad_start] == eos_token_id) & trained[:pad_start])
    # Each trained eos closes its segment at the first untrained token after it.
    untrained = np.append(np.flatnonzero(~trained[:pad_start]), pad_start)
    ends = untrained[np.searchsorted(untrained, eos)]
    bounds = np.unique(np.concatenate(([0], ends, [pad_start, n])).astype(np.int64))
    return _positions(bounds, n, pad_start), bounds


# ---------------------------------------------------------------------------------------------------------------
# Index mapping
# ---------------------------------------------------------------------------------------------------------------

def build_index_map(doc_ids: np.ndarray, num_samples: int, seed: int, shuffle: bool = True,
                    pad_multiple: int | None = None, full_shuffle: bool = False) -> np.ndarray:
    """Whole epochs of `doc_ids` until at least `num_samples` entries (int64).

    Each epoch is permuted by one `RandomState(seed)` whose state carries over epochs. `pad_multiple`
    (`--padded-samples`, = global batch size) tops each epoch up to a multiple of it with the split's first
    samples (the reference used absolute ids 0, 1, ..., which fall outside a split that does not start at 0).
    """
    n = len(doc_ids)
    if num_samples <= 0:
        return np.zeros(0, dtype=np.int64)
    if n == 0:
        raise UserError(f"{num_samples} samples requested from an empty split; check --split")
    rng = np.random.RandomState(seed)
    epochs = []
    total = 0
    while total < num_samples:
        epoch = np.array(doc_ids, dtype=np.int64)
        if shuffle:
            rng.shuffle(epoch)
        if pad_multiple and n % pad_multiple:
            extra = np.resize(np.asarray(doc_ids, dtype=np.int64), pad_multiple - n % pad_multiple)
            epoch = np.concatenate((epoch, extra))
        epochs.append(epoch)
        total += len(epoch)
    out = np.concatenate(epochs)
    if full_shuffle:
        order = list(range(len(out)))
        random.Random(seed).shuffle(order)
        out = out[order]
    return out


def load_or_build_index_map(cache_path: str | None, doc_ids: np.ndarray, num_samples: int, seed: int,
                            **kwargs: Any) -> np.ndarray:
    """`build_index_map`, cached as .npy. The write goes to a temporary file and is renamed into place, so
    ranks building it at the same time never read a half-written map; a stale or foreign map is rebuilt."""
    lo, hi = (int(doc_ids[0]), int(doc_ids[-1]) + 1) if len(doc_ids) else (0, 0)
    if cache_path and os.path.isfile(cache_path):
        try:
            cached = np.load(cache_path)
            if len(cached) >= num_samples and (len(cached) == 0 or (cached.min() >= lo and cached.max() < hi)):
                return cached
        except (ValueError, OSError, EOFError):
            pass
    index = build_index_map(doc_ids, num_samples, seed, **kwargs)
    if cache_path:
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(cache_path)),
                                       prefix=os.path.basename(cache_path) + ".", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                np.save(f, index)
            os.replace(tmp, cache_path)
        except OSError as err:  # read-only data directory or disk full: keep the map in memory
            warnings.warn(f"could not cache the index map at {cache_path}: {err}")
            if tmp and os.path.exists(tmp):
                os.remove(tmp)
    return index


# ---------------------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class SFTDataOptions:
    """What `SFTDataset` needs from the flags (see `options_from_args`)."""
    seq_length: int
    seed: int = 1234
    packed: bool = False            # --reset-attention-mask
    neat_pack: bool = False         # --neat-pack
    pairwise: bool = False          # --is-pairwise-dataset
    shuffle: bool = True            # not --no-shuffle
    full_shuffle: bool = False      # --full-shuffle-instruction-dataset
    pad_multiple: int | None = None  # --padded-samples: global batch size
    cut_max_seqlen: bool = False    # --cut-max-seqlen: plain prefix cut instead of turn-aware
    no_cut_token: bool = False      # --no-cut-token: never cut
    eos_token_id: int | None = None  # template-fixed eos, for plain --pack boundaries
    pad_token_id: int | None = None
    cache_dir: str | None = None    # where index maps go (default: beside the data)


def data_options(data: DataSettings, seed: int, global_batch_size: int,
                 sidecar: dict | None = None) -> SFTDataOptions:
    """A run's `SFTDataOptions`; the template's token ids come from the data's sidecar when it records them."""
    tok = (sidecar or {}).get("tokenizer", {})
    return SFTDataOptions(
        seq_length=int(data.seq_length),
        seed=int(seed),
        # Pairwise samples stay unpacked here: the collator packs each micro-batch's pairs.
        packed=bool(data.reset_attention_mask) and not data.is_pairwise_dataset,
        neat_pack=bool(data.neat_pack),
        pairwise=bool(data.is_pairwise_dataset),
        shuffle=not data.no_shuffle,
        full_shuffle=bool(data.full_shuffle_instruction_dataset),
        pad_multiple=int(global_batch_size) if data.padded_samples else None,
        cut_max_seqlen=bool(data.cut_max_seqlen),
        no_cut_token=bool(data.no_cut_token),
        eos_token_id=tok.get("eos_token_id"),
        pad_token_id=tok.get("pad_token_id"),
        cache_dir=data.data_cache_path,
    )


def train_valid_test_num_samples(global_batch_size: int, train_iters: int, eval_iters: int,
                                 eval_interval: Optional[int]) -> tuple[int, int, int]:
    """Megatron's sample counts: train = iters x GBS; valid = (iters // eval_interval + 1) x eval_iters x GBS."""
    eval_interval = eval_interval or train_iters or 1
    return (train_iters * global_batch_size, (train_iters // eval_interval + 1) * eval_iters * global_batch_size,
            eval_iters * global_batch_size)


class SFTDataset(torch.utils.data.Dataset):
    """Samples `doc_range` of the indexed fields at `prefix`, in the order of the epoch index map."""

    def __init__(self, prefix: str, name: str, doc_range: tuple[int, int], num_samples: int,
                 options: SFTDataOptions) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.options = options
        self.name = name
        required = PAIRWISE_FIELDS if options.pairwise else ("input_ids", "labels")
        if options.packed and options.neat_pack:
            required = (*required, "attention_mask")
        paths = find_fields(prefix, required)
        self.fields = {f: IndexedDataset(p) for f, p in paths.items()
                       if f in (PAIRWISE_FIELDS if options.pairwise else SFT_FIELDS)}
        lengths = {f: d.sequence_lengths for f, d in self.fields.items()}
        first = next(iter(lengths))
        for f, lens in lengths.items():
            # Fields of one sequence (chosen_*, rejected_*, or the plain ones) share every length.
            ref = next(g for g in lengths if g.split("_")[0] == f.split("_")[0]) if options.pairwise else first
            if len(lens) != len(lengths[first]) or not np.array_equal(lens, lengths[ref]):
                raise UserError(f"--data-path {prefix}: field {f} does not match {ref} sample for sample; "
                                 "the files come from different preprocessing runs")
        start, end = doc_range
        if not 0 <= start <= end <= len(lengths[first]):
            raise UserError(f"--data-path {prefix}: sample range {start}:{end} is outside its "
                             f"{len(lengths[first])} samples")
        if options.packed and options.neat_pack and end > start:
            first_mask = np.asarray(self.fields["attention_mask"].get(start))
            if len(first_mask) and not (first_mask != 1).any():
                raise UserError(f"--neat-pack: {prefix} has no segment ids (attention_mask all 1s); the data "
                                 "was preprocessed with --pack but without --neat-pack")
        if options.packed and not options.neat_pack and options.eos_token_id is None:
            raise UserError("plain --pack data with --reset-attention-mask needs the eos id to find sample "
                             "boundaries: the sidecar has none; preprocess with --neat-pack")
        self.num_docs = len(lengths[first])
        doc_ids = np.arange(start, end, dtype=np.int64)
        cache_path = None
        if num_samples > 0:
            base = os.path.join(options.cache_dir, os.path.basename(prefix)) if options.cache_dir else prefix
            tags = (f"_pad{options.pad_multiple}" if options.pad_multiple else "") + \
                   ("_shuffle" if options.shuffle else "") + ("_full" if options.full_shuffle else "")
            cache_path = (f"{base}_{name}_indexmap_{num_samples}ns_{options.seed}s_{start}-{end}d{tags}"
                          "_decoder_packed_idx.npy")
        self.index = load_or_build_index_map(
            cache_path, doc_ids, num_samples, options.seed, shuffle=options.shuffle,
            pad_multiple=options.pad_multiple, full_shuffle=options.full_shuffle)

    def __len__(self) -> int:
        return len(self.index)

    def _read(self, field: str, doc: int) -> np.ndarray:
        return np.array(self.fields[field].get(doc), dtype=np.int64)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        doc = int(self.index[idx])
        return self.sample(doc)

    def sample(self, doc: int) -> dict[str, np.ndarray]:
        """The processed sample for sequence `doc` (an index into the files, not into the epoch map)."""
        o = self.options
        if o.pairwise:
            return cut_pairwise(*(self._read(f, doc) for f in PAIRWISE_FIELDS), o.seq_length)
        ids, labels = self._read("input_ids", doc), self._read("labels", doc)
        if o.packed:
            ids, labels = ids[:o.seq_length], labels[:o.seq_length]
            if o.neat_pack:
                mask = self._read("attention_mask", doc)[:o.seq_length]
                pos, cu = neat_segments(mask)
            else:
                pos, cu = eos_segments(ids, labels, o.eos_token_id, o.pad_token_id)
                mask = np.ones(len(ids), dtype=np.int64)
            return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": pos, "cu_seqlens": cu}
        if not o.no_cut_token:
            if o.cut_max_seqlen:
                ids, labels = ids[:o.seq_length], labels[:o.seq_length]
            else:
                ids, labels = cut_instruction(ids, labels, o.seq_length)
        return {"input_ids": ids, "labels": labels, "attention_mask": np.ones(len(ids), dtype=np.int64)}


def build_sft_datasets(prefix: str, split: str, num_samples: Sequence[int],
                       options: SFTDataOptions) -> list[SFTDataset | None]:
    """[train, valid, test] datasets over the `--split` ranges; None for an empty range or 0 samples."""
    first = PAIRWISE_FIELDS[0] if options.pairwise else "input_ids"
    paths = find_fields(prefix, PAIRWISE_FIELDS if options.pairwise else ("input_ids", "labels"))
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    n = len(IndexedDataset(paths[first]))
    out: list[SFTDataset | None] = []
    for name, (start, end), count in zip(("train", "valid", "test"), split_ranges(split, n), num_samples):
        out.append(SFTDataset(prefix, name, (start, end), count, options) if end > start and count > 0 else None)
    return out
