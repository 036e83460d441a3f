"""`--input-file prompts.jsonl [--output-file out.jsonl]`: answer every line, batched by prompt length.

Each input line is `{"prompt": "..."}` or `{"messages": [...]}` (other keys are carried through). Each output line
repeats the input object and adds `response`, `prompt_token_ids` and `response_token_ids`, in input order. The
output is written under a temporary name in the target directory and renamed only when every line is done, so
a failed run never leaves a partial file under the final name.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch.distributed as dist

from mindspeed_llm.errors import UserError
from mindspeed_llm.inference import comm
from mindspeed_llm.inference.engine import Engine
from mindspeed_llm.inference.sampling import sampling_for
from mindspeed_llm.inference.tasks import run_task


def read_requests(path: str) -> list[dict[str, Any]]:
    """Parsed JSONL objects; errors name the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UserError(f"--input-file {path}: cannot read it ({reason})") from None
    requests = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        ok = isinstance(obj, dict) and (isinstance(obj.get("prompt"), str) or isinstance(obj.get("messages"), list))
        if not ok:
            raise UserError(f'{path}:{number}: expected an object with a string "prompt" or a "messages" list')
        requests.append({"line": number, "request": obj})
    if not requests:
        raise UserError(f"--input-file {path} holds no requests")
    return requests


def encode_requests(engine: Engine, path: str, requests: list[dict[str, Any]]) -> list[list[int]]:
    out = []
    for item in requests:
        where = f"{path}:{item['line']}"
        req = item["request"]
        try:
            ids = engine.builder.from_messages(req["messages"]) if "messages" in req else \
                engine.builder.from_text(req["prompt"])
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        if not ids:
            raise UserError(f"{where}: the prompt encodes to no tokens")
        out.append(engine.fit(ids, where))
    return out


class AtomicJsonl:
    """A JSONL file that appears under its final name only on `commit()`."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise UserError(f"--output-file {path} is a directory")
        directory = self.path.parent
        if not directory.is_dir():
            raise UserError(f"--output-file {path}: directory {directory} does not exist")
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        except OSError as exc:
            raise UserError(f"--output-file {path}: cannot write there ({exc.strerror})") from None
        self.tmp = Path(tmp)
        self.file = os.fdopen(fd, "w", encoding="utf-8")

    def write(self, obj: dict[str, Any]) -> None:
        self.file.write(json.dumps(obj, ensure_ascii=False) + "\n")

    def commit(self) -> None:
        self.file.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _batches(prompts: list[list[int]], size: int) -> list[list[int]]:
    """Request indices grouped by prompt length (rows of similar length waste the least ragged prefill)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[i:i + size] for i in range(0, len(order), size)]


def run_batch(engine: Engine, args: argparse.Namespace) -> None:
    rank0 = comm.world_rank() == 0
    path = args.input_file
    task = (args.task or ["greedy"])[0]
    params = sampling_for(task, args)

    def prepare():
        requests = read_requests(path)
        return requests, encode_requests(engine, path, requests)

    # rank 0 reads; everyone gets the prompts (or the same error)
    prepared = comm.broadcast_object(_capture(prepare) if rank0 else None)
    if isinstance(prepared, str):
        raise UserError(prepared)
    requests, prompts = prepared
    sink: Optional[AtomicJsonl] = comm.agree(lambda: AtomicJsonl(args.output_file) if rank0 and args.output_file
                                             else None)
    try:
        results = _generate_all(engine, task, params, prompts, args)
        if rank0:
            for item, ids, out in zip(requests, prompts, results):
                record = dict(item["request"], response=engine.decode(out), prompt_token_ids=ids,
                              response_token_ids=out)
                if sink is not None:
                    sink.write(record)
                else:
                    sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
            if sink is not None:
                sink.commit()
                print(f"wrote {len(results)} responses to {args.output_file}", flush=True)
    except BaseException:
        if sink is not None:
            sink.discard()
        raise
    if dist.is_initialized():
        dist.barrier()


def _generate_all(engine: Engine, task: str, params, prompts: list[list[int]],
                  args: argparse.Namespace) -> list[list[int]]:
    """Generated ids per request, in input order. Data-parallel replicas share the batches out."""
    dp, dp_rank = comm.replica_count_and_index()
    size = 1 if task.startswith("beam_search") else args.inference_batch_size
    mine: dict[int, list[int]] = {}
    for b, batch in enumerate(_batches(prompts, size)):
        if b % dp != dp_rank:
            continue
        if task.startswith("beam_search"):
            mine[batch[0]] = run_task(engine, task, prompts[batch[0]], args)
            continue
        outs = engine.generate([prompts[i] for i in batch], params).outputs
        mine.update(zip(batch, outs))
    if dp > 1:
        gathered: list[dict[int, list[int]]] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, mine)
        for part in gathered:
            mine.update(part)
    return [mine[i] for i in range(len(prompts))]


def _capture(fn):
    try:
        return fn()
    except UserError as exc:
        return str(exc)
