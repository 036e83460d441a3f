"""torchrun script (2 or 4 processes): context-parallel core attention against full causal attention (unpacked, and
packed rows split per sample), then training runs.

Usage: torchrun --nproc_per_node N tests/dist_cp_checks.py PLAN.json OUT.json [CP]
CP (default 2) sets the size the attention cases run at; CP 4 adds hybrid_cp_algo with Ulysses degree 2.
PLAN.json: [{"name", "argv"}, ...] training runs (tests/dist_train_checks.py `run_train`).
OUT.json (written by the last rank): {"attention": {case: max relative error}, "errors": {case: message},
name: {"losses", "grad_norms", ...}}.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.dist_train_checks import run_train  # noqa: E402


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def attention_case(algo: str, heads: int, groups: int, seq: int = 16, batch: int = 2, dim: int = 8) -> float:
    """The CP module on this rank's zig-zag chunks against full causal SDPA (forward and q/k/v gradients)."""
    from mindspeed_llm.models.context_parallel import cp_attention, split_batch_for_cp, context_parallel_group

    group = context_parallel_group()
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(seq, batch, n, dim, generator=gen, dtype=torch.float64)
               for n in (heads, groups, groups))
    grad_out = torch.randn(seq, batch, heads * dim, generator=gen, dtype=torch.float64)
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = F.scaled_dot_product_attention(*(x.permute(1, 2, 0, 3) for x in full), is_causal=True,
                                         enable_gqa=heads != groups, scale=dim ** -0.5)
    ref = ref.permute(2, 0, 1, 3).reshape(seq, batch, -1)
    ref.backward(grad_out)

    def mine(x: torch.Tensor) -> torch.Tensor:      # [s, ...] -> this rank's chunks, through the batch split
        flat = x.transpose(0, 1).reshape(x.shape[1], seq, -1)
        got = split_batch_for_cp({"tokens": flat, "labels": flat, "loss_mask": flat, "position_ids": flat,
                                  "attention_mask": None, "packed_seq_params": None}, group)["tokens"]
        return got.reshape(x.shape[1], -1, *x.shape[2:]).transpose(0, 1).contiguous()

    local = [mine(x).requires_grad_() for x in (q, k, v)]
    module = cp_attention(algo, group, heads, groups, dim ** -0.5)
    out = module(*local, 0.0)
    out.backward(mine(grad_out))
    errs = [rel_err(out, mine(ref))] + [rel_err(x.grad, mine(f.grad)) for x, f in zip(local, full)]
    return max(errs)


def packed_attention_case(algo: str, heads: int, groups: int, lengths: tuple = (5, 11, 3, 13),
                          dim: int = 8) -> float:
    """The CP module on this rank's part of a packed row (every sample padded and split zig-zag) against
    attention inside each sample of the whole row (forward and q/k/v gradients at the real tokens)."""
    from mindspeed_llm.models.context_parallel import (context_parallel_group, cp_attention, packed_cp_layout,
                                                       split_packed_batch_for_cp)
    from mindspeed_llm.models.packed import packed_attention, packed_seq_params

    group = context_parallel_group()
    cu = torch.tensor((0, *torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
    total = int(cu[-1])
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(total, n, dim, generator=gen, dtype=torch.float64) for n in (heads, groups, groups))
    grad_out = torch.randn(total, heads * dim, generator=gen, dtype=torch.float64)
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = packed_attention(*full, packed_seq_params(cu, max(lengths)), dim ** -0.5, kernel="dense")
    ref.reshape(total, -1).backward(grad_out)

    _, params = split_packed_batch_for_cp({"tokens": torch.zeros(1, total, dtype=torch.int64)}, {"tokens": 0}, cu,
                                          group, 1)
    source = torch.from_numpy(packed_cp_layout(cu, group.size(), group.rank(), 2 * group.size())[0])
    real = source >= 0

    def mine(x: torch.Tensor) -> torch.Tensor:      # this rank's rows of the padded row, zeros for padding
        out = x[source.clamp(min=0)].clone()
        out[~real] = 0
        return out

    local = [mine(x).requires_grad_() for x in (q, k, v)]
    out = cp_attention(algo, group, heads, groups, dim ** -0.5).forward_packed(*local, params, 0.0)
    out.backward(mine(grad_out))
    errs = [rel_err(out[real], mine(ref.reshape(total, -1))[real])]
    errs += [rel_err(x.grad[real], mine(f.grad)[real]) for x, f in zip(local, full)]
    return max(errs)


def main() -> None:
    from mindspeed_llm.errors import UserError
    from mindspeed_llm.models.context_parallel import context_parallel_group, cp_attention
    from mindspeed_llm.platform import init_distributed

    plan = json.loads(Path(sys.argv[1]).read_text())
    cp = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    init_distributed(context_parallel_size=cp, ulysses_degree_in_cp=2 if cp == 4 else None)
    out: dict = {"attention": {}, "errors": {}}
    algos = ("ulysses_cp_algo", "megatron_cp_algo") + (("hybrid_cp_algo",) if cp == 4 else ())
    for algo in algos:
        for heads, groups in ((4, 2), (4, 1)):
            out["attention"][f"{algo}_{heads}q{groups}kv"] = attention_case(algo, heads, groups)
            out["attention"][f"packed_{algo}_{heads}q{groups}kv"] = packed_attention_case(algo, heads, groups)
    if cp == 2:
        out["attention"]["ulysses_cp_algo_6q3kv"] = attention_case("ulysses_cp_algo", 6, 3)
        try:
            cp_attention("ulysses_cp_algo", context_parallel_group(), 3, 1, 1.0)
        except UserError as exc:
            out["errors"]["ulysses_3_heads"] = str(exc)
    for case in plan:
        out[case["name"]] = run_train(case["argv"])
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        Path(sys.argv[2]).write_text(json.dumps(out))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
