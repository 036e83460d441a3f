"""Collation, sampler, get_batch, sidecar check and the loss helpers."""
from __future__ import annotations

import json
import math
from argparse import Namespace

import numpy as np
import pytest
import torch

from mindspeed_llm.errors import UserError
from mindspeed_llm.training.batching import (PretrainingSampler, SFTCollator, batch_cu_seqlens, batch_mode,
                                             build_data_loader, check_sidecar, get_batch, padding_attention_mask)
from mindspeed_llm.training.loss import (masked_mean, masked_sum_and_count, per_token_cross_entropy,
                                         reported_loss, sft_loss_func, shift_labels)
from mindspeed_llm.training.sft_dataset import SFTDataOptions, SFTDataset
from tests.test_sft_dataset import EOS, PAD, SAMPLES, X, neat_packed, pack_neat, unpacked, write_dataset


def item(ids: list[int], labels: list[int]) -> dict[str, np.ndarray]:
    return {"input_ids": np.array(ids), "labels": np.array(labels), "attention_mask": np.ones(len(ids), np.int64)}


# ---------------------------------------------------------------------------------------------------------------
# Collation

def test_fixed_collation_pads_to_seq_length():
    batch = SFTCollator("fixed", seq_length=8, pad_token_id=PAD)([item([5, 6, 7, 8, 9], [X, X, 7, 8, 9]),
                                                                   item([5, 6, 7], [X, 6, 7])])
    assert batch["input_ids"].shape == (2, 8) and batch["input_ids"].dtype == torch.int64
    assert batch["input_ids"][1].tolist() == [5, 6, 7, PAD, PAD, PAD, PAD, PAD]
    assert batch["labels"][1].tolist() == [X, 6, 7, X, X, X, X, X]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]


@pytest.mark.parametrize("lengths,multiple,expected", [((5, 11), 8, 16), ((8, 3), 8, 8), ((5, 11), 1, 11),
                                                       ((9,), 4, 12), ((17, 2), 8, 24)])
def test_dynamic_collation_pads_to_multiple(lengths, multiple, expected):
    items = [item(list(range(1, n + 1)), list(range(1, n + 1))) for n in lengths]
    batch = SFTCollator("dynamic", seq_length=64, pad_token_id=PAD, pad_to_multiple_of=multiple)(items)
    assert batch["input_ids"].shape == (len(lengths), expected)


def test_left_padding_and_pairwise_rows():
    batch = SFTCollator("dynamic", 16, PAD, pad_to_multiple_of=4, padding_side="left")([item([5, 6], [X, 6])])
    assert batch["input_ids"].tolist() == [[PAD, PAD, 5, 6]] and batch["attention_mask"].tolist() == [[0, 0, 1, 1]]
    pair = {"chosen_input_ids": np.array([1, 2, 3]), "chosen_labels": np.array([X, 2, 3]),
            "chosen_attention_mask": np.ones(3, np.int64), "rejected_input_ids": np.array([1, 4]),
            "rejected_labels": np.array([X, 4]), "rejected_attention_mask": np.ones(2, np.int64)}
    other = {k: v[:2] for k, v in pair.items()}
    batch = SFTCollator("dynamic", 16, PAD, pad_to_multiple_of=1)([pair, other])
    # all chosen rows first, then all rejected rows
    assert batch["input_ids"].tolist() == [[1, 2, 3], [1, 2, PAD], [1, 4, PAD], [1, 4, PAD]]


def test_batch_cu_seqlens_offsets_rows():
    cu = batch_cu_seqlens([np.array([0, 3, 5, 8]), np.array([0, 6, 8])], 8)
    assert cu.tolist() == [0, 3, 5, 8, 14, 16] and cu.dtype == torch.int32
    # a short row gets its padding as an extra segment
    assert batch_cu_seqlens([np.array([0, 2, 6])], 8).tolist() == [0, 2, 6, 8]


def test_batch_mode():
    assert batch_mode(Namespace()) == "fixed"
    assert batch_mode(Namespace(no_pad_to_seq_lengths=True)) == "dynamic"
    assert batch_mode(Namespace(no_pad_to_seq_lengths=True, reset_attention_mask=True)) == "packed"


# ---------------------------------------------------------------------------------------------------------------
# get_batch

def test_get_batch_unpacked():
    batch = SFTCollator("dynamic", 16, PAD, pad_to_multiple_of=4)([item([5, 6, 7, 8, 9], [X, X, 7, 8, 9]),
                                                                  item([5, 6, 7], [X, 6, 7])])
    out = get_batch(batch)
    assert set(out) == {"tokens", "labels", "loss_mask", "position_ids", "attention_mask", "packed_seq_params"}
    # token i is trained to predict labels[i + 1]
    assert out["labels"].tolist() == [[X, 7, 8, 9, X, X, X, X], [6, 7, X, X, X, X, X, X]]
    assert out["loss_mask"].tolist() == [[0, 1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]]
    assert out["loss_mask"].dtype == torch.float32
    assert out["position_ids"].tolist() == [list(range(8))] * 2
    assert out["attention_mask"] is None and out["packed_seq_params"] is None  # right padding: causal suffices


def test_left_padded_batch_gets_dense_mask():
    mask = torch.tensor([[0, 1, 1]])
    dense = padding_attention_mask(mask)
    # True = masked: upper triangle, plus the pad column, with the diagonal always open
    assert dense.shape == (1, 1, 3, 3)
    assert dense[0, 0].tolist() == [[False, True, True], [True, False, True], [True, False, False]]
    batch = SFTCollator("dynamic", 16, PAD, pad_to_multiple_of=1, padding_side="left")(
        [item([5, 6, 7], [X, 6, 7]), item([5, 6], [X, 6])])
    assert get_batch(batch)["attention_mask"].shape == (2, 1, 3, 3)


def test_get_batch_packed_micro_batch_of_two(tmp_path):
    ds = SFTDataset(neat_packed(tmp_path), "train", (0, 2), 2,
                    SFTDataOptions(seq_length=20, shuffle=False, packed=True, neat_pack=True))
    batch = SFTCollator("packed", 20, PAD)([ds[0], ds[1]])
    assert batch["cu_seqlens"].tolist() == [0, 8, 16, 20, 29, 40]
    assert int(batch["max_seqlen"]) == 11
    out = get_batch(batch)
    assert out["tokens"].shape == (1, 40) and out["attention_mask"] is None
    p = out["packed_seq_params"]
    assert p.qkv_format == "thd" and p.cu_seqlens_q.dtype == torch.int32
    assert p.cu_seqlens_q.tolist() == p.cu_seqlens_kv.tolist() == [0, 8, 16, 20, 29, 40]
    assert p.max_seqlen_q == p.max_seqlen_kv == 11
    pos = out["position_ids"][0].tolist()
    assert pos[:20] == list(range(8)) + list(range(8)) + [0] * 4 and pos[20:29] == list(range(9))
    # the last token of every segment predicts nothing
    ends = [7, 15, 19, 28, 39]
    assert all(out["labels"][0, e] == X for e in ends)


def plain_packed(tmp_path) -> str:
    """The same rows as `neat_packed`, written by plain --pack: attention_mask all 1s."""
    rows = [pack_neat(SAMPLES[:2], 20), pack_neat(SAMPLES[2:], 20)]
    return write_dataset(tmp_path / "plainpack", {"input_ids": [r[0] for r in rows], "labels": [r[1] for r in rows],
                                                  "attention_mask": [[1] * 20 for _ in rows]})


@pytest.mark.parametrize("neat", [True, False])
def test_packed_batches_reproduce_unpacked_per_sample_view(tmp_path, neat):
    """Tokens, shifted labels and positions of each packed segment equal the unpacked sample's."""
    plain = SFTDataset(unpacked(tmp_path), "train", (0, 3), 3, SFTDataOptions(seq_length=20, shuffle=False))
    packed = SFTDataset(neat_packed(tmp_path) if neat else plain_packed(tmp_path), "train", (0, 2), 2,
                        SFTDataOptions(seq_length=20, shuffle=False, packed=True, neat_pack=neat,
                                       eos_token_id=EOS, pad_token_id=PAD))
    pb = get_batch(SFTCollator("packed", 20, PAD)([packed[0], packed[1]]))
    cu = pb["packed_seq_params"].cu_seqlens_q.tolist()
    segments = [(a, b) for a, b in zip(cu[:-1], cu[1:]) if pb["tokens"][0, a] != PAD]
    for doc, (a, b) in enumerate(segments):
        ub = get_batch(SFTCollator("fixed", 20, PAD)([plain[doc]]))
        n = b - a
        for key in ("tokens", "labels", "position_ids", "loss_mask"):
            assert pb[key][0, a:b].tolist() == ub[key][0, :n].tolist(), key
        assert ub["loss_mask"][0, n:].sum() == 0


# ---------------------------------------------------------------------------------------------------------------
# A one-layer causal attention LM with RoPE by position id: packed (block-diagonal by cu_seqlens) and
# unpacked batches must give the same per-token loss for every sample.

def _toy_logits(tokens: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    vocab, dim = 40, 16
    emb, wq, wk, wv, out = (torch.randn(*s, generator=g) for s in ((vocab, dim), (dim, dim), (dim, dim),
                                                                    (dim, dim), (dim, vocab)))
    x = emb[tokens]                                                   # [b, s, d]
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    ang = position_ids[..., None].float() * inv                       # [b, s, d/2]

    def rope(t: torch.Tensor) -> torch.Tensor:
        a, b = t[..., 0::2], t[..., 1::2]
        return torch.stack((a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()), -1).flatten(-2)

    q, k, v = rope(x @ wq), rope(x @ wk), x @ wv
    s = tokens.shape[1]
    allowed = torch.ones(s, s, dtype=torch.bool).tril()
    if cu_seqlens is not None:
        seg = torch.bucketize(torch.arange(s), cu_seqlens[1:].long(), right=True)
        allowed &= seg[:, None] == seg[None, :]
    h = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return h @ out


def test_packed_loss_equals_unpacked_loss_per_sample(tmp_path):
    plain = SFTDataset(unpacked(tmp_path), "train", (0, 3), 3, SFTDataOptions(seq_length=20, shuffle=False))
    packed = SFTDataset(neat_packed(tmp_path), "train", (0, 2), 2,
                        SFTDataOptions(seq_length=20, shuffle=False, packed=True, neat_pack=True))
    pb = get_batch(SFTCollator("packed", 20, PAD)([packed[0], packed[1]]))
    cu = pb["packed_seq_params"].cu_seqlens_q
    p_loss = per_token_cross_entropy(_toy_logits(pb["tokens"], pb["position_ids"], cu), pb["labels"])
    ub = get_batch(SFTCollator("dynamic", 20, PAD)([plain[i] for i in range(3)]))
    u_loss = per_token_cross_entropy(_toy_logits(ub["tokens"], ub["position_ids"], None), ub["labels"])
    p_per_token = p_loss[pb["loss_mask"].bool()]
    u_per_token = u_loss[ub["loss_mask"].bool()]
    torch.testing.assert_close(p_per_token, u_per_token, rtol=1e-5, atol=1e-5)
    assert masked_mean(p_loss, pb["loss_mask"]) == pytest.approx(float(masked_mean(u_loss, ub["loss_mask"])), 1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Sampler and loader

def test_sampler_shards_windows_over_dp():
    r0 = list(PretrainingSampler(10, 0, 2, 0, 2))
    r1 = list(PretrainingSampler(10, 0, 2, 1, 2))
    assert r0 == [[0, 1], [4, 5]] and r1 == [[2, 3], [6, 7]]  # 8, 9: incomplete window dropped
    assert list(PretrainingSampler(10, 4, 2, 0, 2)) == [[4, 5]]
    assert list(PretrainingSampler(10, 8, 2, 0, 2, drop_last=False)) == [[8]]
    assert len(PretrainingSampler(10, 0, 2, 0, 2)) == 2
    with pytest.raises(UserError, match="consumed samples 10"):
        PretrainingSampler(10, 10, 1, 0, 1)


def test_sampler_resume_is_exact():
    straight = list(PretrainingSampler(24, 0, 2, 1, 3))
    first = list(PretrainingSampler(24, 0, 2, 1, 3))[:2]
    resumed = list(PretrainingSampler(24, 2 * 2 * 3, 2, 1, 3))  # consumed = 2 windows of mbs * dp
    assert first + resumed == straight
    # DP=2 x 1 sample per rank sees the same samples as DP=1 with micro-batches of 1, in the same order
    dp2 = [list(PretrainingSampler(6, 0, 1, r, 2)) for r in range(2)]
    dp1 = list(PretrainingSampler(6, 0, 1, 0, 1))
    assert [b for pair in zip(*dp2) for b in pair] == dp1


def test_data_loader_end_to_end(tmp_path):
    ds = SFTDataset(unpacked(tmp_path), "train", (0, 3), 6, SFTDataOptions(seq_length=16, seed=7))
    loader = build_data_loader(ds, consumed_samples=2, micro_batch_size=2, data_parallel_rank=0,
                               data_parallel_size=1, collator=SFTCollator("dynamic", 16, PAD))
    batches = list(loader)
    assert len(batches) == 2
    expected = [ds[i]["input_ids"].tolist() for i in (2, 3)]
    got = [[t for t in row.tolist()][:len(e)] for row, e in zip(batches[0]["input_ids"], expected)]
    assert got == expected and batches[0]["input_ids"].shape[1] % 8 == 0


# ---------------------------------------------------------------------------------------------------------------
# Sidecar

SIDECAR = {"format_version": 1, "handler_name": "AlpacaStyleInstructionHandler", "prompt_type": "qwen3",
           "enable_thinking": "none", "seq_length": 20, "pack": True, "neat_pack": True, "append_eod": False,
           "tokenizer": {"name_or_path": "/models/Qwen3-8B", "vocab_size": 151669, "eos_token_id": 151645,
                         "pad_token_id": 151643},
           "num_samples": 2, "fields": ["input_ids", "attention_mask", "labels"]}
ARGS = dict(prompt_type="qwen3", enable_thinking=None, tokenizer_name_or_path="/other/place/Qwen3-8B/",
            seq_length=20, reset_attention_mask=True, neat_pack=True)


@pytest.mark.parametrize("change,flag", [
    ({"prompt_type": "qwen_lf"}, "--prompt-type"),
    ({"enable_thinking": "true"}, "--enable-thinking"),
    ({"tokenizer_name_or_path": "/models/Qwen2.5-7B"}, "--tokenizer-name-or-path"),
    ({"seq_length": 4096}, "--seq-length"),
    ({"reset_attention_mask": False}, "--reset-attention-mask"),
    ({"neat_pack": False}, "--neat-pack"),
    ({"is_pairwise_dataset": True}, "--is-pairwise-dataset"),
])
def test_check_sidecar_refuses_mismatch(tmp_path, change, flag):
    prefix = str(tmp_path / "d")
    with open(prefix + "_preprocess.json", "w") as f:
        json.dump(SIDECAR, f)
    assert check_sidecar(prefix, Namespace(**ARGS)) == SIDECAR
    with pytest.raises(UserError) as err:
        check_sidecar(prefix, Namespace(**{**ARGS, **change}))
    msg = str(err.value)
    assert flag in msg and "\n" not in msg
    ours = change[next(iter(change))]
    if isinstance(ours, str) and not ours.startswith("/"):
        assert repr(ours) in msg


def test_check_sidecar_tokenizer_ids_and_unpacked(tmp_path):
    prefix = str(tmp_path / "d")
    with open(prefix + "_preprocess.json", "w") as f:
        json.dump({**SIDECAR, "pack": False, "neat_pack": False, "seq_length": None}, f)
    args = Namespace(**{**ARGS, "reset_attention_mask": False, "neat_pack": False, "seq_length": 4096})
    assert check_sidecar(prefix, args) is not None  # offline preprocessing had no seq length: any is fine

    class Tok:
        eos_token_id, pad_token_id = 151643, 151643

        def __len__(self) -> int:
            return 151669

    with pytest.raises(UserError, match=r"eos_token_id.*151643.*151645"):
        check_sidecar(prefix, args, Tok())
    with pytest.raises(UserError, match="--reset-attention-mask"):
        check_sidecar(prefix, Namespace(**ARGS))
    assert check_sidecar(str(tmp_path / "none"), args) is None


# ---------------------------------------------------------------------------------------------------------------
# Loss

def test_shift_labels():
    labels = torch.tensor([[X, X, 7, 8, 9, X]])
    assert shift_labels(labels).tolist() == [[X, 7, 8, 9, X, X]]
    packed = torch.tensor([[X, 5, 6, X, 7, 8]])
    assert shift_labels(packed, torch.tensor([0, 3, 6], dtype=torch.int32)).tolist() == [[5, 6, X, 7, 8, X]]


def test_masked_mean_and_per_token_mode():
    loss = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    assert float(masked_mean(loss, mask)) == pytest.approx((1 + 2 + 40) / 3)
    total, count = masked_sum_and_count(loss, mask)
    assert float(total) == 43.0 and int(count) == 3
    assert float(masked_mean(loss, torch.zeros_like(mask))) == 0.0  # no supervised token: 0, not NaN

    value, reports = sft_loss_func(mask, loss)
    assert float(value) == pytest.approx(43 / 3) and float(reports["lm loss"]) == pytest.approx(43 / 3)
    s, n, reports = sft_loss_func(mask, loss, per_token=True)
    assert float(s) == 43.0 and int(n) == 3 and reports["lm loss"].tolist() == [43.0, 3.0]


def test_reported_loss_averaging():
    # mean mode: average of per-micro-batch means; per-token mode: sum of sums over sum of counts
    assert reported_loss([torch.tensor(1.0), torch.tensor(3.0)], per_token=False) == 2.0
    assert reported_loss([torch.tensor([2.0, 1.0]), torch.tensor([6.0, 3.0])], per_token=True) == 2.0
    assert reported_loss([torch.tensor([1.0, 1.0]), torch.tensor([9.0, 3.0])], per_token=True) == 2.5
    assert math.isnan(reported_loss([], per_token=False))
