"""`inference.py` flags: the shared Megatron model / parallel / checkpoint groups plus generation flags."""
from __future__ import annotations

import argparse
from typing import Optional

from mindspeed_llm import arguments as shared
from mindspeed_llm.errors import OneLineArgumentParser, UserError

TASKS = ("greedy", "do_sample", "beam_search", "beam_search_with_sampling", "chat")
DEFAULT_PROMPT = "how are you?"


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("generation")
    g.add_argument("--task", nargs="+", choices=TASKS, default=None,
                   help="tasks to run on --prompt (default: all of them, ending with the interactive chat); with "
                        "--input-file the first task picks the decoding (default greedy)")
    g.add_argument("--prompt", default=DEFAULT_PROMPT, help="the fixed prompt of the non-chat tasks")
    g.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per prompt at most")
    g.add_argument("--max-length", type=int, default=256, help="accepted; --max-new-tokens sets the length")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (do_sample, chat)")
    g.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling after top-k (0 or 1: off)")
    g.add_argument("--num-beams", type=int, default=2, help="beams of the beam_search tasks")
    g.add_argument("--length-penalty", type=float, default=1.0, help="beam score = log-prob / length^penalty")
    g.add_argument("--use-kv-cache", dest="use_kv_cache", action="store_true", default=True,
                   help="reuse keys/values of earlier positions (default on; exact)")
    g.add_argument("--no-use-kv-cache", "--no-kv-cache", dest="use_kv_cache", action="store_false",
                   help="recompute the whole prefix every step (slow; for comparison)")
    g.add_argument("--hf-chat-template", action="store_true",
                   help="build prompts with the tokenizer's own chat template (apply_chat_template)")
    g.add_argument("--history-turns", type=int, default=3, help="chat turns kept in the history")
    g.add_argument("--add-eos-token", nargs="*", default=[], help="accepted; extra stop words go in the template")
    g.add_argument("--input-file", default=None,
                   help='JSONL file of {"prompt": "..."} or {"messages": [...]} lines: generate for each line')
    g.add_argument("--output-file", default=None,
                   help="JSONL results (input line + response, prompt_token_ids, response_token_ids); written "
                        "under a temporary name and renamed when complete")
    g.add_argument("--inference-batch-size", type=int, default=8,
                   help="prompts decoded together in --input-file mode (grouped by length)")
    g.add_argument("--truncate-prompt", action="store_true",
                   help="cut prompts longer than --max-position-embeddings minus --max-new-tokens from the left "
                        "(with a warning) instead of stopping with an error")


def _add_missing(parser: argparse.ArgumentParser, *flags: tuple[str, dict]) -> None:
    g = parser.add_argument_group("run")
    for name, kwargs in flags:
        if name not in parser._option_string_actions:
            g.add_argument(name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="inference.py", description="Generate with a Megatron checkpoint (torchrun)",
                          allow_abbrev=False)
    shared.add_loaded_model_args(p)
    add_generation_args(p)
    _add_missing(p, ("--micro-batch-size", dict(type=int, default=1, help="accepted (generation batches with "
                                                                          "--inference-batch-size)")),
                 ("--seed", dict(type=int, default=1234, help="seed of the sampling generator")),
                 ("--global-batch-size", dict(type=int, default=None, help=argparse.SUPPRESS)))
    return p


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    from mindspeed_llm.explicit import explicit_dests

    parser = build_parser()
    args = parser.parse_args(argv)
    args.explicit = explicit_dests(parser, argv)     # checkpoint values fill the flags not typed
    shared.apply_flag_policy("inference", parser, args)
    validate(args)
    return args


def validate(args: argparse.Namespace) -> None:
    if not args.load:
        raise UserError("--load is required: the Megatron checkpoint root (convert_ckpt.py or posttrain_gpt.py "
                        "output)")
    if not args.tokenizer_name_or_path:
        raise UserError("--tokenizer-name-or-path is required (the Hugging Face model or tokenizer directory)")
    if args.hf_chat_template and args.prompt_type:
        raise UserError("--hf-chat-template and --prompt-type are mutually exclusive; pick one way to build prompts")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if args.num_beams < 1:
        raise UserError(f"--num-beams {args.num_beams} must be at least 1")
    if args.history_turns < 0:
        raise UserError(f"--history-turns {args.history_turns} must be >= 0")
    if args.inference_batch_size < 1:
        raise UserError(f"--inference-batch-size {args.inference_batch_size} must be at least 1")
    if args.output_file and not args.input_file:
        raise UserError("--output-file needs --input-file (the prompts to answer)")
    if args.input_file and args.task and "chat" in args.task:
        raise UserError("--task chat is interactive; it cannot be combined with --input-file")
    if args.fp16 and args.bf16:
        raise UserError("--fp16 and --bf16 are mutually exclusive")
