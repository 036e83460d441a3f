"""`evaluation.py` flags: the model / parallel / checkpoint groups of `inference.py` plus the benchmark flags."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from mindspeed_llm import arguments as shared
from mindspeed_llm.errors import OneLineArgumentParser, UserError

# Benchmarks implemented here; MindSpeed-LLM's other names are refused by name (see validate).
TASKS = ("mmlu", "ceval", "cmmlu", "gsm8k", "boolq", "bbh", "agieval", "hellaswag", "human_eval")
NOT_IMPLEMENTED = ("mmlu_ppl", "needlebench")
# Answered by greedy generation up to --max-new-tokens; the others score option labels by the next token.
GENERATION_TASKS = ("gsm8k", "bbh", "human_eval")


def add_evaluation_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("evaluation")
    g.add_argument("--task", nargs="+", required=False, default=None, metavar="TASK",
                   help=f"benchmarks to run, in order: {', '.join(TASKS)}")
    g.add_argument("--task-data-path", nargs="+", default=None, metavar="DIR",
                   help="benchmark files in the benchmark's public layout (one path, or one per --task)")
    g.add_argument("--evaluation-batch-size", type=int, default=1, help="prompts scored or decoded together")
    g.add_argument("--max-eval-samples", type=int, default=None,
                   help="evaluate at most this many items per subject file (default: all)")
    g.add_argument("--no-chat-template", action="store_true",
                   help="plain few-shot text prompts; without it the tokenizer's chat template wraps each prompt "
                        "when it has one (or the --prompt-type template when given)")
    g.add_argument("--eval-language", default="en", choices=["en", "zh"],
                   help="language of the instruction line of the GSM8K / BoolQ prompts")
    g.add_argument("--chain-of-thought", action="store_true",
                   help="GSM8K: 8-shot chain-of-thought examples from the train file; BBH: the task's "
                        "cot-prompts/{task}.txt shots and 'So the answer is' extraction (default: zero-shot)")
    g.add_argument("--max-new-tokens", type=int, default=128,
                   help="generated tokens per item of the generation tasks (GSM8K, BBH, HumanEval); choice "
                        "tasks read one next-token distribution")
    g.add_argument("--results-file", default="evaluation_results.json",
                   help="JSON results: per-task, per-subject and overall accuracy and every item's prediction")
    g.add_argument("--broadcast", action="store_true",
                   help="accepted; items are shared out over data-parallel replicas and results gathered")
    g.add_argument("--use-kv-cache", dest="use_kv_cache", action="store_true", default=True,
                   help="reuse keys/values when generating (default on)")
    g.add_argument("--no-use-kv-cache", "--no-kv-cache", dest="use_kv_cache", action="store_false",
                   help=argparse.SUPPRESS)
    g.add_argument("--truncate-prompt", action="store_true",
                   help="cut prompts longer than the position limit from the left instead of stopping")
    # Read by MindSpeed-LLM's tasks we do not implement, or by its legacy decode; values other than the
    # default are refused by flag_policy.
    g.add_argument("--alternative-prompt", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--origin-postprocess", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--hf-chat-template", action="store_true",
                   help="wrap prompts in the tokenizer's chat template (the default when it has one)")
    g.add_argument("--max-length", type=int, default=256, help=argparse.SUPPRESS)
    g.add_argument("--add-eos-token", nargs="*", default=[], help=argparse.SUPPRESS)
    g.add_argument("--micro-batch-size", type=int, default=1, help=argparse.SUPPRESS)
    g.add_argument("--global-batch-size", type=int, default=None, help=argparse.SUPPRESS)
    g.add_argument("--seed", type=int, default=1234, help="seed of the parallel state")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="evaluation.py", description="Benchmark a Megatron checkpoint (torchrun)",
                          allow_abbrev=False)
    shared.add_loaded_model_args(p)
    add_evaluation_args(p)
    return p


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    from mindspeed_llm.explicit import explicit_dests

    parser = build_parser()
    args = parser.parse_args(argv)
    args.explicit = explicit_dests(parser, argv)
    shared.apply_flag_policy("evaluation", parser, args)
    _position_limit(args)
    validate(args)
    return args


def _position_limit(args: argparse.Namespace) -> None:
    """MindSpeed-LLM's evaluate recipes pass --max-position-embeddings 32768 for Qwen3 checkpoints that record
    40960: a run setting (`models.resolve.RUN_SETTINGS`) that bounds the prompt length, as --seq-length does; the
    smaller of the two wins."""
    if "max_position_embeddings" not in args.explicit or args.max_position_embeddings is None:
        return
    if args.seq_length is None or args.seq_length > args.max_position_embeddings:
        args.seq_length = args.max_position_embeddings
        args.limit_flag = "--max-position-embeddings"      # what the messages about long prompts name


def validate(args: argparse.Namespace) -> None:
    if not args.load:
        raise UserError("--load is required: the Megatron checkpoint root (convert_ckpt.py or posttrain_gpt.py "
                        "output)")
    if not args.tokenizer_name_or_path:
        raise UserError("--tokenizer-name-or-path is required (the Hugging Face model or tokenizer directory)")
    if not args.task:
        raise UserError(f"--task is required: one or more of {', '.join(TASKS)}")
    for task in args.task:
        if task in NOT_IMPLEMENTED:
            raise UserError(f"--task {task}: not implemented by evaluation.py; implemented: {', '.join(TASKS)}")
        if task not in TASKS:
            raise UserError(f"--task {task}: unknown benchmark; expected one of {', '.join(TASKS)}")
    if not args.task_data_path:
        raise UserError("--task-data-path is required: the directory of the benchmark files")
    if len(args.task_data_path) not in (1, len(args.task)):
        raise UserError(f"--task-data-path has {len(args.task_data_path)} paths for {len(args.task)} tasks; give "
                        f"one path, or one per --task")
    if args.evaluation_batch_size < 1:
        raise UserError(f"--evaluation-batch-size {args.evaluation_batch_size} must be at least 1")
    if args.max_eval_samples is not None and args.max_eval_samples < 1:
        raise UserError(f"--max-eval-samples {args.max_eval_samples} must be at least 1")
    generating = [t for t in args.task if t in GENERATION_TASKS]
    if generating and args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} must be at least 1 (--task {generating[0]} "
                        f"generates)")
    if args.hf_chat_template and (args.prompt_type or args.no_chat_template):
        other = "--prompt-type" if args.prompt_type else "--no-chat-template"
        raise UserError(f"--hf-chat-template and {other} are mutually exclusive; pick one way to build prompts")
    if args.fp16 and args.bf16:
        raise UserError("--fp16 and --bf16 are mutually exclusive")
    parent = Path(args.results_file).resolve().parent
    if not parent.is_dir():
        raise UserError(f"--results-file {args.results_file}: the directory {parent} does not exist")


def data_path_of(args: argparse.Namespace, index: int) -> str:
    """The --task-data-path of the index-th --task."""
    paths = args.task_data_path
    return paths[index] if len(paths) > 1 else paths[0]
