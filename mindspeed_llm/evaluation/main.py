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
        _max_new_tokens_notice(args)
        summaries = [run_task(engine, args, task, i) for i, task in enumerate(args.task)]
        if comm.world_rank() == 0:
            write_results(args.results_file, summaries)
        if dist.is_initialized():
            dist.barrier()
    finally:
        destroy_distributed()


def _max_new_tokens_notice(args: argparse.Namespace) -> None:
    """A typed --max-new-tokens changes nothing for the choice tasks: say so once (rank 0)."""
    from mindspeed_llm.evaluation.args import GENERATION_TASKS
    from mindspeed_llm.platform import notice

    choice = [t for t in args.task if t not in GENERATION_TASKS]
    if "max_new_tokens" in args.explicit and choice:
        notice(f"--max-new-tokens: accepted, no effect for --task {', '.join(choice)}: option answers are scored "
               f"by the next token's log-probabilities; nothing is generated")


def load_items(args: argparse.Namespace, task: str, index: int) -> list[Item]:
    from mindspeed_llm.errors import UserError
    from mindspeed_llm.evaluation import more_tasks
    from mindspeed_llm.evaluation.args import data_path_of
    from mindspeed_llm.evaluation.choice_tasks import LOADERS
    from mindspeed_llm.evaluation.gen_tasks import load_boolq, load_gsm8k
    from mindspeed_llm.evaluation.humaneval import load_humaneval

    root = Path(data_path_of(args, index))
    if not root.exists():
        raise UserError(f"--task-data-path {root}: does not exist (--task {task})")
    n = args.max_eval_samples
    if task in LOADERS:
        items = LOADERS[task](root, n)
    elif task == "gsm8k":
        items = load_gsm8k(root, n, args.eval_language, args.chain_of_thought)
    elif task == "boolq":
        items = load_boolq(root, n, args.eval_language)
    elif task == "bbh":
        items = more_tasks.load_bbh(root, n, args.chain_of_thought)
    elif task == "hellaswag":
        items = more_tasks.load_hellaswag(root, n)
    elif task == "human_eval":
        items = load_humaneval(root, n)
    else:
        items, skipped = more_tasks.load_agieval(root, n)
        if skipped:
            print(f"agieval: {skipped} cloze or multi-answer questions left out (no single option to score)",
                  flush=True)
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
        # an option question is scored by one forward pass of the prompt: no room is kept for new tokens
        new_tokens = 0 if isinstance(item, ChoiceItem) else None
        out.append(engine.fit(ids, f"{item.subject} item {item.index}", new_tokens))
    return out


def run_task(engine, args: argparse.Namespace, task: str, index: int) -> dict[str, Any]:
    from mindspeed_llm.evaluation.report import ProgressLog, log_summary, summarize
    from mindspeed_llm.inference import comm

    start = time.monotonic()
    rank0 = comm.world_rank() == 0
    # HumanEval continues the function's code: a chat turn around it would not be code
    chat = not args.no_chat_template and task != "human_eval"

    def prepare():
        items = load_items(args, task, index)
        return items, encode(engine, items, chat)

    # rank 0 reads and tokenizes; every rank gets the prompts, or all raise rank 0's error together
    prepared = comm.broadcast_object(_capture(prepare) if rank0 else None)
    items, prompts = comm.agree(lambda: _unpack(prepared))
    if rank0:
        print(f"{task}: {len(items)} items, {len({i.subject for i in items})} subjects", flush=True)
    progress = ProgressLog(task, len(items), comm.replica_count_and_index()[0], rank0)
    if isinstance(items[0], ChoiceItem):
        records = _choice_records(engine, args, items, prompts, progress)
    else:
        records = _generation_records(engine, args, task, items, prompts, progress)
    summary = summarize(task, records)
    if rank0:
        log_summary(summary, time.monotonic() - start)
    return summary


def _choice_records(engine, args, items: list[ChoiceItem], prompts: list[list[int]], progress) -> list[dict]:
    from mindspeed_llm.evaluation.scoring import label_variants, score_choices

    records: list[dict] = [{} for _ in items]
    # items of one task may differ in their options (AGIEval has 4 or 5): each set of labels is scored apart
    for labels in dict.fromkeys(i.labels for i in items):
        picked = [n for n, i in enumerate(items) if i.labels == labels]
        scores = score_choices(engine, [prompts[n] for n in picked], label_variants(engine.tokenizer, labels),
                               args.evaluation_batch_size, progress)
        for n, row in zip(picked, scores):
            item = items[n]
            pred = labels[max(range(len(labels)), key=lambda j: row[j])]     # ties: the first label
            records[n] = {"subject": item.subject, "index": item.index, "prompt_tokens": len(prompts[n]),
                          "scores": dict(zip(labels, row)), "prediction": pred, "answer": item.answer,
                          "correct": pred == item.answer}
    return records


def _generation_records(engine, args, task: str, items: list[GenerationItem], prompts: list[list[int]],
                        progress) -> list[dict]:
    from mindspeed_llm.evaluation.gen_tasks import last_number
    from mindspeed_llm.evaluation.humaneval import truncate
    from mindspeed_llm.evaluation.more_tasks import bbh_answer
    from mindspeed_llm.evaluation.scoring import generate_greedy

    texts = [engine.decode(out) for out in generate_greedy(engine, prompts, args.evaluation_batch_size, progress)]
    if task == "human_eval":
        preds = [truncate(t) for t in texts]
        correct = _run_tests(items, preds)
    else:
        preds = [bbh_answer(t, i.extra["cot"]) if task == "bbh" else last_number(t) for i, t in zip(items, texts)]
        correct = [p == i.answer for i, p in zip(items, preds)]
    return [{"subject": i.subject, "index": i.index, "prompt_tokens": len(ids), "output": t, "prediction": p,
             "answer": i.answer, "correct": c, **({"task_id": i.extra["task_id"]} if task == "human_eval" else {})}
            for i, ids, t, p, c in zip(items, prompts, texts, preds, correct)]


def _run_tests(items: list[GenerationItem], completions: list[str]) -> list[bool]:
    """HumanEval verdicts: every rank runs the programs of its share of the items (each in its own subprocess),
    so no rank waits in a collective for the whole run; the verdicts are gathered on all ranks."""
    import torch.distributed as dist

    from mindspeed_llm.evaluation.humaneval import passes_all

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    mine = list(range(rank, len(items), world))
    verdicts = dict(zip(mine, passes_all([(items[n].prompt, completions[n], items[n].extra["test"],
                                           items[n].extra["entry_point"]) for n in mine])))
    if world > 1:
        parts: list[dict] = [{} for _ in range(world)]
        dist.all_gather_object(parts, verdicts)
        for part in parts:
            verdicts.update(part)
    return [verdicts[n] for n in range(len(items))]


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
