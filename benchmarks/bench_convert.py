"""Benchmark convert_ckpt.py on a random Qwen3-shaped checkpoint: wall time and peak RSS of hf -> mg (TP/PP) and
mg -> hf, against a baseline of loading the whole model with transformers (`AutoModelForCausalLM.from_pretrained`).

    python benchmarks/bench_convert.py                       # Qwen3-1.7B shape, bf16 (~4 GB on disk), TP2 PP2
    python benchmarks/bench_convert.py --preset small        # a quick ~100 MB run
    python benchmarks/bench_convert.py --layers 8 --hidden 1024 --ffn 3072 --tp 2 --pp 2 --workdir /data/bench

Every phase (including generating the checkpoint) runs in its own fresh process spawned by a lean parent, and
reports its wall time (imports included), its peak RSS (ru_maxrss, which counts file pages mapped by safetensors /
torch.load mmap as well as anonymous memory) and its peak RssAnon. File-backed clean pages are reclaimable, so a
model larger than RAM still converts as long as the anonymous peak fits; the kernel keeps no high-water mark for
anonymous memory alone, so the parent samples the child's /proc/PID/status every few milliseconds (a plateau that
lasts a millisecond or more is seen; the buffers that make up a rank file live for seconds). The numbers of one
phase do not include another. The printed ratios compare each conversion with the transformers load.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRESETS = {
    # Qwen3-1.7B: 28 layers, hidden 2048, 16 heads / 8 KV heads, head_dim 128, ffn 6144, vocab 151936, tied.
    "qwen3-1.7b": dict(layers=28, hidden=2048, heads=16, kv_heads=8, head_dim=128, ffn=6144, vocab=151936, tied=True),
    "small": dict(layers=4, hidden=512, heads=8, kv_heads=4, head_dim=64, ffn=1536, vocab=32000, tied=True),
}


def write_random_checkpoint(out: Path, shape: dict, dtype: str = "bfloat16", random: bool = True) -> int:
    """A random Qwen3 checkpoint written one layer per shard (never the whole model in memory); returns bytes.

    `random=False` fills each tensor with its own constant instead (fast; for tests that need only the sizes)."""
    import torch
    from safetensors.torch import save_file

    from mindspeed_llm.tiny import build_tokenizer, hf_config

    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    cfg = hf_config("qwen3", vocab_size=shape["vocab"], num_layers=shape["layers"], hidden_size=shape["hidden"],
                    num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                    head_dim=shape["head_dim"], intermediate_size=shape["ffn"],
                    tie_word_embeddings=shape["tied"], dtype=dtype, max_position_embeddings=40960)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tdt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    g = torch.Generator().manual_seed(0)
    h, f, hd, nh, ng, v = (shape[k] for k in ("hidden", "ffn", "head_dim", "heads", "kv_heads", "vocab"))

    filled = [0]

    def rnd(*s):
        if not random:
            filled[0] += 1
            return torch.full(s, filled[0] * 1e-3, dtype=tdt)
        return (torch.randn(*s, generator=g) * 0.02).to(tdt)

    n = shape["layers"]
    files = n + 2
    weight_map, total = {}, 0

    def dump(k: int, tensors: dict) -> None:
        nonlocal total
        name = f"model-{k:05d}-of-{files:05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()

    dump(1, {"model.embed_tokens.weight": rnd(v, h)})
    for i in range(n):
        p = f"model.layers.{i}."
        dump(i + 2, {p + "input_layernorm.weight": torch.ones(h, dtype=tdt),
                     p + "post_attention_layernorm.weight": torch.ones(h, dtype=tdt),
                     p + "self_attn.q_proj.weight": rnd(nh * hd, h), p + "self_attn.k_proj.weight": rnd(ng * hd, h),
                     p + "self_attn.v_proj.weight": rnd(ng * hd, h), p + "self_attn.o_proj.weight": rnd(h, nh * hd),
                     p + "self_attn.q_norm.weight": torch.ones(hd, dtype=tdt),
                     p + "self_attn.k_norm.weight": torch.ones(hd, dtype=tdt),
                     p + "mlp.gate_proj.weight": rnd(f, h), p + "mlp.up_proj.weight": rnd(f, h),
                     p + "mlp.down_proj.weight": rnd(h, f)})
    last = {"model.norm.weight": torch.ones(h, dtype=tdt)}
    if not shape["tied"]:
        last["lm_head.weight"] = rnd(v, h)
    dump(files, last)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


STATUS_FIELDS = ("RssAnon", "RssFile", "VmHWM")


def read_status(pid: int) -> dict[str, int]:
    """RssAnon / RssFile / VmHWM of `pid` in KiB ({} once the process is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in STATUS_FIELDS:
                    out[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return {}
    return out


def run_sampled(cmd: list[str], interval_s: float = 0.002, **popen) -> tuple[subprocess.CompletedProcess, dict]:
    """Run `cmd` to completion while sampling its /proc status; returns (result, peak KiB per field).

    Sampling from outside keeps the child's GIL and allocator untouched; stdout/stderr go to temporary files so a
    chatty child can never block on a full pipe while the parent samples.
    """
    peak = dict.fromkeys(STATUS_FIELDS, 0)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, **popen)
        while proc.poll() is None:
            for key, value in read_status(proc.pid).items():
                peak[key] = max(peak[key], value)
            time.sleep(interval_s)
        out.seek(0), err.seek(0)
        result = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
    return result, peak


def phase(name: str, argv: list[str]) -> dict:
    """Run `bench_convert.py --phase name argv...` in a fresh process and return its report."""
    proc, peak = run_sampled([sys.executable, __file__, "--phase", name, *argv], cwd=REPO,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["peak_anon_mib"] = peak["RssAnon"] / 1024
    report["peak_file_mib"] = peak["RssFile"] / 1024
    return report


def run_phase(name: str, argv: list[str]) -> None:
    start = time.perf_counter()
    if name == "generate":
        shape = json.loads(argv[1])
        print(json.dumps({"bytes": write_random_checkpoint(Path(argv[0]), shape)}))
        return
    if name == "baseline":
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(argv[0], dtype=torch.bfloat16)
        assert sum(p.numel() for p in model.parameters()) > 0
    elif name == "convert":
        from mindspeed_llm.checkpoint.cli import main

        with open(os.devnull, "w") as devnull:
            saved, sys.stdout = sys.stdout, devnull
            try:
                rc = main(argv)
            finally:
                sys.stdout = saved
        if rc != 0:
            raise SystemExit(rc)
    else:
        raise SystemExit(f"unknown phase {name}")
    wall = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"wall_s": wall, "peak_rss_mib": peak_kib / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-1.7b")
    for key in ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab"):
        ap.add_argument("--" + key.replace("_", "-"), type=int, default=None, help=f"override the preset's {key}")
    ap.add_argument("--untied", action="store_true", help="untied embeddings (adds lm_head)")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None, help="where to write the checkpoints (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args, rest = ap.parse_known_args()
    if args.phase:
        run_phase(args.phase, rest)
        return
    shape = dict(PRESETS[args.preset])
    for key in ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    if args.untied:
        shape["tied"] = False
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_convert."))
    work.mkdir(parents=True, exist_ok=True)
    hf, mg, back = work / "hf", work / "mg", work / "hf_back"
    try:
        t0 = time.perf_counter()
        size = phase("generate", [str(hf), json.dumps(shape)])["bytes"]   # keeps this process small: children
        # inherit the parent's RSS high-water mark at fork, which would otherwise inflate their ru_maxrss
        print(f"model: {shape} bf16, {size / 2**30:.2f} GiB of weights (written in {time.perf_counter() - t0:.0f}s)")
        base = phase("baseline", [str(hf)])
        to_mg = phase("convert", ["--load-dir", str(hf), "--save-dir", str(mg), "--target-tensor-parallel-size",
                                  str(args.tp), "--target-pipeline-parallel-size", str(args.pp)])
        to_hf = phase("convert", ["--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", str(mg),
                                  "--save-dir", str(back), "--hf-cfg-dir", str(hf)])
        rows = [("transformers from_pretrained (baseline)", base), (f"hf -> mg TP{args.tp} PP{args.pp}", to_mg),
                ("mg -> hf", to_hf)]
        print(f"{'phase':<42}{'wall s':>8}{'peak RSS MiB':>14}{'peak anon MiB':>15}{'time/base':>11}"
              f"{'RSS/base':>10}{'anon/base':>11}")
        for label, r in rows:
            print(f"{label:<42}{r['wall_s']:>8.1f}{r['peak_rss_mib']:>14.0f}{r['peak_anon_mib']:>15.0f}"
                  f"{r['wall_s'] / base['wall_s']:>11.2f}{r['peak_rss_mib'] / base['peak_rss_mib']:>10.2f}"
                  f"{r['peak_anon_mib'] / base['peak_anon_mib']:>11.2f}")
        print(f"(peak anon = sampled peak RssAnon; file-backed pages of mmapped inputs make up the rest of the RSS "
              f"and are reclaimable)")
        print(json.dumps({"shape": shape, "weights_gib": size / 2**30, "baseline": base, "hf2mg": to_mg,
                          "mg2hf": to_hf}))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
