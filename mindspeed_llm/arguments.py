"""Command-line flags, spelled as in Megatron-LM and MindSpeed-LLM. One parser per entry script, built
from shared groups, parsed once into one namespace and validated there with messages that name the flag."""
from __future__ import annotations

import argparse
import json

from mindspeed_llm.data.templates import DEFAULT_TEMPLATES_PATH
from mindspeed_llm.errors import OneLineArgumentParser

THINKING = {"true": True, "false": False, "none": None}


def _thinking(value: str) -> bool | None:
    try:
        return THINKING[value.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected one of true, false, none; got {value!r}") from None


def _json_object(value: str) -> dict:
    try:
        obj = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg}): {value!r}") from None
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r}")
    return obj


def add_tokenizer_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", default="PretrainedFromHF", help="only PretrainedFromHF is supported")
    g.add_argument("--tokenizer-name-or-path", default=None, help="local Hugging Face model/tokenizer directory")
    g.add_argument("--tokenizer-not-use-fast", action="store_true", help="use the slow (Python) tokenizer")
    g.add_argument("--seq-length", type=int, default=None,
                   help="token budget per sample (truncation keeps the sample) and packed row length")


def add_template_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("chat template")
    g.add_argument("--prompt-type", default=None, help="template name in --prompt-type-path (e.g. qwen3, qwen_lf)")
    g.add_argument("--prompt-type-path", default=str(DEFAULT_TEMPLATES_PATH), help="templates JSON file")
    g.add_argument("--enable-thinking", type=_thinking, default=None, metavar="{true,false,none}",
                   help="true: train <think> blocks (empty where absent); false: empty block in the masked "
                        "prompt, CoT removed; none: keep what the data has")


def build_preprocess_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="preprocess_data.py",
                                description="Raw instruction/pretraining data -> Megatron indexed datasets")
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True,
                   help="file, directory, glob or comma-separated list (.parquet .csv .json .jsonl .txt .arrow)")
    g.add_argument("--handler-name", default="", help="GeneralPretrainHandler, AlpacaStyleInstructionHandler, "
                   "SharegptStyleInstructionHandler, OpenAIInstructionHandler, AlpacaStylePairwiseHandler, "
                   "SharegptStylePairwiseHandler")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="pretraining: the text columns to tokenize")
    g.add_argument("--map-keys", type=_json_object, default=None,
                   help='column and tag mapping, e.g. \'{"prompt": "question", "system": "sys"}\'')
    g.add_argument("--pack", action="store_true", help="pack samples into rows of exactly --seq-length tokens")
    g.add_argument("--neat-pack", action="store_true",
                   help="with --pack: store per-sample segment ids so training can isolate samples")
    g.add_argument("--cache-dir", default=None, help="accepted for compatibility; input is streamed, no cache")
    g.add_argument("--overwrite-cache", action="store_true", help="accepted for compatibility; no cache is kept")
    add_template_args(p)
    add_tokenizer_args(p)
    g = p.add_argument_group("output and runtime")
    g.add_argument("--output-prefix", required=True, help="path prefix of the output files")
    g.add_argument("--append-eod", action="store_true", help="append the eos token (trained) to every sample")
    g.add_argument("--workers", type=int, default=1, help="encoding processes")
    g.add_argument("--n-subs", type=int, default=1,
                   help="parallel sub-processes; same output as 1 (processes = max(--workers, --n-subs))")
    g.add_argument("--log-interval", type=int, default=1000, help="log progress every N samples")
    return p


def parse_preprocess_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_preprocess_parser().parse_args(argv)
    args.workers = max(args.workers, args.n_subs)
    if args.log_interval < 1:
        build_preprocess_parser().error(f"--log-interval {args.log_interval} must be at least 1")
    return args
