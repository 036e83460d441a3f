"""One process (a world of one): a tiny Qwen3 on packed THD rows through the real collator and `get_batch`.

Usage: python tests/packed_model_checks.py HF_DIR OUT.json
Writes per-kernel per-sample loss differences against the samples run alone, the host reads counted during the
packed forward, the gradient difference between the varlen kernel and the dense mask, and megatron-core's THD
RoPE path (plain `PackedSeqParams`) for comparison.
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HOST_READS = ("tolist", "item", "__bool__", "__int__", "__float__")


@contextmanager
def count_host_reads():
    """Counts Tensor methods that copy a value to the host (each one a device sync on an accelerator)."""
    counter = {"n": 0}
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrap(fn):
        def counted(self, *a, **k):
            counter["n"] += 1
            return fn(self, *a, **k)
        return counted

    for name, fn in saved.items():
        setattr(torch.Tensor, name, wrap(fn))
    try:
        yield counter
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def packed_rows(seq: int, vocab: int):
    """Two neat-packed rows: samples of 9 and 11 tokens plus a padding tail of 4, and samples of 13 and 11."""
    rng = np.random.default_rng(0)
    rows, samples = [], []
    for lengths in ([9, 11], [13, 11]):
        ids, labels, segs = [], [], []
        for s, n in enumerate(lengths, start=1):
            tok = rng.integers(1, vocab, n)
            lab = tok.copy()
            lab[: n // 3] = -100                       # an unsupervised prompt
            ids += tok.tolist()
            labels += lab.tolist()
            segs += [s] * n
            samples.append((tok, lab))
        pad = seq - len(ids)
        ids += [0] * pad
        labels += [-100] * pad
        segs += [0] * pad
        cu = np.cumsum([0] + lengths + ([pad] if pad else []))
        pos = np.concatenate([np.arange(b - a) for a, b in zip(cu[:-1], cu[1:])])
        rows.append({"input_ids": np.array(ids), "labels": np.array(labels), "attention_mask": np.array(segs),
                     "position_ids": pos, "cu_seqlens": cu})
    return rows, samples


def main(hf_dir: str, out_file: str) -> None:
    from megatron.core.packed_seq_params import PackedSeqParams

    from mindspeed_llm.models import build_model, load_model_config
    from mindspeed_llm.models.packed import KERNEL_ENV
    from mindspeed_llm.platform import destroy_distributed, init_distributed
    from mindspeed_llm.training.batching import SFTCollator, get_batch
    from mindspeed_llm.training.loss import IGNORE_INDEX, shift_labels

    _, cfg = load_model_config(hf_dir)
    init_distributed(1, 1)
    torch.manual_seed(0)
    model = build_model(cfg, params_dtype=torch.float32)[0]
    seq = 24
    rows, samples = packed_rows(seq, cfg.vocab_size)
    raw = SFTCollator("packed", seq, pad_token_id=0)(rows)
    batch = get_batch(raw)
    mask = batch["loss_mask"].reshape(-1)
    cu = raw["cu_seqlens"].tolist()

    with torch.no_grad():
        alone = []
        for tok, lab in samples:
            labels = shift_labels(torch.as_tensor(lab)[None])
            loss = model(torch.as_tensor(tok)[None], torch.arange(len(tok))[None], None, labels=labels).reshape(-1)
            m = (labels.reshape(-1) != IGNORE_INDEX).float()
            alone.append(float((loss * m).sum() / m.sum()))

    result = {"layers": cfg.num_layers}
    grads, losses = {}, {}
    for kernel in ("dense", "segments"):
        os.environ[KERNEL_ENV] = kernel
        model.zero_grad(set_to_none=True)
        with count_host_reads() as reads:
            packed = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                           packed_seq_params=batch["packed_seq_params"]).reshape(-1)
        total = (packed * mask).sum() / mask.sum()
        total.backward()
        grads[kernel] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        losses[kernel] = packed.detach()
        per = [float((packed.detach()[a:b] * mask[a:b]).sum() / mask[a:b].sum())
               for a, b in zip(cu[:-1], cu[1:]) if mask[a:b].sum() > 0]
        result[kernel] = {"samples": len(per), "host_reads_in_forward": reads["n"],
                          "max_rel_diff_vs_alone": max(abs(p - a) / abs(a) for p, a in zip(per, alone))}
    result["grad_max_diff_segments_vs_dense"] = max(
        float((grads["segments"][n] - g).abs().max()) for n, g in grads["dense"].items())

    # megatron-core's own THD RoPE (plain PackedSeqParams): same losses, but host reads in every layer.
    p = batch["packed_seq_params"]
    plain = PackedSeqParams(qkv_format="thd", cu_seqlens_q=p.cu_seqlens_q, cu_seqlens_kv=p.cu_seqlens_kv,
                            max_seqlen_q=p.max_seqlen_q, max_seqlen_kv=p.max_seqlen_kv, cp_group=p.cp_group)
    with torch.no_grad(), count_host_reads() as reads:
        theirs = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                       packed_seq_params=plain).reshape(-1)
    result["megatron_thd_host_reads"] = reads["n"]
    result["loss_diff_megatron_rope"] = float((theirs - losses["dense"]).abs().max())
    Path(out_file).write_text(json.dumps(result, indent=1))
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
