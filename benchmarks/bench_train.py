"""Training-step throughput: our megatron-core step (`training.loop.train_step`: schedule, DDP, megatron
optimizer, clipping) against a plain `transformers` + `torch.optim.AdamW` loop, same model shape, same token
batches, same device, one process, in one run. Prints tokens/s of both and the ratio (and MFU on a GPU).

    python benchmarks/bench_train.py                       # CPU: small Qwen3-shaped model, fp32
    python benchmarks/bench_train.py --preset qwen3-1.7b   # GPU: Qwen3-1.7B shape, seq 4096, bf16
    python benchmarks/bench_train.py --lora 16             # LoRA (r 16 on qkv/proj/fc1/fc2) against full
                                                           # fine-tuning: tokens/s and peak memory of each
    python benchmarks/bench_train.py --dpo                 # DPO (sigmoid, beta 0.1): pairs/s of our step
                                                           # (`--stage dpo`) against a TRL-DPOTrainer-style loop
    python benchmarks/bench_train.py --packed              # packed rows (--reset-attention-mask) against the
                                                           # transformers loop on the same samples unpacked
    python benchmarks/bench_train.py --cp 2                # one long sequence per step (CPU 8192 tokens, GPU
                                                           # 32768) at CP 1 and CP 2 (Ulysses, torchrun): tokens/s
                                                           # and peak memory per rank, activations apart
    python benchmarks/bench_train.py --preset qwen3-30b-a3b-moe [--layers 1]
                                                           # Qwen3-MoE (128 experts, top-8, --moe-grouped-gemm)
                                                           # against Qwen3MoeForCausalLM: tokens/s, peak memory
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = {
    # layers, hidden, ffn, heads, kv groups, head dim, vocab, tied, seq, micro-batch, micro-batches
    "small": dict(layers=4, hidden=256, ffn=768, heads=4, groups=2, head_dim=64, vocab=2048, tied=False, seq=512,
                  mbs=4, nmb=2),
    "qwen3-1.7b": dict(layers=28, hidden=2048, ffn=6144, heads=16, groups=8, head_dim=128, vocab=151936, tied=True,
                       seq=4096, mbs=1, nmb=4),
    # Qwen3-30B-A3B's widths (a few layers, small vocabulary): routed experts, top-k, expert FFN width
    "qwen3-30b-a3b-moe": dict(layers=4, hidden=2048, ffn=6144, heads=32, groups=4, head_dim=128, vocab=8192,
                              tied=False, seq=2048, mbs=1, nmb=4, experts=128, topk=8, moe_ffn=768),
}
H100_BF16_PEAK = 989e12


def hf_config(p: dict):
    from transformers import Qwen3Config, Qwen3MoeConfig

    if p.get("experts"):
        return Qwen3MoeConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["ffn"],
                              moe_intermediate_size=p["moe_ffn"], num_experts=p["experts"],
                              num_experts_per_tok=p["topk"], norm_topk_prob=True, router_aux_loss_coef=0.001,
                              output_router_logits=True, num_hidden_layers=p["layers"],
                              num_attention_heads=p["heads"], num_key_value_heads=p["groups"],
                              head_dim=p["head_dim"], max_position_embeddings=p["seq"], rope_theta=1e6,
                              rms_norm_eps=1e-6, tie_word_embeddings=p["tied"], attention_dropout=0.0)
    return Qwen3Config(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["ffn"],
                       num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["groups"],
                       head_dim=p["head_dim"], max_position_embeddings=p["seq"], rope_theta=1e6, rms_norm_eps=1e-6,
                       tie_word_embeddings=p["tied"], attention_dropout=0.0)


def batches(p: dict, steps: int, seed: int = 0) -> list[list[dict]]:
    """`steps` iterations of `nmb` micro-batches: random tokens, the first quarter of each row unsupervised."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        it = []
        for _ in range(p["nmb"]):
            ids = torch.randint(0, p["vocab"], (p["mbs"], p["seq"]), generator=g)
            labels = ids.clone()
            labels[:, : p["seq"] // 4] = -100
            it.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
        out.append(it)
    return out


# The kernel flags of MindSpeed's Qwen3 recipes: fused RMSNorm, SwiGLU and RoPE (--use-flash-attn: SDPA anyway).
KERNEL_FLAGS = ["--use-flash-attn", "--use-fused-rmsnorm", "--use-fused-swiglu", "--use-fused-rotary-pos-emb"]


def packed_batches(p: dict, steps: int, seed: int = 0) -> list[list[dict]]:
    """Like `batches`, each row packed with samples of random lengths (1/8 to 1/2 of the row), positions restarting
    in each, the first quarter of each sample unsupervised: the collator's packed (THD) micro-batch."""
    g = torch.Generator().manual_seed(seed)
    seq, out = p["seq"], []
    for _ in range(steps):
        it = []
        for _ in range(p["nmb"]):
            ids = torch.randint(0, p["vocab"], (p["mbs"], seq), generator=g)
            labels, positions, cu = ids.clone(), torch.empty_like(ids), [0]
            for r in range(p["mbs"]):
                start = 0
                while start < seq:
                    n = min(int(torch.randint(seq // 8, seq // 2 + 1, (1,), generator=g)), seq - start)
                    labels[r, start:start + n // 4] = -100
                    positions[r, start:start + n] = torch.arange(n)
                    start += n
                    cu.append(r * seq + start)
            cu_seqlens = torch.tensor(cu, dtype=torch.int32)
            it.append({"input_ids": ids, "labels": labels, "position_ids": positions, "cu_seqlens": cu_seqlens,
                       "max_seqlen": int((cu_seqlens[1:] - cu_seqlens[:-1]).max())})
        out.append(it)
    return out


def unpacked(b: dict) -> dict:
    """The samples of a packed micro-batch as one right-padded batch (the transformers loop's per-sample
    attention)."""
    cu = b["cu_seqlens"].tolist()
    ids, labels = b["input_ids"].reshape(-1), b["labels"].reshape(-1)
    longest = max(e - s for s, e in zip(cu[:-1], cu[1:]))
    out = {"input_ids": torch.zeros(len(cu) - 1, longest, dtype=torch.int64),
           "labels": torch.full((len(cu) - 1, longest), -100, dtype=torch.int64),
           "attention_mask": torch.zeros(len(cu) - 1, longest, dtype=torch.int64)}
    for i, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        out["input_ids"][i, : e - s] = ids[s:e]
        out["labels"][i, : e - s] = labels[s:e]
        out["attention_mask"][i, : e - s] = 1
    return out


def flop_terms(p: dict, it: list[dict]) -> list[tuple[int, int, float]]:
    """(rows, length, attention density) per micro-batch, as the training log counts them."""
    terms = []
    for b in it:
        rows, density = b["input_ids"].shape[0], 0.5
        if "cu_seqlens" in b:
            seg = (b["cu_seqlens"][1:] - b["cu_seqlens"][:-1]).double()
            density = 0.5 * float((seg ** 2).sum()) / (rows * p["seq"] ** 2)
        terms.append((rows, p["seq"], density))
    return terms


def our_argv(p: dict, bf16: bool, lora: int = 0, fused: bool = True, dpo: bool = False, cp: int = 1) -> list[str]:
    argv = (f"--num-layers {p['layers']} --hidden-size {p['hidden']} --ffn-hidden-size {p['ffn']} "
            f"--num-attention-heads {p['heads']} --group-query-attention --num-query-groups {p['groups']} "
            f"--kv-channels {p['head_dim']} --qk-layernorm --norm-epsilon 1e-6 --swiglu --disable-bias-linear "
            f"--rotary-base 1000000 --max-position-embeddings {p['seq']} --padded-vocab-size {p['vocab']} "
            f"--hidden-dropout 0 --attention-dropout 0 --micro-batch-size {p['mbs']} "
            f"--global-batch-size {p['mbs'] * p['nmb']} --train-iters 1000 --lr 1e-5 --min-lr 1e-5 "
            f"--weight-decay 0.1 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95 --seq-length {p['seq']} "
            f"--data-path unused --is-instruction-dataset --use-distributed-optimizer").split()
    if not p["tied"]:
        argv.append("--untie-embeddings-and-output-weights")
    if p.get("experts"):      # the MoE recipes' flags (tune_qwen3_30b_a3b_4K_full_ptd)
        argv += (f"--num-experts {p['experts']} --moe-router-topk {p['topk']} --moe-ffn-hidden-size {p['moe_ffn']} "
                 f"--norm-topk-prob --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 0.001 "
                 f"--moe-grouped-gemm --moe-token-dispatcher-type alltoall").split()
    if bf16:
        argv.append("--bf16")
    argv += KERNEL_FLAGS if fused else ["--no-gradient-accumulation-fusion"]
    if lora:      # the adapters go on a base model: --load must name a directory (nothing is read from it here)
        argv += ["--lora-r", str(lora), "--lora-alpha", str(2 * lora), "--lora-target-modules", "linear_qkv",
                 "linear_proj", "linear_fc1", "linear_fc2", "--load", tempfile.mkdtemp(prefix="bench_lora_")]
    if dpo:       # --load must name a directory; the reference is copied from the policy's start instead
        argv += ["--stage", "dpo", "--is-pairwise-dataset", "--load", tempfile.mkdtemp(prefix="bench_dpo_")]
    if cp > 1:
        argv += ["--context-parallel-size", str(cp), "--context-parallel-algo", CP_ALGO]
    return argv


def run_ours(p: dict, data: list, warmup: int, bf16: bool, lora: int = 0, fused: bool = True,
             dpo: bool = False, cp: int = 1, memory: dict | None = None) -> tuple[float, dict]:
    """(seconds for the timed iterations, FLOPs per iteration counting attention as causal / packed and as full).
    With `dpo`, each micro-batch of `data` holds the chosen rows then the rejected rows, and a frozen copy of the
    starting weights is the reference. With `cp` > 1 this is one rank of a torchrun world of `cp` processes.
    `memory`, when given, receives the memory in use once the warm-up is done ("base": weights, gradients,
    optimizer state) and the peak of the timed iterations ("peak"; on CPU the process's peak resident size)."""
    from mindspeed_llm.arguments import parse_train_args
    from mindspeed_llm.platform import current_device, init_distributed
    from mindspeed_llm.training import model_setup
    from mindspeed_llm.training.batching import get_batch
    from mindspeed_llm.training.data import MicroBatches
    from mindspeed_llm.training.log import flops_per_iteration
    from mindspeed_llm.training.loop import train_step
    from mindspeed_llm.training.objectives import DPOObjective, SFTObjective
    from mindspeed_llm.training.resolve_run import resolve_run

    packed = "cu_seqlens" in data[0][0]
    run = resolve_run(parse_train_args(our_argv(p, bf16, lora, fused, dpo, cp)), world_size=cp,
                      tokenizer_len=p["vocab"])
    if packed:        # the batches here are packed rows already (THD)
        run = dataclasses.replace(run, data=dataclasses.replace(run.data, reset_attention_mask=True))
    cfg = run.model
    init_distributed(1, 1, seed=1234, context_parallel_size=cp)
    chunks = model_setup.build_chunks(run)
    objective = SFTObjective(run)
    if dpo:
        from mindspeed_llm.training.objectives.dpo import freeze

        reference = model_setup.build_chunks(run, lora=False)
        for ref, policy in zip(reference, chunks):
            ref.load_state_dict(policy.state_dict())
        objective = DPOObjective(run, freeze(run.layers, reference))
    model = model_setup.wrap_ddp(run, chunks)
    optimizer, _ = model_setup.build_optimizer(run, model)
    device = current_device()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = 0.0
    for i, it in enumerate(data):
        if i == warmup:
            sync()
            if memory is not None:
                memory["base"] = memory_in_use()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
        inputs = [get_batch(b, device) for b in it]
        if packed:      # THD: the micro-batch's rows are flattened into one
            mb = MicroBatches(inputs, p["seq"] * p["mbs"], 1, 0, flop_terms(p, it))
        else:
            mb = MicroBatches(inputs, p["seq"], it[0]["input_ids"].shape[0], 0, flop_terms(p, it))
        train_step(run, model, optimizer, mb, objective)
    sync()
    seconds = time.perf_counter() - start
    if memory is not None:
        memory["peak"] = peak_memory()
    del model, optimizer, objective
    timed = data[warmup:]
    scale = 4 / 3 if dpo else 1     # DPO adds the reference's forward pass: a third of a forward + backward
    flops = {"causal": scale * sum(flops_per_iteration(cfg, flop_terms(p, it), True) for it in timed) / len(timed),
             "full": scale * sum(flops_per_iteration(cfg, [(r, s, 1.0) for r, s, _ in flop_terms(p, it)], True)
                                 for it in timed) / len(timed)}
    return seconds, flops


def hf_sequence_logps(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label) over the supervised (labels != -100) next-token positions, per row (TRL's logps)."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    target = labels[:, 1:]
    token_logps = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * (target != -100)).sum(-1)


def hf_dpo_loss(model, reference, ids: torch.Tensor, labels: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """TRL DPOTrainer's sigmoid loss: chosen and rejected rows in one batch, reference log-probs without grad."""
    b = ids.shape[0] // 2
    logps = hf_sequence_logps(model, ids, labels)
    with torch.no_grad():
        ref = hf_sequence_logps(reference, ids, labels)
    logits = (logps[:b] - logps[b:]) - (ref[:b] - ref[b:])
    return -torch.nn.functional.logsigmoid(beta * logits).mean()


def run_hf(p: dict, data: list, warmup: int, bf16: bool, dpo: bool = False) -> float:
    from transformers import AutoModelForCausalLM

    from mindspeed_llm.platform import current_device

    device = current_device()
    model = AutoModelForCausalLM.from_config(hf_config(p), dtype=torch.float32, attn_implementation="sdpa").to(device)
    model.train()
    reference = copy.deepcopy(model).eval().requires_grad_(False) if dpo else None
    decay = [q for n, q in model.named_parameters() if q.ndim > 1]
    no_decay = [q for n, q in model.named_parameters() if q.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-5, betas=(0.9, 0.95), eps=1e-8)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    start = 0.0
    for i, it in enumerate(data):
        if i == warmup:
            sync()
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for b in it:
            with autocast:
                b = {k: v.to(device) for k, v in (unpacked(b) if "cu_seqlens" in b else b).items()}
                loss = hf_dpo_loss(model, reference, b["input_ids"], b["labels"]) if dpo else model(**b).loss
            (loss / len(it)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    sync()
    return time.perf_counter() - start


def peak_memory() -> int:
    """Peak bytes of this process: allocated on the GPU, resident on the CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_in_use() -> int:
    """Bytes in use now: allocated on the GPU, resident on the CPU."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated()
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


CP_ALGO = "ulysses_cp_algo"      # the long-context recipes' algorithm


def cp_child(p: dict, cp: int, warmup: int, steps: int, bf16: bool) -> None:
    """One rank of the --cp comparison (under torchrun): one sequence per step; rank 0 prints every rank's
    memory and the tokens/s."""
    data = batches(p, warmup + steps)
    memory: dict = {}
    seconds, _ = run_ours(p, data, warmup, bf16, cp=cp, memory=memory)
    ranks = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(ranks, memory)
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps({"tokens_per_s": steps * p["seq"] / seconds, "ranks": ranks}), flush=True)
    torch.distributed.destroy_process_group()


def child_result(argv: list[str]) -> dict:
    """Run one child measurement (a fresh process, so peak memory is its own) and return its RESULT line."""
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])


def cp_comparison(a: argparse.Namespace, p: dict) -> None:
    """CP 1 (one process) and CP `a.cp` (a.cp processes) on the same long sequences, each a torchrun launch."""
    gpu = torch.cuda.is_available()
    results = {}
    for cp in (1, a.cp):
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cp),
                __file__, "--cp-child", str(cp), "--warmup", str(a.warmup), "--seq", str(p["seq"])]
        argv += [f"--{k}={v}" for k, v in (("preset", a.preset), ("steps", a.steps)) if v]
        results[cp] = child_result(argv)
    device = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores shared by the ranks)"
    print(f"device: {device}; model: {a.preset or ('qwen3-1.7b' if gpu else 'small')} "
          f"(layers {p['layers']}, hidden {p['hidden']}, heads {p['heads']}/{p['groups']}); one sequence of "
          f"{p['seq']} tokens per step; {CP_ALGO}; {'bf16' if gpu else 'fp32'}; peak memory per rank: "
          f"{'allocated' if gpu else 'resident'}; activations = peak - in use after the warm-up (weights, grads, "
          f"optimizer state)")
    activation = {}
    for cp, r in results.items():
        peak = max(m["peak"] for m in r["ranks"])
        activation[cp] = max(m["peak"] - m["base"] for m in r["ranks"])
        print(f"CP {cp}: {r['tokens_per_s']:10.1f} tokens/s, peak memory per rank {peak / 2**20:9.1f} MiB, "
              f"activations {activation[cp] / 2**20:9.1f} MiB")
    print(f"CP {a.cp} / CP 1: {results[a.cp]['tokens_per_s'] / results[1]['tokens_per_s']:.2f}x tokens/s, "
          f"{activation[a.cp] / activation[1]:.2f}x activation memory per rank (1/{a.cp} = {1 / a.cp:.2f})")


def moe_vs_transformers(a: argparse.Namespace) -> None:
    """The MoE preset: the transformers Qwen3MoeForCausalLM loop and our step, each in a fresh process (so peak
    memory is its own), on the same batches."""
    results = {}
    for mode in ("hf", "ours"):
        argv = [sys.executable, __file__, "--child", mode, "--warmup", str(a.warmup), f"--preset={a.preset}"]
        argv += [f"--{k}={v}" for k, v in (("steps", a.steps), ("seq", a.seq), ("layers", a.layers)) if v]
        results[mode] = child_result(argv)
    gpu = torch.cuda.is_available()
    p = {**PRESETS[a.preset], **({"seq": a.seq} if a.seq else {}), **({"layers": a.layers} if a.layers else {})}
    print(f"device: {torch.cuda.get_device_name() if gpu else f'CPU ({torch.get_num_threads()} threads)'}; "
          f"model: {a.preset} {p}; {'bf16' if gpu else 'fp32'}; peak memory: {'allocated' if gpu else 'resident'}")
    for mode, name in (("hf", "transformers Qwen3MoeForCausalLM + AdamW"), ("ours", "ours (megatron-core MoE)")):
        r = results[mode]
        print(f"{name:42s}: {r['tokens_per_s']:10.1f} tokens/s, peak memory {r['peak'] / 2**20:9.1f} MiB")
    print(f"ratio ours / transformers: {results['ours']['tokens_per_s'] / results['hf']['tokens_per_s']:.2f}x "
          f"tokens/s, {results['ours']['peak'] / results['hf']['peak']:.2f}x peak memory")


def lora_vs_full(a: argparse.Namespace) -> None:
    """Full fine-tuning and LoRA, each in a fresh process (so peak memory is its own), on the same batches."""
    results = {}
    for mode in ("full", "lora"):
        argv = [sys.executable, __file__, "--child", mode, "--lora", str(a.lora), "--warmup", str(a.warmup)]
        argv += [f"--{k}={v}" for k, v in (("preset", a.preset), ("steps", a.steps), ("seq", a.seq)) if v]
        results[mode] = child_result(argv)
    gpu = torch.cuda.is_available()
    model = a.preset or ("qwen3-1.7b" if gpu else "small")
    print(f"device: {torch.cuda.get_device_name() if gpu else 'CPU'}; model: {model}; "
          f"LoRA r={a.lora} alpha={2 * a.lora} on linear_qkv linear_proj linear_fc1 linear_fc2; "
          f"peak memory: {'allocated' if gpu else 'resident'}")
    for mode, r in results.items():
        print(f"{mode:5s}: {r['tokens_per_s']:12.1f} tokens/s, peak memory {r['peak'] / 2**20:9.1f} MiB")
    print(f"ratio lora / full: {results['lora']['tokens_per_s'] / results['full']['tokens_per_s']:.2f}x tokens/s, "
          f"{results['lora']['peak'] / results['full']['peak']:.2f}x peak memory")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="default: qwen3-1.7b on a GPU, small on CPU")
    ap.add_argument("--steps", type=int, default=None, help="timed iterations (default 5 CPU, 10 GPU)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seq", type=int, default=None, help="override the preset's sequence length")
    ap.add_argument("--lora", type=int, default=0, metavar="R", help="compare LoRA of rank R with full fine-tuning")
    ap.add_argument("--dpo", action="store_true",
                    help="DPO: pairs/s against a TRL-DPOTrainer-style transformers loop (micro-batch = pairs)")
    ap.add_argument("--packed", action="store_true",
                    help="packed rows (--reset-attention-mask) against the transformers loop on the same samples "
                         "unpacked (right-padded, attention inside each sample)")
    ap.add_argument("--unfused", action="store_true",
                    help="also time our step without the recipes' kernel flags and gradient-accumulation fusion")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--cp", type=int, default=0, metavar="N",
                    help="one long sequence per step at context-parallel size 1 and N (N processes): tokens/s "
                         "and peak memory per rank")
    ap.add_argument("--cp-child", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["full", "lora", "hf", "ours"], default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.cp and (a.cp < 2 or a.dpo or a.lora or a.packed):
        ap.error("--cp N compares CP 1 with CP N >= 2 on plain sequences: use it without --dpo, --lora, --packed")
    if a.dpo and (a.lora or a.packed):
        ap.error("--dpo compares DPO steps on padded pairs: use it without --lora and --packed")
    if a.lora and a.child is None:
        return lora_vs_full(a)
    if a.preset and PRESETS[a.preset].get("experts") and a.child is None:
        if a.dpo or a.lora or a.packed:
            ap.error(f"--preset {a.preset} compares plain MoE training steps: use it without --dpo/--lora/--packed")
        return moe_vs_transformers(a)
    os.environ.setdefault("MINDSPEED_DEVICE", "" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.is_available()
    p = dict(PRESETS[a.preset or ("qwen3-1.7b" if gpu else "small")])
    if a.seq:
        p["seq"] = a.seq
    if a.layers:
        p["layers"] = a.layers
    bf16 = gpu
    steps = a.steps or (10 if gpu else 5)
    if a.cp or a.cp_child:      # one long sequence per step
        p.update(mbs=1, nmb=1, seq=a.seq or (32768 if gpu else 8192))
        if a.cp:
            return cp_comparison(a, p)
        return cp_child(p, a.cp_child, a.warmup, steps, bf16)
    if a.dpo:       # a micro-batch of mbs pairs is 2 x mbs rows, the chosen ones then the rejected ones
        data = batches({**p, "mbs": 2 * p["mbs"]}, a.warmup + steps)
    else:
        data = (packed_batches if a.packed else batches)(p, a.warmup + steps)
    tokens = steps * p["nmb"] * p["mbs"] * p["seq"]
    count, unit = (steps * p["nmb"] * p["mbs"], "pairs") if a.dpo else (tokens, "tokens")
    if a.child:
        seconds = (run_hf(p, data, a.warmup, bf16) if a.child == "hf" else
                   run_ours(p, data, a.warmup, bf16, a.lora if a.child == "lora" else 0)[0])
        print("RESULT " + json.dumps({"tokens_per_s": tokens / seconds, "peak": peak_memory()}))
        return
    peaks = {}
    hf_s = run_hf(p, data, a.warmup, bf16, a.dpo)
    if gpu:
        peaks["hf"] = torch.cuda.max_memory_allocated()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    ours_s, flops = run_ours(p, data, a.warmup, bf16, dpo=a.dpo)
    if gpu:
        peaks["ours"] = torch.cuda.max_memory_allocated()
    unfused_s = run_ours(p, data, a.warmup, bf16, fused=False, dpo=a.dpo)[0] if a.unfused else None
    device = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device}; model: {a.preset or ('qwen3-1.7b' if gpu else 'small')} {p}; "
          f"{'bf16' if bf16 else 'fp32'}; {steps} timed iterations{'; DPO sigmoid, beta 0.1' if a.dpo else ''}")
    print(f"transformers + AdamW{' (TRL-style DPO)' if a.dpo else ''} : {count / hf_s:12.1f} {unit}/s")
    print(f"ours (megatron-core{', --stage dpo' if a.dpo else ''})  : {count / ours_s:12.1f} {unit}/s")
    if unfused_s:
        print(f"ours, unfused layers : {count / unfused_s:12.1f} {unit}/s   (fused / unfused: "
              f"{unfused_s / ours_s:.2f}x)")
    if gpu:
        # Megatron's formula (fwd + bwd, 6 x params x tokens + attention); "full" counts every query-key pair
        # (Megatron-LM's logged TFLOP/s), "causal" only those attended (half, or sum(len^2)/2 when packed).
        for kind in ("full", "causal"):
            mfu, mfu_hf = (flops[kind] * steps / t / H100_BF16_PEAK for t in (ours_s, hf_s))
            print(f"MFU ({kind} attention FLOPs, H100 bf16 peak 989 TFLOP/s): ours {100 * mfu:.1f}%  "
                  f"transformers {100 * mfu_hf:.1f}%")
    memory = (f"; peak memory allocated ours {peaks['ours'] / 2**30:.2f} GiB, transformers "
              f"{peaks['hf'] / 2**30:.2f} GiB" if gpu else "")
    print(f"ratio ours / transformers: {hf_s / ours_s:.2f}x{memory}")


if __name__ == "__main__":
    main()
