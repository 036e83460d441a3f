"""Megatron indexed-dataset output, written under temporary names and renamed only when complete.

Files are `megatron.core.datasets.indexed_dataset` .bin/.idx pairs, int32 (labels hold -100), one
sequence and one document per sample. Packing reads the unpacked temporary output back through
`IndexedDataset` (memory-mapped), so only the length array is held in memory.
"""
from __future__ import annotations

import bisect
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from mindspeed_llm.errors import UserError


def output_name(prefix: str, field: str, instruction: bool) -> str:
    """`PREFIX_packed_{field}_document` for instruction/pairwise data, `PREFIX_{field}_document` for text."""
    return f"{prefix}_packed_{field}_document" if instruction else f"{prefix}_{field}_document"


def file_digest(path: str) -> dict:
    """Size and BLAKE2b of a file: the .idx holds every sample's length and offset, so any other data differs."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return {"size": os.path.getsize(path), "blake2b": h.hexdigest()}


class IndexedWriter:
    """One .bin/.idx pair per field, written to `<name>.tmp<pid>.{bin,idx}` until `commit()`."""

    def __init__(self, names: dict[str, str]):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.names = names
        self.tmp = {f: f"{n}.tmp{os.getpid()}" for f, n in names.items()}
        self.builders = {}
        try:
            for field, tmp in self.tmp.items():
                self.builders[field] = IndexedDatasetBuilder(tmp + ".bin", dtype=np.int32)
        except OSError as exc:
            self.abort()
            raise UserError(f"--output-prefix: cannot write {exc.filename} ({exc.strerror})") from None
        self.count = 0

    def add(self, sample: dict[str, list[int]]) -> None:
        for field, builder in self.builders.items():
            ids = sample[field]
            builder.add_document(ids, [len(ids)])
        self.count += 1

    def add_many(self, ids: dict[str, np.ndarray], lengths: dict[str, np.ndarray]) -> None:
        """Samples back to back: per field, all their ids in one int32 array and each sample's length.

        Writes what `add` writes sample by sample, in one write and one index update per field.
        """
        count = 0
        for field, builder in self.builders.items():
            sizes = lengths[field].tolist()
            builder.data_file.write(np.ascontiguousarray(ids[field], dtype=np.int32).data)
            first = len(builder.sequence_lengths)
            builder.sequence_lengths.extend(sizes)  # one sequence and one document per sample
            builder.document_indices.extend(range(first + 1, first + len(sizes) + 1))
            count = len(sizes)
        self.count += count

    def finalize(self) -> None:
        for field, builder in self.builders.items():
            builder.finalize(self.tmp[field] + ".idx")

    def digests(self) -> dict[str, dict]:
        """`file_digest` of each finished .idx (and the .bin size) under its final file name, for the sidecar."""
        out = {}
        for field, name in self.names.items():
            out[os.path.basename(name) + ".idx"] = file_digest(self.tmp[field] + ".idx")
            out[os.path.basename(name) + ".bin"] = {"size": os.path.getsize(self.tmp[field] + ".bin")}
        return out

    def commit(self) -> None:
        for field, name in self.names.items():
            for ext in (".bin", ".idx"):
                os.replace(self.tmp[field] + ext, name + ext)

    def abort(self) -> None:
        for builder in self.builders.values():
            try:
                builder.data_file.close()
            except Exception:
                pass
        for tmp in self.tmp.values():
            for ext in (".bin", ".idx"):
                Path(tmp + ext).unlink(missing_ok=True)


def greedy_knapsack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity` tokens.

    Each bin is filled by repeatedly taking the largest remaining sample that still fits; among equal
    lengths the most recently seen sample goes first (as LLaMA-Factory and MindSpeed-LLM pack).
    Runs in O(n log L) with one stack per distinct length.
    """
    stacks: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens, more than the pack capacity {capacity}")
        stacks[n].append(i)
    available = sorted(stacks)
    bins: list[list[int]] = []
    while available:
        room, current = capacity, []
        while True:
            k = bisect.bisect_right(available, room) - 1
            if k < 0:
                break
            n = available[k]
            current.append(stacks[n].pop())
            room -= n
            if not stacks[n]:
                available.pop(k)
        bins.append(current)
    return bins


def pack_dataset(unpacked: dict[str, str], writer: IndexedWriter, seq_length: int, pad_id: int,
                 neat: bool) -> tuple[int, int]:
    """Pack the unpacked instruction dataset into rows of exactly `seq_length`; returns (rows, real tokens).

    Capacity is `seq_length - 1` so every row ends with at least one pad. Pads: `pad_id` in input_ids,
    -100 in labels, and in attention_mask 0 with `neat` (which stores segment ids 1..k) or 1 without.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data = {f: IndexedDataset(p) for f, p in unpacked.items()}
    lengths = data["input_ids"].sequence_lengths.tolist()
    bins = greedy_knapsack(lengths, seq_length - 1)
    pad_value = {"input_ids": pad_id, "labels": -100, "attention_mask": 0 if neat else 1}
    tokens = 0
    for members in bins:
        row = {}
        for field, ds in data.items():
            parts = [ds[i] for i in members]
            if field == "attention_mask" and neat:
                parts = [np.full(len(p), j + 1, dtype=np.int32) for j, p in enumerate(parts)]
            used = sum(len(p) for p in parts)
            parts.append(np.full(seq_length - used, pad_value[field], dtype=np.int32))
            row[field] = np.concatenate(parts)
        tokens += sum(lengths[i] for i in members)
        writer.add(row)
    return len(bins), tokens
