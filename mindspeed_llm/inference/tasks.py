"""The task driver of `inference.py`: fixed-prompt tasks printed in MindSpeed-LLM's format, then chat."""
from __future__ import annotations

import argparse
import sys
import time

import torch.distributed as dist

from mindspeed_llm.inference import comm
from mindspeed_llm.inference.chat import chat_loop
from mindspeed_llm.inference.engine import Engine
from mindspeed_llm.inference.sampling import sampling_for

BANNERS = {
    "greedy": "=============== Greedy Search ================",
    "do_sample": "================ Do Sample =================",
    "beam_search": "=============== Beam Search =================",
    "beam_search_with_sampling": "======== Beam Search with sampling ==========",
}
RULE = "=============================================="
DEFAULT_ORDER = ("greedy", "do_sample", "beam_search", "beam_search_with_sampling", "chat")


def run_task(engine: Engine, task: str, prompt_ids: list[int], args: argparse.Namespace) -> list[int]:
    """Generated ids of one fixed-prompt task (identical on every rank of the model replica)."""
    params = sampling_for(task, args)
    if task.startswith("beam_search"):
        return engine.beam_search(prompt_ids, params, args.num_beams, args.length_penalty)
    return engine.generate([prompt_ids], params).outputs[0]


def print_result(task: str, prompt: str, text: str, elapsed: float) -> None:
    out = sys.stdout
    out.write(f"\n{BANNERS[task]}\n")
    out.write(f"\nYou:\n{prompt}\n\nMindSpeed-LLM:\n{text}\n")
    out.write(f"{RULE}\n")
    out.write(f"\nElapsed: {round(elapsed, 2)}s\n")
    out.flush()


def run_tasks(engine: Engine, args: argparse.Namespace) -> None:
    """Each task of --task (all of them by default) on --prompt; rank 0 prints; ranks meet after each task."""
    tasks = args.task or DEFAULT_ORDER
    prompt_ids = comm.agree(lambda: engine.fit(engine.builder.from_text(args.prompt), "--prompt"))
    for task in tasks:
        if task == "chat":
            chat_loop(engine, args)
            continue
        start = time.time()
        ids = run_task(engine, task, prompt_ids, args)
        if comm.world_rank() == 0:
            print_result(task, args.prompt, engine.decode(ids), time.time() - start)
        if dist.is_initialized():
            dist.barrier()
