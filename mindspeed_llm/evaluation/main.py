"""`evaluation.py`: load a Megatron checkpoint as `inference.py` does, run each --task, report accuracy."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, NoReturn, Optional, Union

from mindspeed_llm.evaluation.items import ChoiceItem, GenerationItem

Item = Union[ChoiceItem, GenerationItem]


def main(argv: Optional[list[str]] = None) -> None:
    import torch.distributed as dist

    from mindspeed_llm.evaluation.args import parse_args
    from mindspeed_llm.evaluation.report import write_results
    from mindspeed_llm.inference import comm
    from mindspeed_llm.inference.engine import setup
    from mindspeed_llm.platform import destroy_distributed

    args = parse_args(argv)
    engine = setup(args)
    try:
        summaries = [run_task(engine, args, task, i) for i, task in enumerate(args.task)]
        if comm.world_rank() == 0:
            write_results(args.results_file, summaries)
        if dist.is_initialized():
            dist.barrier()
    finally:
        destroy_distributed()


def load_items(args: argparse.Namespace, task: str, index: int) -> list[Item]:
    from mindspeed_llm.errors import UserError
    from mindspeed_llm.evaluation.args import data_path_of
    from mindspeed_llm.evaluation.choice_tasks import LOADERS
    from mindspeed_llm.evaluation.gen_tasks import load_boolq, load_gsm8k

    root = Path(data_path_of(args, index))
    if not root.exists():
        raise UserError(f"--task-data-path {root}: does not exist (--task {task})")
    if task in LOADERS:
        items = LOADERS[task](root, args.max_eval_samples)
    elif task == "gsm8k":
        items = load_gsm8k(root, args.max_eval_samples, args.eval_language, args.chain_of_thought)
    else:
        items = load_boolq(root, args.max_eval_samples, args.eval_language)
    if not items:
        raise UserError(f"--task-data-path {root}: no items to evaluate for --task {task}")
    return items


def encode(engine, items: list[Item], chat: bool) -> list[list[int]]:
    """Prompt ids: the plain few-shot text (--no-chat-template), else wrapped as one user turn by the
    --prompt-type template or the tokenizer's chat template when it has one."""
    builder = engine.builder
    use_chat = chat and (builder.template is not None or bool(getattr(engine.tokenizer, "chat_template", None)))
    out = []
    for item in items:
        if use_chat:
            ids = builder.from_messages([{"role": "user", "content": item.prompt}])
        else:
            ids = list(engine.tokenizer.encode(item.prompt, add_special_tokens=False))
        out.append(engine.fit(ids, f"{item.subject} item {item.index}"))
    return out


def run_task(engine, args: argparse.Namespace, task: str, index: int) -> dict[str, Any]:
    from megatron.core import parallel_state as ps

    from mindspeed_llm.evaluation.gen_tasks import last_number
    from mindspeed_llm.evaluation.report import ProgressLog, log_summary, summarize
    from mindspeed_llm.evaluation.scoring import generate_greedy, label_variants, score_choices
    from mindspeed_llm.inference import comm

    start = time.monotonic()
    rank0 = comm.world_rank() == 0

    def prepare():
        items = load_items(args, task, index)
        return items, encode(engine, items, chat=not args.no_chat_template)

    # rank 0 reads and tokenizes; every rank gets the prompts, or all raise rank 0's error together
    prepared = comm.broadcast_object(_capture(prepare) if rank0 else None)
    items, prompts = comm.agree(lambda: _unpack(prepared))
    if rank0:
        print(f"{task}: {len(items)} items, {len({i.subject for i in items})} subjects", flush=True)
    progress = ProgressLog(task, len(items), ps.get_data_parallel_world_size(), rank0)
    records: list[dict[str, Any]] = []
    if isinstance(items[0], ChoiceItem):
        labels = items[0].labels
        scores = score_choices(engine, prompts, label_variants(engine.tokenizer, labels),
                               args.evaluation_batch_size, progress)
        for item, ids, row in zip(items, prompts, scores):
            pred = labels[max(range(len(labels)), key=lambda j: row[j])]     # ties: the first label
            records.append({"subject": item.subject, "index": item.index, "prompt_tokens": len(ids),
                            "scores": dict(zip(labels, row)), "prediction": pred, "answer": item.answer,
                            "correct": pred == item.answer})
    else:
        outputs = generate_greedy(engine, prompts, args.evaluation_batch_size, progress)
        for item, ids, out in zip(items, prompts, outputs):
            text = engine.decode(out)
            pred = last_number(text)
            records.append({"subject": item.subject, "index": item.index, "prompt_tokens": len(ids),
                            "output": text, "prediction": pred, "answer": item.answer,
                            "correct": pred == item.answer})
    summary = summarize(task, records)
    if rank0:
        log_summary(summary, time.monotonic() - start)
    return summary


def _capture(fn):
    """The result, or the UserError's message so that rank 0's error travels to the other ranks."""
    from mindspeed_llm.errors import UserError

    try:
        return fn()
    except UserError as exc:
        return str(exc)


def _unpack(prepared):
    from mindspeed_llm.errors import UserError

    if isinstance(prepared, str):
        raise UserError(prepared)
    return prepared


def run(argv: Optional[list[str]] = None) -> NoReturn:
    """Entry point (`logs.run_main`): a UserError is one `error: <message>` line and exit status 2."""
    from mindspeed_llm.logs import run_main

    run_main(lambda: main(argv))
