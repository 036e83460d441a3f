"""`preprocess_data.py`: raw records -> handler -> chat template -> [pack] -> Megatron indexed datasets.

The main process streams records and writes output in input order; `--workers N` processes encode
chunks of records in parallel. Nothing is visible under the final names until every file is complete:
output goes to temporary names, renamed at the end, and the sidecar `PREFIX_preprocess.json` last.
"""
from __future__ import annotations

import errno
import json
import logging
import multiprocessing as mp
import os
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import numpy as np

from mindspeed_llm.data.encode import EncodeOptions, encode_record
from mindspeed_llm.data.handlers import HandlerSpec, Skip, build_handler, check_columns
from mindspeed_llm.data.loaders import (Progress, RecordChunk, chunk_records, first_record, iter_record_chunks,
                                        resolve_inputs)
from mindspeed_llm.data.prompt_type import get_template
from mindspeed_llm.data.writer import IndexedWriter, output_name, pack_dataset
from mindspeed_llm.errors import UserError
from mindspeed_llm.tokenizer import build_tokenizer

log = logging.getLogger("mindspeed_llm.preprocess")
SIDECAR_SUFFIX = "_preprocess.json"
CHUNK = 256  # records per unit of work sent to a worker


@dataclass
class Summary:
    read: int = 0
    written: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)
    tokens: int = 0
    supervised_tokens: int = 0
    packed_rows: int = 0

    def lines(self) -> list[str]:
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{k}: {v}" for k, v in self.skipped.most_common()) or "none"
        out = [f"samples read: {self.read}, written: {self.written}, truncated: {self.truncated}, "
               f"skipped: {skipped} ({reasons})",
               f"tokens written: {self.tokens}, supervised tokens: {self.supervised_tokens}"]
        if self.packed_rows:
            out.append(f"packed into {self.packed_rows} rows")
        return out


# ---- worker side ---------------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(args) -> None:
    template = (get_template(args.prompt_type, args.prompt_type_path, args.enable_thinking,
                             args.reasoning_effort, args.drop_thinking) if args.prompt_type else None)
    tokenizer = build_tokenizer(args.tokenizer_name_or_path, not args.tokenizer_not_use_fast, template,
                                args.tokenizer_type, args.seq_length, args.trust_remote_code)
    _WORKER.update(spec=args._handler_spec, template=template, tokenizer=tokenizer,
                   opts=EncodeOptions(args.seq_length, args.append_eod, args.pack),
                   json_keys=args.json_keys)


@dataclass
class EncodedChunk:
    """A chunk of records encoded: per field, its samples' ids back to back in one int32 array and their lengths
    (a few arrays are far cheaper to send between processes than one list per sample)."""
    ids: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    read: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0
    supervised: int = 0


def _encode_chunk(chunk: RecordChunk) -> EncodedChunk:
    w = _WORKER
    records = chunk_records(chunk)
    ids: dict[str, list[int]] = {}
    lengths: dict[str, list[int]] = {}
    out = EncodedChunk({}, {}, read=len(records))
    for record in records:
        try:
            enc = encode_record(record, w["spec"], w["template"], w["tokenizer"], w["opts"], w["json_keys"])
        except Skip as skip:
            out.skipped[skip.reason] += 1
            continue
        for name, values in enc.fields.items():
            ids.setdefault(name, []).extend(values)
            lengths.setdefault(name, []).append(len(values))
        out.truncated += enc.truncated
        out.supervised += enc.supervised
    out.ids = {name: np.array(values, dtype=np.int32) for name, values in ids.items()}
    out.lengths = {name: np.array(values, dtype=np.int64) for name, values in lengths.items()}
    return out


# ---- main side -----------------------------------------------------------------------------------------
def validate(args) -> HandlerSpec:
    """Checks that need no data; errors name the flag."""
    if args.handler_name in ("", None):
        raise UserError("--handler-name is required")
    spec = build_handler(args.handler_name, args.map_keys)
    if spec.style != "pretrain" and not args.prompt_type:
        raise UserError(f"--prompt-type is required with --handler-name {args.handler_name}")
    if spec.style == "pretrain" and args.prompt_type:
        raise UserError("--prompt-type applies to the instruction and pairwise handlers, "
                        "not GeneralPretrainHandler")
    if args.neat_pack and not args.pack:
        raise UserError("--neat-pack requires --pack")
    if args.pack and spec.style != "alpaca" and spec.style != "sharegpt":
        raise UserError("--pack applies to instruction data; pretraining text is packed at training time")
    if args.pack and spec.pairwise:
        raise UserError("--pack does not apply to pairwise handlers")
    if args.pack and not args.seq_length:
        raise UserError("--pack requires --seq-length (the packed row length)")
    if args.seq_length is not None and args.seq_length < 8:
        raise UserError(f"--seq-length {args.seq_length} is too small (at least 8)")
    if args.workers < 1:
        raise UserError(f"--workers {args.workers} must be at least 1")
    if spec.style != "pretrain":
        args.json_keys = spec.output_fields
    return spec


def _log_progress(summary: Summary, progress: Progress, start: float) -> None:
    elapsed = max(time.time() - start, 1e-9)
    frac = progress.fraction
    eta = timedelta(seconds=int(elapsed * (1 - frac) / frac)) if frac > 0 else "?"
    log.info(f"processed {summary.read} samples ({summary.read / elapsed:.1f} samples/s, "
             f"{summary.tokens / elapsed:.0f} tokens/s), {100 * frac:.1f}% of input, ETA {eta}")


def run(args) -> Summary:
    spec = validate(args)
    files = resolve_inputs(args.input)
    for path in files:
        columns = list(first_record([path]))
        check_columns(spec, columns, str(path))
        if spec.style == "pretrain":
            for key in args.json_keys:
                if key not in columns:
                    raise UserError(f"{path}: column {key!r} (--json-keys) not found; columns are "
                                    f"[{', '.join(columns)}]")
    args._handler_spec = spec
    if args.cache_dir or args.overwrite_cache:
        log.info("note: --cache-dir/--overwrite-cache: preprocessing streams its input and keeps no cache, "
                 "so there is nothing to reuse or overwrite")
    # One text per Rust call and --workers processes: the tokenizer's own thread pool would only add overhead.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _init_worker(args)  # in the main process too: fails fast on a bad tokenizer or template
    tokenizer = _WORKER["tokenizer"]

    prefix = os.path.expanduser(args.output_prefix)
    out_dir = Path(prefix).parent
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--output-prefix {args.output_prefix}: cannot create {out_dir} ({exc.strerror})") from None
    if not os.access(out_dir, os.W_OK):
        raise UserError(f"--output-prefix {args.output_prefix}: directory {out_dir} is not writable")
    instruction = spec.style != "pretrain"
    names = {f: output_name(prefix, f, instruction) for f in args.json_keys}

    summary = Summary()
    unpacked = IndexedWriter({f: n + ".unpacked" for f, n in names.items()} if args.pack else names)
    packed = None
    try:
        _encode_all(args, files, unpacked, summary)
        unpacked.finalize()
        if summary.written == 0:
            raise UserError(f"--input {args.input}: no sample could be written "
                            f"(skipped: {dict(summary.skipped) or 'input is empty'})")
        if args.pack:
            packed = IndexedWriter(names)
            summary.packed_rows, _ = pack_dataset({f: t for f, t in unpacked.tmp.items()}, packed,
                                                  args.seq_length, tokenizer.pad_token_id, args.neat_pack)
            packed.finalize()
            unpacked.abort()  # the unpacked copy was only an intermediate
            final = packed
        else:
            final = unpacked
        # The sidecar records the files' digests: data renamed in without its sidecar (a re-run stopped
        # between the renames) no longer matches, and training refuses it.
        digests = final.digests()
        final.commit()
        _write_sidecar(prefix, args, tokenizer, summary, digests)
    except BaseException as exc:
        unpacked.abort()
        if packed is not None:
            packed.abort()
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise UserError(f"--output-prefix {prefix}: no space left on device in {out_dir} while writing "
                            f"{exc.filename or prefix + '_*'}; free space and re-run") from None
        raise
    for line in summary.lines():
        log.info(line)
    return summary


def _bounded_imap(pool, chunks: Iterator[RecordChunk], window: int) -> Iterator[EncodedChunk]:
    """Ordered results with at most `window` chunks in flight (`Pool.imap` would read the whole input ahead)."""
    pending: deque = deque()
    for chunk in chunks:
        pending.append(pool.apply_async(_encode_chunk, (chunk,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _encode_all(args, files, writer: IndexedWriter, summary: Summary) -> None:
    progress = Progress()
    chunks = iter_record_chunks(files, CHUNK, progress)
    start = time.time()
    logged_at = 0
    next_log = args.log_interval
    pool = None
    if args.workers > 1:
        # Forked workers inherit `_WORKER` as `run` set it up; loading the tokenizer again in each costs a
        # noticeable share of a worker's CPU on a dataset of some thousand records.
        pool = mp.get_context("fork").Pool(args.workers)
        results = _bounded_imap(pool, chunks, window=2 * args.workers)
    else:
        results = map(_encode_chunk, chunks)
    try:
        for chunk in results:
            summary.read += chunk.read
            summary.skipped.update(chunk.skipped)
            if chunk.lengths:
                writer.add_many(chunk.ids, chunk.lengths)
                first_field = next(iter(chunk.lengths.values()))
                summary.written += len(first_field)
                summary.tokens += int(first_field.sum())
            summary.truncated += chunk.truncated
            summary.supervised_tokens += chunk.supervised
            if summary.read >= next_log:
                next_log = (summary.read // args.log_interval + 1) * args.log_interval
                _log_progress(summary, progress, start)
                logged_at = summary.read
    finally:
        if pool is not None:
            pool.terminate()
    if logged_at != summary.read:
        _log_progress(summary, progress, start)


def _write_sidecar(prefix: str, args, tokenizer, summary: Summary, digests: dict[str, dict]) -> None:
    from mindspeed_llm.tokenizer import tokenizer_fingerprint

    meta = {
        "format_version": 1,
        "handler_name": args.handler_name,
        "prompt_type": args.prompt_type,
        "enable_thinking": args.enable_thinking,
        "seq_length": args.seq_length,
        "pack": bool(args.pack),
        "neat_pack": bool(args.neat_pack),
        "append_eod": bool(args.append_eod),
        "tokenizer": {"name_or_path": str(args.tokenizer_name_or_path), "vocab_size": len(tokenizer),
                      "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                      "fingerprint": tokenizer_fingerprint(tokenizer)},
        "data_files": digests,
        "num_samples": summary.packed_rows or summary.written,
        "fields": list(args.json_keys),
        "summary": {"read": summary.read, "written": summary.written, "truncated": summary.truncated,
                    "skipped": dict(summary.skipped), "tokens": summary.tokens,
                    "supervised_tokens": summary.supervised_tokens, "packed_rows": summary.packed_rows},
    }
    path = Path(prefix + SIDECAR_SUFFIX)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
