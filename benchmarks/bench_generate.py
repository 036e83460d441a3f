"""Benchmark generation: decode tokens/s of our megatron-core engine (KV cache, greedy) against
`transformers.generate` on the same model, weights, prompts and device, in one process; prints the ratio.

    python benchmarks/bench_generate.py                         # Qwen3-1.7B shape on a GPU, a small shape on CPU
    python benchmarks/bench_generate.py --preset small --batch 4 --prompt-len 64 --new-tokens 64
    python benchmarks/bench_generate.py --preset qwen3-1.7b --dtype bf16 --batch 8

Random weights (shape is all that matters for speed). Both sides generate exactly --new-tokens per row (no stop
token); decode time = time(prompt -> N tokens) - time(prompt -> 1 token), so prefill is excluded from the rate.
Each measurement is the best of --repeats runs after a warm-up.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRESETS = {
    # Qwen3-1.7B: 28 layers, hidden 2048, 16 heads / 8 KV heads, head_dim 128, ffn 6144, vocab 151936, tied.
    "qwen3-1.7b": dict(layers=28, hidden=2048, heads=16, kv_heads=8, head_dim=128, ffn=6144, vocab=151936, tied=True),
    "small": dict(layers=4, hidden=512, heads=8, kv_heads=4, head_dim=64, ffn=1536, vocab=32000, tied=True),
    "tiny": dict(layers=4, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=448, tied=False),
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def hf_config(shape: dict, dtype: str) -> dict:
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": shape["hidden"],
            "intermediate_size": shape["ffn"], "num_hidden_layers": shape["layers"],
            "num_attention_heads": shape["heads"], "num_key_value_heads": shape["kv_heads"],
            "head_dim": shape["head_dim"], "vocab_size": shape["vocab"], "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": shape["tied"],
            "hidden_act": "silu", "attention_bias": False, "torch_dtype": DTYPES[dtype], "use_cache": True}


def build_models(shape: dict, dtype: str):
    """(transformers model, our GPTModel stage) with identical random weights on the current device."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from mindspeed_llm.checkpoint.mapping import chunk_state_dict
    from mindspeed_llm.models import build_model, get_family
    from mindspeed_llm.models.family import DictSource
    from mindspeed_llm.platform import current_device

    torch_dtype = getattr(torch, DTYPES[dtype])
    cfg_dict = hf_config(shape, dtype)
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(Qwen3Config(**cfg_dict)).to(dtype=torch_dtype, device=current_device()).eval()
    fam = get_family("qwen3")
    cfg = fam.config(cfg_dict)
    ours = build_model(cfg, params_dtype=torch_dtype, parallel_output=False)[0]
    src = DictSource({k: v.detach() for k, v in hf.state_dict().items()})
    sd = chunk_state_dict(fam, cfg, src, 0, 1, range(cfg.num_layers), first=True, last=True)
    ours.load_state_dict(sd, strict=False)   # strict=False: megatron's extra _extra_state entries
    return hf, ours


def best_time(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: qwen3-1.7b on GPU, small on CPU")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()

    import torch

    from mindspeed_llm.inference.comm import ReplicaBroadcast
    from mindspeed_llm.inference.decode import DecodeStage
    from mindspeed_llm.inference.generation import StopCriteria, generate
    from mindspeed_llm.inference.sampling import SamplingParams
    from mindspeed_llm.platform import current_device, detect_platform, init_distributed

    plat = init_distributed(1, 1, backend=None, seed=0)
    gpu = not plat.is_cpu
    preset = a.preset or ("qwen3-1.7b" if gpu else "small")
    dtype = a.dtype or ("bf16" if gpu else "fp32")
    shape = PRESETS[preset]
    hf, ours = build_models(shape, dtype)
    device = current_device()
    sync = (lambda: getattr(torch, plat.device_type).synchronize()) if gpu else (lambda: None)
    prompts = torch.randint(0, shape["vocab"], (a.batch, a.prompt_len), generator=torch.Generator().manual_seed(1))
    step, bcast = DecodeStage(ours), ReplicaBroadcast()
    never = StopCriteria(frozenset())

    def run_ours(n: int):
        return generate(step, prompts.tolist(), max_new_tokens=n, params=SamplingParams(), stop=never, pad_id=0,
                        broadcast=bcast, use_cache=True)

    def run_hf(n: int):
        with torch.no_grad():
            return hf.generate(prompts.to(device), attention_mask=torch.ones_like(prompts, device=device),
                               do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                               pad_token_id=0)

    same = run_ours(8).outputs == run_hf(8)[:, a.prompt_len:].tolist()
    n = a.new_tokens
    rates = {}
    for name, fn in (("ours", run_ours), ("transformers", run_hf)):
        full = best_time(lambda: fn(n), a.repeats, sync)
        first = best_time(lambda: fn(1), a.repeats, sync)
        rates[name] = a.batch * (n - 1) / max(full - first, 1e-9)
        print(f"{name:>12}: prompt->1 token {first * 1e3:8.1f} ms, prompt->{n} tokens {full * 1e3:8.1f} ms, "
              f"decode {rates[name]:10.1f} tokens/s")
    print(f"device {detect_platform().device_type} ({torch.cuda.get_device_name() if gpu else 'cpu'}), preset "
          f"{preset}, {dtype}, batch {a.batch}, prompt {a.prompt_len}, new tokens {n}; first 8 greedy tokens "
          f"identical: {same}")
    print(f"decode tokens/s ratio ours / transformers: {rates['ours'] / rates['transformers']:.2f}")


if __name__ == "__main__":
    main()
