"""Preprocessing throughput: preprocess_data.py against a `datasets.map` + `apply_chat_template` baseline.

Both sides turn the same Alpaca records into ids and labels with the same tokenizer and the qwen3 format
(thinking off), in the same run. The baseline renders the prompt and the full conversation with the
tokenizer's chat template (two tokenizations per record), which is how a straightforward script does it.
Then JSONL files of two sizes (16x apart) check that preprocessing streams: peak RSS does not grow with input.

    python benchmarks/bench_preprocess.py [--records 20000] [--big-mb 512]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mindspeed_llm.demo_data import SYSTEM_PROMPT  # noqa: E402
from mindspeed_llm.tiny import build_tiny_model  # noqa: E402

SHARED_ALPACA = REPO.parent / "shared" / "datasets" / "alpaca_en_demo.json"


def records(n: int) -> list[dict]:
    """Real Alpaca records when ../shared is present (longer texts), else the synthetic demo tasks."""
    if SHARED_ALPACA.is_file():
        base = json.loads(SHARED_ALPACA.read_text())
    else:
        from mindspeed_llm.demo_data import generate_examples, to_alpaca

        base = [to_alpaca(e) for e in generate_examples(2000)]
    out = []
    while len(out) < n:
        out += [dict(r, system=SYSTEM_PROMPT) for r in base]
    return out[:n]


def baseline(rows: list[dict], tokenizer_dir: str, workers: int) -> float:
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)

    def encode(r):
        prompt = [{"role": "system", "content": r["system"]},
                  {"role": "user", "content": "\n".join(x for x in (r["instruction"], r["input"]) if x)}]
        full = prompt + [{"role": "assistant", "content": r["output"]}]
        p = tok.apply_chat_template(prompt, add_generation_prompt=True, enable_thinking=False, tokenize=True,
                                    return_dict=False)
        ids = tok.apply_chat_template(full, enable_thinking=False, tokenize=True, return_dict=False)
        return {"input_ids": ids, "labels": [-100] * len(p) + ids[len(p):]}

    ds = Dataset.from_list(rows)
    start = time.perf_counter()
    ds.map(encode, num_proc=workers if workers > 1 else None, remove_columns=ds.column_names,
           load_from_cache_file=False, keep_in_memory=True)
    return len(rows) / (time.perf_counter() - start)


def ours(data: Path, tokenizer_dir: str, workers: int, out_dir: Path) -> float:
    from mindspeed_llm.arguments import parse_preprocess_args
    from mindspeed_llm.data.preprocess import run

    import megatron.core.datasets.indexed_dataset  # noqa: F401  (import time is not throughput)

    args = parse_preprocess_args([
        "--input", str(data), "--tokenizer-name-or-path", tokenizer_dir, "--output-prefix", str(out_dir / "b"),
        "--handler-name", "AlpacaStyleInstructionHandler", "--prompt-type", "qwen3", "--enable-thinking", "false",
        "--map-keys", '{"system": "system"}', "--workers", str(workers), "--log-interval", "1000000"])
    start = time.perf_counter()
    summary = run(args)
    return summary.written / (time.perf_counter() - start)


def peak_rss_mib(tokenizer_dir: str, tmp: Path, megabytes: int) -> tuple[float, float]:
    """(input size MiB, peak RSS MiB of the largest process) for the CLI on a JSONL file of about `megabytes`.

    Measured from a fresh wrapper process, so only the CLI and its workers count.
    """
    path = tmp / f"big{megabytes}.jsonl"
    rows = records(1000)
    with path.open("w") as f:
        i = 0
        while f.tell() < megabytes * 2**20:
            f.write(json.dumps(rows[i % len(rows)]) + "\n")
            i += 1
    cmd = [sys.executable, "preprocess_data.py", "--input", str(path), "--tokenizer-name-or-path", tokenizer_dir,
           "--output-prefix", str(tmp / f"big{megabytes}"), "--handler-name", "AlpacaStyleInstructionHandler",
           "--prompt-type", "qwen3", "--workers", "2", "--log-interval", "1000000"]
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
               "stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], cwd=REPO, check=True, capture_output=True,
                         text=True).stdout
    return path.stat().st_size / 2**20, int(out.split()[-1]) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=20000)
    p.add_argument("--big-mb", type=int, default=512, help="size of the streaming check's input; 0 skips it")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tok = str(build_tiny_model(tmp / "model"))
        rows = records(a.records)
        data = tmp / "alpaca.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{len(rows)} records, tokenizer {tok}, {os.cpu_count()} cores")
        print(f"{'workers':>7} {'ours samples/s':>15} {'baseline samples/s':>19} {'ratio':>6}")
        for workers in (1, 2):
            mine = ours(data, tok, workers, tmp)
            base = baseline(rows, tok, workers)
            print(f"{workers:>7} {mine:>15.0f} {base:>19.0f} {mine / base:>6.2f}x")
        if a.big_mb:
            for mb in (max(a.big_mb // 16, 1), a.big_mb):
                size, peak = peak_rss_mib(tok, tmp, mb)
                print(f"streaming: input {size:6.0f} MiB -> peak RSS of the largest process {peak:5.0f} MiB")


if __name__ == "__main__":
    mp.set_start_method("fork", force=True)
    main()
