"""Packed (THD) batches: the varlen attention kernel against the dense block-diagonal mask, RoPE at host-built
positions against megatron-core's THD RoPE, and a tiny model that trains on packed rows without host syncs."""
from __future__ import annotations

import json
import math

import pytest
import torch

from mindspeed_llm.errors import UserError

from mindspeed_llm.models.packed import (KERNEL_ENV, apply_packed_rope, packed_attention, packed_kernel,
                                         packed_rope_cos_sin, packed_seq_params)
from tests.conftest import run_cli

LAYOUTS = {
    "three_samples": [5, 7, 4],
    "one_sample": [16],
    "ones_and_padding_tail": [1, 1, 9, 13],     # the last segment stands for a row's padding tail
    "two_rows": [6, 10, 3, 13],                  # rows of 16 flattened: [6, 10 | 3, 13]
}


def cu_of(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("heads,groups", [(4, 2), (4, 4), (6, 1)])
def test_varlen_kernel_equals_dense_mask(layout, heads, groups):
    lengths = LAYOUTS[layout]
    params = packed_seq_params(cu_of(lengths), max(lengths))
    t, hn = sum(lengths), 8
    gen = torch.Generator().manual_seed(len(lengths) * 10 + heads + groups)
    base = [torch.randn(t, n, hn, generator=gen, dtype=torch.float64) for n in (heads, groups, groups)]
    grad_out = torch.randn(t, heads, hn, generator=gen, dtype=torch.float32)
    results = {}
    for kernel in ("segments", "dense"):
        q, k, v = (x.float().requires_grad_() for x in base)
        out = packed_attention(q, k, v, params, scale=1 / math.sqrt(hn), kernel=kernel)
        assert out.shape == (t, heads, hn)
        out.backward(grad_out)
        results[kernel] = (out.detach(), q.grad, k.grad, v.grad)
    for got, want in zip(results["segments"], results["dense"]):
        assert (got - want).abs().max() <= 1e-5
    # Independent check of the first segment: plain causal attention over it alone, K/V repeated per group.
    n0 = lengths[0]
    q, k, v = (x[:n0].float().transpose(0, 1) for x in base)
    k, v = (x.repeat_interleave(heads // groups, dim=0) for x in (k, v))
    w = (q @ k.transpose(1, 2) / math.sqrt(hn)).masked_fill(torch.ones(n0, n0).triu(1).bool(), -math.inf)
    alone = (w.softmax(-1) @ v).transpose(0, 1)
    assert (results["segments"][0][:n0] - alone).abs().max() <= 1e-5


def test_kernel_choice(monkeypatch):
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    assert packed_kernel() == "segments"
    monkeypatch.setenv(KERNEL_ENV, "dense")
    assert packed_kernel() == "dense"
    monkeypatch.setenv(KERNEL_ENV, "flash")
    with pytest.raises(UserError, match=KERNEL_ENV):
        packed_kernel()


def test_packed_seq_params_positions_restart_per_segment():
    p = packed_seq_params(cu_of([3, 2, 4]), 4)
    assert p.bounds == ((0, 3), (3, 5), (5, 9))
    assert p.positions.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    assert p.qkv_format == "thd" and p.cu_seqlens_q.dtype == torch.int32 and p.max_seqlen_q == 4
    with pytest.raises(ValueError, match="cu_seqlens"):
        packed_seq_params(torch.tensor([0, 3, 3, 5]), 3)


class _OneRank:
    """The context-parallel group of a single rank, as megatron-core's THD RoPE queries it."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("layout", ["three_samples", "ones_and_padding_tail", "two_rows"])
def test_rope_at_precomputed_positions_equals_megatron_thd(layout, interleaved):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_thd

    lengths = LAYOUTS[layout]
    params = packed_seq_params(cu_of(lengths), max(lengths))
    t, heads, hn = sum(lengths), 3, 16
    inv_freq = 1.0 / (10000 ** (torch.arange(0, hn, 2, dtype=torch.float32) / hn))
    angles = torch.outer(torch.arange(max(lengths), dtype=torch.float32), inv_freq)
    emb = (torch.stack((angles, angles), -1).flatten(-2) if interleaved else torch.cat((angles, angles), -1))
    freqs = emb[:, None, None, :]
    x = torch.randn(t, heads, hn, generator=torch.Generator().manual_seed(t))
    want = _apply_rotary_pos_emb_thd(x, params.cu_seqlens_q, freqs, rotary_interleaved=interleaved,
                                     cp_group=_OneRank())
    cos, sin = packed_rope_cos_sin(params, freqs, x.dtype)
    assert packed_rope_cos_sin(params, freqs, x.dtype)[0] is cos       # once per batch, reused by every layer
    got = apply_packed_rope(x, cos, sin, interleaved)
    assert (got - want).abs().max() <= 1e-6


def test_packed_model_without_host_syncs(tiny_qwen3, tmp_path):
    """A tiny Qwen3 on packed rows (padding tail included): per-sample losses equal the samples run alone,
    the varlen kernel equals the dense mask in loss and gradients, our RoPE equals megatron-core's THD RoPE,
    and the forward reads nothing back from the device (megatron-core's THD path does, in every layer)."""
    out = tmp_path / "out.json"
    run_cli("tests/packed_model_checks.py", str(tiny_qwen3), str(out), timeout=300)
    res = json.loads(out.read_text())
    layers = res["layers"]
    for kernel in ("dense", "segments"):
        assert res[kernel]["samples"] == 4
        assert res[kernel]["max_rel_diff_vs_alone"] < 1e-5
        assert res[kernel]["host_reads_in_forward"] == 0
    assert res["grad_max_diff_segments_vs_dense"] <= 1e-5
    assert res["loss_diff_megatron_rope"] <= 1e-6
    assert res["megatron_thd_host_reads"] >= 2 * layers     # the counter sees megatron-core's per-layer syncs
