"""Preprocessing throughput: preprocess_data.py against LLaMA-Factory 0.9.5's own preprocessing, same run.

Both sides turn the same Alpaca JSONL file into ids and labels with the same tokenizer, the qwen3 template
(thinking off) and the same cutoff (our --seq-length = LF's cutoff_len), per worker count 1 and 2. The LF side
is the real LF 0.9.5 code (tests/lf_reference.py: wheel installed with --no-deps, imported in a worker process)
run as LF runs it: load_dataset, align_dataset, `dataset.map(SupervisedDatasetProcessor.preprocess_dataset,
batched=True, num_proc=workers)`. Timed from the file to the written dataset on both sides (ours: .bin/.idx, LF:
its Arrow cache files), in wall seconds and in CPU seconds of all the side's processes; the check lines compare
sample and token counts and the first samples' ids and labels. The ceiling line times the tokenizer alone on
exactly the texts our encoder tokenizes, twice: with the tokenizer's standard `encode` (what LF calls, through
transformers), and with our encoder's own text encoding (for byte-level BPE tokenizers with a known split: the
split in Python and a word cache, see mindspeed_llm/data/templates.py `_WordEncoder`; otherwise Rust calls without
offsets, ASCII text without the NFC normalizer, which does nothing to it): the first ratio is what LF's way of
calling the tokenizer allows, the second what ours does.
--repeat N alternates the two sides N times and keeps each side's best, which steadies the ratios on shared cores.
Two more lines break our CPU down: the main process (tokenizer load, fingerprint, reading, writing) against the
workers, and what one encoding process costs per sample while another runs at the same time against one after the
other (the same work: the difference is the cores', and it is in every 2-worker CPU figure).
Qwen's own vocabulary: build it with benchmarks/qwen_tokenizer.py (qwen.tiktoken ships in the dashscope wheel)
and pass the folder with --tokenizer.
Then JSONL files of two sizes (16x apart) check that preprocessing streams: peak RSS does not grow with input.

    python benchmarks/bench_preprocess.py [--records 20000] [--big-mb 512] [--tokenizer DIR [--skip-tiny]]
                                         [--repeat N] [--lf-site DIR]
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
from tests import lf_reference as lfr  # noqa: E402

FIRST_N = 100  # samples whose ids and labels the check compares one by one

SHARED_ALPACA = REPO.parent / "shared" / "datasets" / "alpaca_en_demo.json"


def records(n: int, alpaca: Path) -> list[dict]:
    """`n` records cycling through the Alpaca file `alpaca` when it exists (real, longer texts), else through
    the synthetic demo tasks; each gets the demo system prompt.

    Repeats are marked (" [k]" after the instruction and the output of the k-th repeat): our encoder remembers
    short texts, so verbatim repeats would measure that cache rather than a dataset of distinct records.
    """
    if alpaca.is_file():
        base = json.loads(alpaca.read_text())
    else:
        from mindspeed_llm.demo_data import generate_examples, to_alpaca

        base = [to_alpaca(e) for e in generate_examples(2000)]
    out = []
    for k in range(-(-n // len(base))):
        mark = f" [{k}]" if k else ""
        out += [dict(r, instruction=r["instruction"] + mark, output=r["output"] + mark, system=SYSTEM_PROMPT)
                for r in base]
    return out[:n]


def ours(data: Path, tokenizer_dir: str, workers: int, seq_length: int, prefix: Path
         ) -> tuple[float, float, tuple[float, float]]:
    """(samples per wall second, samples per CPU second, (CPU seconds of this process, of the worker processes))
    of `run` (preprocess_data.py's body), from the JSONL file to the written .bin/.idx."""
    from mindspeed_llm.arguments import parse_preprocess_args
    from mindspeed_llm.data.preprocess import run

    import megatron.core.datasets.indexed_dataset  # noqa: F401  (import time is not throughput)

    args = parse_preprocess_args([
        "--input", str(data), "--tokenizer-name-or-path", tokenizer_dir, "--output-prefix", str(prefix),
        "--handler-name", "AlpacaStyleInstructionHandler", "--prompt-type", "qwen3", "--enable-thinking", "false",
        "--map-keys", '{"system": "system"}', "--seq-length", str(seq_length), "--workers", str(workers),
        "--log-interval", "1000000"])
    times_start = os.times()
    start = time.perf_counter()
    summary = run(args)
    wall = time.perf_counter() - start
    times = os.times()
    main_cpu = times.user + times.system - times_start.user - times_start.system
    workers_cpu = (times.children_user + times.children_system - times_start.children_user
                   - times_start.children_system)
    return summary.written / wall, summary.written / (main_cpu + workers_cpu), (main_cpu, workers_cpu)


def tokenizer_ceiling(data: Path, tokenizer_dir: str, seq_length: int) -> tuple[float, float, int]:
    """(samples per CPU second with the tokenizer's standard `encode`, the same with our encoder's text encoding
    (a fresh one: its word cache starts empty), texts): every text our encoder tokenizes (texts it remembers count
    once), timed with nothing else around them."""
    from mindspeed_llm.data import templates
    from mindspeed_llm.data.encode import EncodeOptions, encode_record
    from mindspeed_llm.data.handlers import build_handler
    from mindspeed_llm.data.prompt_type import get_template
    from mindspeed_llm.tokenizer import build_tokenizer

    template = get_template("qwen3", enable_thinking=False)
    tokenizer = build_tokenizer(tokenizer_dir, True, template, "PretrainedFromHF", seq_length)
    spec = build_handler("AlpacaStyleInstructionHandler", {"system": "system"})
    texts: list[str] = []
    encode_uncached = templates._TextEncoder._encode_uncached

    def recording(encoder, tok, text: str) -> list[int]:
        texts.append(text)
        return encode_uncached(encoder, tok, text)

    templates._TextEncoder._encode_uncached = recording
    try:
        lines = data.read_text().splitlines()
        for line in lines:
            encode_record(json.loads(line), spec, template, tokenizer, EncodeOptions(seq_length),
                          spec.output_fields)
    finally:
        templates._TextEncoder._encode_uncached = encode_uncached
    backend = tokenizer._tokenizer
    start = lfr.cpu_seconds()
    for text in texts:
        backend.encode(text, add_special_tokens=False)
    standard = len(lines) / (lfr.cpu_seconds() - start)
    encoder = templates._TextEncoder(tokenizer)
    start = lfr.cpu_seconds()
    for text in texts:
        encoder._encode_uncached(tokenizer, text)
    return standard, len(lines) / (lfr.cpu_seconds() - start), len(texts)


def concurrency_cost(data: Path, tokenizer_dir: str, seq_length: int, samples: int = 5000, rounds: int = 2
                     ) -> tuple[float, float]:
    """(CPU seconds per 1000 samples of one encoding process while another encodes at the same time, the same with
    the two one after the other): processes forked from one that has loaded the tokenizer but encoded nothing (as
    our workers are) encode the first `samples` records, best of `rounds`. The work is identical, so the gap is
    what the cores add when both run this memory-heavy code at once; it shows in any 2-worker figure of ours."""
    from mindspeed_llm.data.encode import EncodeOptions, encode_record
    from mindspeed_llm.data.handlers import build_handler
    from mindspeed_llm.data.prompt_type import get_template
    from mindspeed_llm.tokenizer import build_tokenizer

    template = get_template("qwen3", enable_thinking=False)
    tokenizer = build_tokenizer(tokenizer_dir, True, template, "PretrainedFromHF", seq_length)
    spec = build_handler("AlpacaStyleInstructionHandler", {"system": "system"})
    with data.open() as f:
        rows = [json.loads(line) for line, _ in zip(f, range(samples))]

    def encode_all() -> None:
        for row in rows:
            encode_record(row, spec, template, tokenizer, EncodeOptions(seq_length), spec.output_fields)

    def per_process_cpu(processes: int) -> list[float]:
        pipes, pids = [], []
        for _ in range(processes):
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:
                start = time.process_time()
                encode_all()
                os.write(write_end, str(time.process_time() - start).encode())
                os._exit(0)
            os.close(write_end)
            pipes.append(read_end)
            pids.append(pid)
        for pid in pids:
            os.waitpid(pid, 0)
        return [float(os.read(read_end, 64)) for read_end in pipes]

    together, apart = [], []
    for _ in range(rounds):  # alternating, as load from other jobs comes and goes
        apart.append(sum(per_process_cpu(1) + per_process_cpu(1)) / 2)
        together.append(sum(per_process_cpu(2)) / 2)
    return min(together) * 1000 / len(rows), min(apart) * 1000 / len(rows)


def same_output(prefix: Path, lf: dict) -> str:
    """Our written dataset against LF's counts and first samples, as one line starting "same" or "DIFFERENT"."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ids, labels = (IndexedDataset(f"{prefix}_packed_{f}_document") for f in ("input_ids", "labels"))
    supervised = sum(int(np.count_nonzero(labels[i] != lfr.IGNORE_INDEX)) for i in range(len(labels)))
    mine = (len(ids), int(ids.sequence_lengths.sum()), supervised)
    theirs = (lf["samples"], lf["tokens"], lf["supervised_tokens"])
    first_equal = [[ids[i].tolist(), labels[i].tolist()] for i in range(len(lf["first"]))] == lf["first"]
    verdict = "same" if mine == theirs and first_equal else "DIFFERENT"
    return (f"{verdict}: (samples, tokens, supervised tokens) ours {mine}, LF {theirs}; ids and labels of the "
            f"first {len(lf['first'])} samples {'equal' if first_equal else 'differ'}")


def peak_rss_mib(tokenizer_dir: str, tmp: Path, megabytes: int, alpaca: Path) -> tuple[float, float]:
    """(input size MiB, peak RSS MiB of the largest process) for the CLI on a JSONL file of about `megabytes`.

    Measured from a fresh wrapper process, so only the CLI and its workers count.
    """
    path = tmp / f"big{megabytes}.jsonl"
    rows = records(1000, alpaca)
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


def compare(data: Path, tokenizer_dir: str, seq_length: int, lf_worker: lfr.LFWorker, tmp: Path, repeat: int) -> None:
    """One table: ours vs LF for 1 and 2 workers, then the output check per worker count.

    Samples per CPU second (all processes of a side, workers included) is the per-worker figure; unlike samples
    per wall second it holds when other jobs share the cores. With `repeat` > 1 the two sides take turns that
    many times and each figure is a side's best: load from other jobs only ever slows a run down.
    """
    print(f"tokenizer {tokenizer_dir}, --seq-length = cutoff_len = {seq_length}"
          + (f", best of {repeat} alternating runs per side" if repeat > 1 else ""))
    print(f"{'':>7} {'samples per wall second':^30} {'samples per CPU second':^30}")
    print(f"{'workers':>7}" + f" {'ours':>9} {'LF 0.9.5':>9} {'ratio':>9}" * 2)
    checks, lf_rates, splits = [], [], []
    for workers in (1, 2):
        prefix = tmp / f"ours{workers}"
        wall = cpu = lf_wall = lf_cpu = 0.0
        for _ in range(repeat):
            run_wall, run_cpu, run_split = ours(data, tokenizer_dir, workers, seq_length, prefix)
            lf = lfr.lf_throughput(data, tokenizer_dir=tokenizer_dir, template="qwen3", enable_thinking=False,
                                   cutoff_len=seq_length, workers=workers, first_n=FIRST_N, worker=lf_worker)
            wall = max(wall, run_wall)
            if run_cpu > cpu:
                cpu, split = run_cpu, run_split
            lf_wall = max(lf_wall, lf["samples"] / lf["seconds"])
            lf_cpu = max(lf_cpu, lf["samples"] / lf["cpu_seconds"])
        print(f"{workers:>7} {wall:>9.0f} {lf_wall:>9.0f} {wall / lf_wall:>8.2f}x"
              f" {cpu:>9.0f} {lf_cpu:>9.0f} {cpu / lf_cpu:>8.2f}x", flush=True)
        checks.append(f"check, {workers} worker(s): {same_output(prefix, lf)}")
        lf_rates.append(lf_cpu)
        splits.append(f"{workers} worker(s) {split[0]:.1f} s in the main process + {split[1]:.1f} s in workers")
    standard, cheaper, calls = tokenizer_ceiling(data, tokenizer_dir, seq_length)
    print("\n".join(checks))
    # what the main process costs (tokenizer load, fingerprint, reading, writing) next to the encoding itself
    print(f"our CPU seconds (run of the best rate): {'; '.join(splits)}")
    together, apart = concurrency_cost(data, tokenizer_dir, seq_length)
    print(f"two encoding processes at once: {together:.3f} CPU s per 1000 samples each, one after the other "
          f"{apart:.3f} ({together / apart - 1:+.0%}; the same work)")
    print(f"ceiling: the tokenizer alone on our encoder's {calls} texts, per CPU second (ratio to LF's best rate "
          f"above): standard `encode` {standard:.0f} samples ({standard / max(lf_rates):.2f}x); our encoder's text "
          f"encoding {cheaper:.0f} samples ({cheaper / max(lf_rates):.2f}x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=20000)
    p.add_argument("--alpaca", type=Path, default=SHARED_ALPACA,
                   help="Alpaca JSON file to cycle through (default: the shared demo data beside the checkout)")
    p.add_argument("--seq-length", type=int, default=2048, help="our --seq-length and LF's cutoff_len")
    p.add_argument("--tokenizer", action="append", default=[],
                   help="also measure with this tokenizer directory (e.g. a real Qwen3 one); repeatable")
    p.add_argument("--lf-site", default=str(lfr.DEFAULT_SITE),
                   help="LLaMA-Factory 0.9.5 install folder (installed there with pip --no-deps if missing)")
    p.add_argument("--big-mb", type=int, default=512, help="size of the streaming check's input; 0 skips it")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per side and worker count, alternating; the best of each side is reported")
    p.add_argument("--skip-tiny", action="store_true",
                   help="measure only the --tokenizer directories, not the tiny demo tokenizer")
    a = p.parse_args()
    # LF's worker runs with it (tests/lf_reference.py); the same here so both sides tokenize single-threaded
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    lf_worker = lfr.LFWorker(lfr.ensure_llamafactory(a.lf_site))
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            tok = str(build_tiny_model(tmp / "model"))
            alpaca = a.alpaca.expanduser()
            rows = records(a.records, alpaca)
            data = tmp / "alpaca.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in rows))
            source = alpaca if alpaca.is_file() else "synthetic demo tasks"
            print(f"{len(rows)} Alpaca records ({source}), {os.cpu_count()} cores")
            for tokenizer_dir in ([] if a.skip_tiny and a.tokenizer else [tok]) + a.tokenizer:
                compare(data, tokenizer_dir, a.seq_length, lf_worker, tmp, max(a.repeat, 1))
            if a.big_mb:
                for mb in (max(a.big_mb // 16, 1), a.big_mb):
                    size, peak = peak_rss_mib(tok, tmp, mb, alpaca)
                    print(f"streaming: input {size:6.0f} MiB -> peak RSS of the largest process {peak:5.0f} MiB")
    finally:
        lf_worker.close()


if __name__ == "__main__":
    mp.set_start_method("fork", force=True)
    main()
