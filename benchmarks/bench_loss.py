"""Language-model loss, forward + backward on bf16 logits: our vocab-parallel cross entropy (`models.cross_entropy`,
no fp32 copy of the logits) against megatron-core's `tensor_parallel.vocab_parallel_cross_entropy`, same logits,
each in a fresh process so its peak memory is its own. Prints time, peak memory and the ratios.

    python benchmarks/bench_loss.py                    # Qwen3 vocabulary (151,936), 2048 tokens on CPU, 4096 on a GPU
    python benchmarks/bench_loss.py --tokens 8192
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def peak_memory() -> int:
    """Peak bytes of this process: allocated on the GPU, resident on the CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(impl: str, tokens: int, vocab: int, repeats: int) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from mindspeed_llm.models.cross_entropy import vocab_parallel_cross_entropy
    from mindspeed_llm.platform import current_device, init_distributed

    os.environ.setdefault("MINDSPEED_DEVICE", "" if torch.cuda.is_available() else "cpu")
    init_distributed(1, 1)
    device = current_device()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(tokens, 1, vocab, generator=g, dtype=torch.bfloat16).to(device).requires_grad_()
    target = torch.randint(0, vocab, (tokens, 1), generator=g).to(device)
    weights = torch.rand(tokens, 1, generator=g).to(device)
    group = ps.get_tensor_model_parallel_group()

    def loss_fn() -> torch.Tensor:
        if impl == "ours":
            return vocab_parallel_cross_entropy(logits, target, group)
        return tensor_parallel.vocab_parallel_cross_entropy(logits, target)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    base = peak_memory()
    times = []
    for _ in range(repeats + 1):
        logits.grad = None
        sync()
        start = time.perf_counter()
        loss = loss_fn()
        (loss * weights).sum().backward()
        sync()
        times.append(time.perf_counter() - start)
    return {"seconds": min(times[1:]), "peak": peak_memory(), "before": base,
            "loss": float((loss * weights).sum()), "grad_sum": float(logits.grad.float().abs().sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=None, help="sequence x micro-batch (default 4096 GPU, 2048 CPU)")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", choices=["ours", "megatron"], default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    tokens = a.tokens or (4096 if torch.cuda.is_available() else 2048)
    if a.child:
        print("RESULT " + json.dumps(child(a.child, tokens, a.vocab, a.repeats)))
        return
    results = {}
    for impl in ("megatron", "ours"):
        argv = [sys.executable, __file__, "--child", impl, "--tokens", str(tokens), "--vocab", str(a.vocab),
                "--repeats", str(a.repeats)]
        out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
        results[impl] = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
    gpu = torch.cuda.is_available()
    logits_mib = tokens * a.vocab * 2 / 2**20
    print(f"device: {torch.cuda.get_device_name() if gpu else 'CPU'}; bf16 logits [{tokens}, 1, {a.vocab}] "
          f"({logits_mib:.0f} MiB); peak memory: {'allocated' if gpu else 'resident'}")
    for impl, r in results.items():
        print(f"{impl:9s}: {1000 * r['seconds']:9.1f} ms fwd+bwd, peak memory {r['peak'] / 2**20:9.1f} MiB "
              f"(loss {r['loss']:.4f}, |grad| {r['grad_sum']:.4f})")
    m, o = results["megatron"], results["ours"]
    print(f"ratio ours / megatron-core: {m['seconds'] / o['seconds']:.2f}x speed, "
          f"{(o['peak'] - o['before']) / max(m['peak'] - m['before'], 1):.2f}x memory above the start")


if __name__ == "__main__":
    main()
