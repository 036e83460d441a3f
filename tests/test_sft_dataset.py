"""SFT dataset: file discovery, --split, truncation, packed segments, index mapping and its cache."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mindspeed_llm.errors import UserError
from mindspeed_llm.training import sft_dataset as sd
from mindspeed_llm.training.sft_dataset import (SFTDataOptions, SFTDataset, build_index_map, build_sft_datasets,
                                                cut_instruction, cut_pairwise, eos_segments, find_fields,
                                                infer_seqlen, neat_segments, split_ranges, turn_spans)

X = -100
PAD, EOS = 0, 9


def write_dataset(prefix: str | Path, fields: dict[str, list[list[int]]], sidecar: dict | None = None) -> str:
    """Write PREFIX_packed_<field>_document.{bin,idx} (int32, one sequence and document per sample)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(prefix)
    for field, rows in fields.items():
        stem = f"{prefix}_packed_{field}_document"
        builder = IndexedDatasetBuilder(stem + ".bin", dtype=np.int32)
        for row in rows:
            builder.add_item(torch.IntTensor(row))
            builder.end_document()
        builder.finalize(stem + ".idx")
    if sidecar is not None:
        with open(prefix + "_preprocess.json", "w") as f:
            json.dump(sidecar, f)
    return prefix


def sample(prompt: list[int], target: list[int]) -> tuple[list[int], list[int]]:
    return prompt + target, [X] * len(prompt) + target


# Three single-turn samples in the shape of a Qwen chat render: the prompt holds an eos (end of the user
# turn), the target ends with eos and a trained "\n" (3).
SAMPLES = [sample([5, 11, EOS, 6], [21, 22, EOS, 3]),
           sample([5, 12, 13, EOS, 6], [23, EOS, 3]),
           sample([5, 14, EOS, 6], [24, 25, 26, EOS, 3])]


def pack_neat(samples: list[tuple[list[int], list[int]]], seq_length: int) -> tuple[list[int], list[int], list[int]]:
    """One neat-pack row, as preprocessing writes it: segment ids 1..k, then pads with id 0 and label -100."""
    ids, labels, mask = [], [], []
    for k, (i, l) in enumerate(samples, start=1):
        ids += i
        labels += l
        mask += [k] * len(i)
    n = seq_length - len(ids)
    assert n >= 1
    return ids + [PAD] * n, labels + [X] * n, mask + [0] * n


def unpacked(tmp_path: Path) -> str:
    return write_dataset(tmp_path / "plain", {"input_ids": [s[0] for s in SAMPLES],
                                              "attention_mask": [[1] * len(s[0]) for s in SAMPLES],
                                              "labels": [s[1] for s in SAMPLES]})


def neat_packed(tmp_path: Path, seq_length: int = 20) -> str:
    rows = [pack_neat(SAMPLES[:2], seq_length), pack_neat(SAMPLES[2:], seq_length)]
    return write_dataset(tmp_path / "neat", {"input_ids": [r[0] for r in rows], "labels": [r[1] for r in rows],
                                             "attention_mask": [r[2] for r in rows]})


# ---------------------------------------------------------------------------------------------------------------

def test_find_fields_and_missing_files(tmp_path):
    prefix = unpacked(tmp_path)
    assert set(find_fields(prefix)) == {"input_ids", "attention_mask", "labels"}
    assert find_fields(prefix)["labels"] == f"{prefix}_packed_labels_document"
    with pytest.raises(UserError) as err:
        find_fields(str(tmp_path / "nothing"))
    msg = str(err.value)
    assert "\n" not in msg and "nothing_packed_{input_ids,attention_mask,labels}_document.{bin,idx}" in msg
    os.remove(f"{prefix}_packed_labels_document.idx")
    with pytest.raises(UserError, match=r"missing plain_packed_labels_document\.idx;"):
        find_fields(prefix)
    with pytest.raises(UserError, match=r"chosen,rejected|chosen_input_ids"):
        find_fields(prefix, sd.PAIRWISE_FIELDS)


def test_split_ranges():
    assert split_ranges("100,0,0", 10) == [(0, 10), (10, 10), (10, 10)]
    assert split_ranges("969,30,1", 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges("8,1,1", 10) == [(0, 8), (8, 9), (9, 10)]
    # round(5/3) = 2 each -> bounds 0,2,4,6; the overshoot of 1 comes off every boundary -> 0,1,3,5.
    assert split_ranges("33,33,33", 5) == [(0, 1), (1, 3), (3, 5)]
    assert split_ranges("0.9/0.1", 10) == [(0, 9), (9, 10), (10, 10)]
    with pytest.raises(UserError, match="--split"):
        split_ranges("0,0,0", 10)


def test_infer_seqlen_reference_numbers():
    # Reference table, rule B with cutoff 4096 - 1.
    assert infer_seqlen(3000, 2000, 4095) == (2095, 2000)
    assert infer_seqlen(5000, 10, 4095) == (4085, 10)
    assert infer_seqlen(100, 5000, 4095) == (100, 3995)
    assert infer_seqlen(3000, 3000, 4095) == (2048, 2047)
    assert infer_seqlen(3, 4, 100) == (3, 4)  # fits: untouched


def test_turn_spans():
    assert turn_spans(np.array([X, X, 7, 8, X, 9])) == [(0, 2, 4), (4, 5, 6)]
    assert turn_spans(np.array([5, 6, X, X, 7, X])) == [(0, 0, 2), (2, 4, 5), (5, 6, 6)]


def test_cut_instruction_turn_aware():
    # Turn 1: source 6, target 4; turn 2: source 3, target 5 (18 tokens), seq_length 12.
    ids = np.arange(100, 118)
    labels = ids.copy()
    labels[0:6] = X
    labels[10:13] = X
    # Turn 1, budget 12: 2*4 < 12 -> whole target, source min(12-4, 6) = 6; total 10.
    # Turn 2, budget 2: 2*5 >= 2 and 2*3 >= 2 -> target int(2*5/8) = 1, source min(2-1, 3) = 1.
    out_ids, out_labels = cut_instruction(ids, labels, 12)
    assert out_ids.tolist() == list(range(100, 110)) + [110, 113]
    assert out_labels.tolist() == [X] * 6 + list(range(106, 110)) + [X, 113]
    short_ids, short_labels = cut_instruction(ids[:10], labels[:10], 12)
    assert short_ids.tolist() == ids[:10].tolist() and short_labels.tolist() == labels[:10].tolist()


def test_cut_instruction_keeps_ids_and_labels_aligned():
    rng = np.random.RandomState(0)
    for _ in range(200):
        n = rng.randint(1, 60)
        ids = rng.randint(1, 50, size=n)
        labels = np.where(rng.rand(n) < 0.5, ids, X)
        seq = rng.randint(1, 40)
        out_ids, out_labels = cut_instruction(ids, labels, seq)
        assert len(out_ids) == len(out_labels) <= seq
        trained = out_labels != X
        assert (out_labels[trained] == out_ids[trained]).all() and (out_ids != X).all()


def test_cut_pairwise():
    prompt = list(range(1, 7))
    chosen = np.array(prompt + [31, 32, 33, 34, 35])
    rejected = np.array(prompt + [41, 42, 43])
    c_lab, r_lab = chosen.copy(), rejected.copy()
    c_lab[:6] = X
    r_lab[:6] = X
    # infer_seqlen(6, 5, 8): target int(8*5/11) = 3, source min(8-3, 6) = 5.
    out = cut_pairwise(chosen, c_lab, rejected, r_lab, 8)
    assert out["chosen_input_ids"].tolist() == [1, 2, 3, 4, 5, 31, 32, 33]
    assert out["chosen_labels"].tolist() == [X] * 5 + [31, 32, 33]
    assert out["rejected_input_ids"].tolist() == [1, 2, 3, 4, 5, 41, 42, 43]
    assert out["rejected_labels"].tolist() == [X] * 5 + [41, 42, 43]
    assert out["rejected_attention_mask"].tolist() == [1] * 8


def test_neat_segments_reference_example():
    pos, cu = neat_segments(np.array([1, 1, 1, 2, 2, 0, 0, 0]))
    assert pos.tolist() == [0, 1, 2, 0, 1, 0, 0, 0]
    assert cu.tolist() == [0, 3, 5, 8]
    pos, cu = neat_segments(np.array([1, 1, 2, 2, 2]))
    assert pos.tolist() == [0, 1, 0, 1, 2] and cu.tolist() == [0, 2, 5]


def test_eos_segments_plain_pack():
    # Two Qwen-shaped samples: the prompt's eos (end of user turn) does not split; the trained "\n" after
    # the target's eos stays with its sample; the pad tail is its own segment.
    ids = np.array([5, 9, 6, 7, 9, 3, 5, 9, 6, 8, 9, 3, 0, 0])
    labels = np.array([X, X, X, 7, 9, 3, X, X, X, 8, 9, 3, X, X])
    pos, cu = eos_segments(ids, labels, eos_token_id=9, pad_token_id=0)
    assert cu.tolist() == [0, 6, 12, 14]
    assert pos.tolist() == list(range(6)) * 2 + [0, 0]
    # pad == eos (a base model's <|endoftext|>): pads are the trailing untrained eos tokens.
    ids = np.array([5, 6, 7, 9, 5, 6, 8, 9, 9, 9])
    labels = np.array([X, X, 7, 9, X, X, 8, 9, X, X])
    pos, cu = eos_segments(ids, labels, eos_token_id=9, pad_token_id=9)
    assert cu.tolist() == [0, 4, 8, 10] and pos.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 0]


def test_build_index_map():
    docs = np.arange(3)
    assert build_index_map(docs, 7, seed=1, shuffle=False).tolist() == [0, 1, 2] * 3
    rng = np.random.RandomState(5)
    expected = []
    for _ in range(3):  # one RandomState carried over epochs
        e = np.arange(3)
        rng.shuffle(e)
        expected += e.tolist()
    got = build_index_map(docs, 7, seed=5)
    assert got.tolist() == expected and got.dtype == np.int64
    assert build_index_map(np.arange(3), 4, seed=0, shuffle=False, pad_multiple=4).tolist() == [0, 1, 2, 0]
    assert build_index_map(docs, 0, seed=0).tolist() == []
    with pytest.raises(UserError, match="--split"):
        build_index_map(np.arange(0), 3, seed=0)


def test_index_map_cache_is_reused_and_atomic(tmp_path, monkeypatch):
    prefix = unpacked(tmp_path)
    opts = SFTDataOptions(seq_length=16, seed=3)
    ds = SFTDataset(prefix, "train", (0, 3), 5, opts)
    maps = list(tmp_path.glob("plain_train_indexmap_5ns_3s_0-3d_shuffle_decoder_packed_idx.npy"))
    assert len(maps) == 1 and not list(tmp_path.glob("*.tmp"))
    assert len(ds) == 6 and sorted(ds.index[:3].tolist()) == [0, 1, 2]
    monkeypatch.setattr(sd, "build_index_map", lambda *a, **k: pytest.fail("cache not used"))
    again = SFTDataset(prefix, "train", (0, 3), 5, opts)
    assert again.index.tolist() == ds.index.tolist()
    monkeypatch.undo()
    maps[0].write_bytes(b"half-written")  # an unreadable map is rebuilt, not trusted
    assert SFTDataset(prefix, "train", (0, 3), 5, opts).index.tolist() == ds.index.tolist()
    with pytest.raises(UserError, match="outside its 3 samples"):
        SFTDataset(prefix, "train", (0, 4), 5, opts)


def test_unpacked_items(tmp_path):
    prefix = unpacked(tmp_path)
    ds = SFTDataset(prefix, "train", (0, 3), 3, SFTDataOptions(seq_length=16, shuffle=False))
    item = ds[1]
    assert set(item) == {"input_ids", "labels", "attention_mask"}
    assert item["input_ids"].dtype == np.int64
    assert item["input_ids"].tolist() == SAMPLES[1][0] and item["labels"].tolist() == SAMPLES[1][1]
    assert item["attention_mask"].tolist() == [1] * len(SAMPLES[1][0])
    # seq_length 6 on sample 0 (source 4, target 4): 2*4 >= 6, 2*4 >= 6 -> target int(6*4/8) = 3, source 3.
    short = SFTDataset(prefix, "train", (0, 3), 3, SFTDataOptions(seq_length=6, shuffle=False))[0]
    assert short["input_ids"].tolist() == [5, 11, EOS, 21, 22, EOS]
    assert short["labels"].tolist() == [X, X, X, 21, 22, EOS]
    prefix_cut = SFTDataset(prefix, "train", (0, 3), 3, SFTDataOptions(seq_length=6, shuffle=False,
                                                                        cut_max_seqlen=True))[0]
    assert prefix_cut["input_ids"].tolist() == SAMPLES[0][0][:6]


def test_build_sft_datasets_split(tmp_path):
    prefix = unpacked(tmp_path)
    train, valid, test = build_sft_datasets(prefix, "2,1,0", (4, 2, 0), SFTDataOptions(seq_length=16))
    assert test is None
    assert set(train.index.tolist()) == {0, 1} and set(valid.index.tolist()) == {2}


def test_neat_packed_items_reproduce_unpacked_samples(tmp_path):
    plain = SFTDataset(unpacked(tmp_path), "train", (0, 3), 3, SFTDataOptions(seq_length=20, shuffle=False))
    packed = SFTDataset(neat_packed(tmp_path), "train", (0, 2), 2,
                        SFTDataOptions(seq_length=20, shuffle=False, packed=True, neat_pack=True))
    row = packed[0]
    assert set(row) == {"input_ids", "labels", "attention_mask", "position_ids", "cu_seqlens"}
    assert row["cu_seqlens"].tolist() == [0, 8, 16, 20]
    segments = []
    for doc in range(2):
        row = packed.sample(doc)
        cu = row["cu_seqlens"]
        for a, b in zip(cu[:-1], cu[1:]):
            if row["attention_mask"][a] != 0:  # skip the pad segment
                segments.append({k: row[k][a:b] for k in ("input_ids", "labels", "position_ids")})
    assert len(segments) == 3
    for seg, doc in zip(segments, range(3)):
        ref = plain.sample(doc)
        assert seg["input_ids"].tolist() == ref["input_ids"].tolist()
        assert seg["labels"].tolist() == ref["labels"].tolist()
        assert seg["position_ids"].tolist() == list(range(len(ref["input_ids"])))


def test_plain_pack_needs_eos_and_neat_needs_segment_ids(tmp_path):
    rows = [pack_neat(SAMPLES[:2], 20)]
    prefix = write_dataset(tmp_path / "plainpack", {"input_ids": [r[0] for r in rows], "labels": [r[1] for r in rows],
                                                    "attention_mask": [[1] * 20]})
    with pytest.raises(UserError, match="--neat-pack"):
        SFTDataset(prefix, "train", (0, 1), 1, SFTDataOptions(seq_length=20, packed=True))
    ds = SFTDataset(prefix, "train", (0, 1), 1, SFTDataOptions(seq_length=20, packed=True, eos_token_id=EOS,
                                                                pad_token_id=PAD))
    assert ds[0]["cu_seqlens"].tolist() == [0, 8, 16, 20]
    with pytest.raises(UserError, match="without --neat-pack"):
        SFTDataset(prefix, "train", (0, 1), 1, SFTDataOptions(seq_length=20, packed=True, neat_pack=True))


def test_pairwise_dataset(tmp_path):
    c = sample([1, 2, 3], [4, 5])
    r = sample([1, 2, 3], [6])
    prefix = write_dataset(tmp_path / "pair", {"chosen_input_ids": [c[0]], "chosen_labels": [c[1]],
                                               "rejected_input_ids": [r[0]], "rejected_labels": [r[1]]})
    ds = SFTDataset(prefix, "train", (0, 1), 1, SFTDataOptions(seq_length=16, pairwise=True))
    item = ds[0]
    assert item["chosen_input_ids"].tolist() == [1, 2, 3, 4, 5]
    assert item["rejected_labels"].tolist() == [X, X, X, 6]


def test_mismatched_fields_refused(tmp_path):
    prefix = write_dataset(tmp_path / "bad", {"input_ids": [[1, 2, 3]], "labels": [[X, 2]]})
    with pytest.raises(UserError, match="does not match"):
        SFTDataset(prefix, "train", (0, 1), 1, SFTDataOptions(seq_length=8))


def test_options_and_sample_counts_from_args():
    from argparse import Namespace

    data = Namespace(seq_length=64, reset_attention_mask=True, neat_pack=True, padded_samples=True,
                     is_pairwise_dataset=False, no_shuffle=False, full_shuffle_instruction_dataset=False,
                     cut_max_seqlen=False, no_cut_token=False, data_cache_path=None)
    sidecar = {"tokenizer": {"eos_token_id": 151645, "pad_token_id": 151643}}
    opts = sd.data_options(data, 9, 4, sidecar)
    assert (opts.seq_length, opts.seed, opts.packed, opts.neat_pack, opts.pad_multiple) == (64, 9, True, True, 4)
    assert (opts.eos_token_id, opts.pad_token_id, opts.shuffle, opts.pairwise) == (151645, 151643, True, False)
    # train 10 x 4; valid (10 // 5 + 1) x 2 x 4; test 2 x 4
    assert sd.train_valid_test_num_samples(4, 10, 2, 5) == (40, 24, 8)
