"""Command-line flags, spelled as in Megatron-LM and MindSpeed-LLM. One parser per entry script, built
from shared groups, parsed once into one namespace and validated there with messages that name the flag."""
from __future__ import annotations

import argparse
import json

from mindspeed_llm import flag_policy
from mindspeed_llm.data.templates import DEFAULT_TEMPLATES_PATH
from mindspeed_llm.errors import OneLineArgumentParser, UserError

THINKING = {"true": True, "false": False, "none": None}


def _thinking(value: str) -> bool | None:
    try:
        return THINKING[value.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected one of true, false, none; got {value!r}") from None


def _true_false(value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false; got {value!r}")
    return value.lower() == "true"


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
    g.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code shipped in the tokenizer directory (auto_map); only for trusted files")
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
    g = p.add_argument_group("DeepSeek-V4 template (--prompt-type deepseek4)")
    g.add_argument("--reasoning-effort", choices=("max", "high"), default=None,
                   help="with --enable-thinking true: max opens the first message with the maximum-effort paragraph "
                        "(high changes nothing)")
    g.add_argument("--drop-thinking", type=_true_false, default=True, metavar="{true,false}",
                   help="with --enable-thinking true: keep reasoning only in the last answer (default true)")
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
    parser = build_preprocess_parser()
    args = parser.parse_args(argv)
    apply_flag_policy("preprocess", parser, args)
    if args.reasoning_effort and args.enable_thinking is not True:
        raise UserError("--reasoning-effort requires --enable-thinking true")
    args.workers = max(args.workers, args.n_subs)
    if args.log_interval < 1:
        raise UserError(f"--log-interval {args.log_interval} must be at least 1")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Megatron flag groups shared by posttrain_gpt.py and inference.py
# ---------------------------------------------------------------------------------------------------------------

def _on_off(g, name: str, default: bool, help: str) -> None:
    """`--name` / `--no-name` pair writing one destination."""
    dest = name.replace("-", "_")
    g.add_argument(f"--{name}", dest=dest, action="store_true", default=default, help=help)
    g.add_argument(f"--no-{name}", dest=dest, action="store_false", help=argparse.SUPPRESS)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Model shape (Megatron-LM names). Unset values come from the checkpoint's config when one is loaded."""
    g = parser.add_argument_group("model")
    g.add_argument("--use-mcore-models", action="store_true", help="accepted; models are always megatron-core")
    g.add_argument("--use-legacy-models", action="store_true", help="not supported (error)")
    g.add_argument("--spec", nargs=2, default=None, metavar=("MODULE", "ATTR"),
                   help="layer spec, e.g. mindspeed_llm.tasks.models.spec.qwen3_spec layer_spec")
    g.add_argument("--transformer-impl", default="local", choices=["local", "transformer_engine"],
                   help="local megatron-core layers (transformer_engine is mapped to local)")
    g.add_argument("--num-layers", type=int, default=None)
    g.add_argument("--hidden-size", type=int, default=None)
    g.add_argument("--ffn-hidden-size", type=int, default=None)
    g.add_argument("--num-attention-heads", type=int, default=None)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=None)
    g.add_argument("--kv-channels", type=int, default=None, help="head dim (default hidden / heads)")
    g.add_argument("--qk-layernorm", action="store_true")
    g.add_argument("--normalization", default="RMSNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--add-qkv-bias", action="store_true")
    g.add_argument("--position-embedding-type", default="rope")
    g.add_argument("--use-rotary-position-embeddings", action="store_true")
    g.add_argument("--rotary-base", type=float, default=10000.0)
    g.add_argument("--rotary-percent", type=float, default=1.0)
    g.add_argument("--rope-scaling-type", default=None, choices=["llama3"])
    g.add_argument("--rope-scaling-factor", type=float, default=None)
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--padded-vocab-size", type=int, default=None, help="embedding rows; wins over padding")
    g.add_argument("--vocab-size", type=int, default=None, help=argparse.SUPPRESS)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--attention-softmax-in-fp32", action="store_true")
    g.add_argument("--no-masked-softmax-fusion", dest="masked_softmax_fusion", action="store_false")
    g.add_argument("--bf16", action="store_true", help="bf16 params/activations, fp32 main params and grads")
    g.add_argument("--fp16", action="store_true", help="fp16 params/activations with dynamic loss scaling")


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--num-layer-list", default=None, help="uneven pipeline split, e.g. 7,21")
    g.add_argument("--sequence-parallel", action="store_true", help="switched off automatically at TP=1")
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--context-parallel-algo", default="megatron_cp_algo")
    g.add_argument("--ulysses-degree-in-cp", type=int, default=None,
                   help="hybrid_cp_algo: Ulysses inside groups of this many CP ranks, ring across the groups")
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--use-distributed-optimizer", action="store_true", help="shard optimizer state over DP")
    g.add_argument("--distributed-backend", default=None, choices=["nccl", "gloo", "hccl", "mpi"],
                   help="default: the device's own (nccl on CUDA, hccl on Ascend, gloo on CPU); a typed one that "
                        "the device lacks falls back to it with a notice")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)
    g.add_argument("--local-rank", "--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("checkpoint")
    g.add_argument("--load", default=None, help="Megatron checkpoint root (or an HF dir with --enable-hf2mg-convert)")
    g.add_argument("--save", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--no-save-optim", action="store_true")
    g.add_argument("--no-save-rng", action="store_true")
    g.add_argument("--finetune", action="store_true", help="load weights only: iteration and samples restart at 0")
    g.add_argument("--ckpt-format", default="torch", choices=["torch", "torch_dist"])
    g.add_argument("--exit-on-missing-checkpoint", action="store_true")
    g.add_argument("--load-checkpoint-loosely", action="store_true", help="load_state_dict(strict=False)")
    g.add_argument("--enable-hf2mg-convert", action="store_true", help="--load is an HF model dir; convert at start")
    g.add_argument("--model-type-hf", default=None, help="model family of the HF checkpoint (default: config.json)")
    g.add_argument("--mg-save-dir", default=None,
                   help="where --enable-hf2mg-convert writes the converted model (default: SAVE/megatron_cache_*, "
                        "else ~/.cache/mindspeed_llm/hf2mg; never inside --load)")
    g.add_argument("--hf-cfg-dir", default=None, help=argparse.SUPPRESS)
    g.add_argument("--params-dtype", default=None, help=argparse.SUPPRESS)


def add_training_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None, help="default micro-batch x DP")
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--stage", default="sft", choices=["sft", "dpo"])
    g.add_argument("--exit-interval", type=int, default=None, help="save and exit after every N-th iteration")
    g.add_argument("--exit-duration-in-mins", type=float, default=None)
    g.add_argument("--exit-signal-handler", action="store_true", help="on SIGTERM: save and exit")
    g.add_argument("--skip-nan", action="store_true", help="skip the update on a NaN loss/grad instead of stopping")
    g.add_argument("--calculate-per-token-loss", action="store_true",
                   help="token mean over the whole global batch instead of the mean of micro-batch means")
    g.add_argument("--recompute-granularity", default=None, choices=["full", "selective"])
    g.add_argument("--recompute-method", default=None, choices=["uniform", "block"])
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--skip-train", action="store_true")
    g.add_argument("--manual-gc", action="store_true",
                   help="disable Python's automatic garbage collection; collect every --manual-gc-interval iterations")
    g.add_argument("--manual-gc-interval", type=int, default=0,
                   help="with --manual-gc: run gc.collect() every N iterations (0: only at start-up)")
    g.add_argument("--noop-layers", default=None,
                   help="global indices (e.g. 94,95) of weightless identity layers counted in --num-layers")
    g = parser.add_argument_group("MindSpeed memory switches (accepted; flag_policy says why they change nothing)")
    for name in ("recompute-activation-function", "swap-optimizer", "swap-attention",
                 "gemm-gradient-accumulation-fusion", "disable-gloo-group"):
        g.add_argument(f"--{name}", action="store_true", help=argparse.SUPPRESS)


def add_preference_args(parser: argparse.ArgumentParser) -> None:
    """MindSpeed-LLM's DPO flags (`--stage dpo`, `training.objectives.dpo`)."""
    g = parser.add_argument_group("preference training (--stage dpo)")
    g.add_argument("--dpo-beta", type=float, default=0.1, help="beta of the DPO loss (strength of the KL term)")
    g.add_argument("--dpo-loss-type", default="sigmoid", choices=["sigmoid", "hinge", "ipo"])
    g.add_argument("--dpo-label-smoothing", type=float, default=0.0,
                   help="robust (cDPO) label smoothing of the sigmoid loss, 0 to 0.5")
    g.add_argument("--pref-ftx", type=float, default=0.0,
                   help="weight of an SFT term (token-mean NLL of the chosen answer) added to the DPO loss")
    g.add_argument("--ref-model", default=None,
                   help="Megatron checkpoint of the reference model (default: the weights the run starts from)")
    g.add_argument("--refer-model-iter", type=int, default=None,
                   help="load this iteration of the reference checkpoint (default: its tracker's)")


def add_optimizer_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("optimizer and learning rate")
    g.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", default="linear", choices=["constant", "linear", "cosine", "inverse-square-root"])
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-warmup-fraction", type=float, default=None)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--start-weight-decay", type=float, default=None)
    g.add_argument("--end-weight-decay", type=float, default=None)
    g.add_argument("--weight-decay-incr-style", default="constant", choices=["constant", "linear", "cosine"])
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--sgd-momentum", type=float, default=0.9)
    g.add_argument("--loss-scale", type=float, default=None, help="fp16 static loss scale (default dynamic)")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=float, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)
    g.add_argument("--override-opt-param-scheduler", action="store_true")
    g.add_argument("--use-checkpoint-opt-param-scheduler", action="store_true")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("SFT data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="preprocessed prefix (only the first is used); pretrain_gpt.py: a blend [WEIGHT] PREFIX ...")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--is-instruction-dataset", action="store_true")
    g.add_argument("--is-pairwise-dataset", action="store_true")
    g.add_argument("--no-pad-to-seq-lengths", action="store_true", help="pad each micro-batch to its longest sample")
    g.add_argument("--pad-to-multiple-of", type=int, default=8)
    g.add_argument("--reset-attention-mask", action="store_true", help="packed rows: attention within samples")
    g.add_argument("--reset-position-ids", action="store_true", help="accepted: positions always restart per sample")
    g.add_argument("--neat-pack", action="store_true")
    g.add_argument("--no-shuffle", action="store_true")
    g.add_argument("--padded-samples", action="store_true")
    g.add_argument("--full-shuffle-instruction-dataset", action="store_true")
    g.add_argument("--cut-max-seqlen", action="store_true")
    g.add_argument("--no-cut-token", action="store_true")
    g.add_argument("--tokenizer-padding-side", default="right", choices=["right", "left"])
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    g.add_argument("--dataloader-type", default="single", choices=["single"])
    # Preprocessing flags that MindSpeed recipes also pass to training (used only by online preprocessing).
    g.add_argument("--handler-name", default="", help=argparse.SUPPRESS)
    g.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    g.add_argument("--no-shared-storage", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--map-keys", type=_json_object, default=None, help=argparse.SUPPRESS)


def add_logging_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--log-throughput", action="store_true")
    g.add_argument("--log-params-norm", action="store_true")
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--timing-log-level", type=int, default=0, help=argparse.SUPPRESS)
    g.add_argument("--log-timers-to-tensorboard", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--no-check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad",
                   action="store_false")


# Ascend/CUDA kernel and overlap switches: accepted; `flag_policy.NOTICE` says which kernel runs instead.
SPEED_FLAGS = ("use-flash-attn", "use-fused-rmsnorm", "use-fused-swiglu", "use-fused-rotary-pos-emb",
               "no-gradient-accumulation-fusion", "use-ascend-mc2", "use-ascend-coc", "coc-fused-kernel",
               "use-fused-ring-attention-update", "overlap-grad-reduce", "overlap-param-gather",
               "use-cpu-initialization", "no-bias-swiglu-fusion", "no-bias-dropout-fusion", "no-rope-fusion",
               "use-deter-comp", "reuse-fp32-param", "use-mc2", "no-async-tensor-model-parallel-allreduce",
               "use-fused-moe-token-permute-and-unpermute", "no-create-attention-mask-in-dataloader",
               "npu-deterministic", "use-cp-send-recv-overlap")
SPEED_VALUE_FLAGS = ("attention-mask-type", "cp-attention-mask-type", "cp-window-size", "coc-mode", "coc-parallel-num", "shape-order")


def add_speed_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("device kernels (accepted; the best kernel for the device is used)")
    for name in SPEED_FLAGS:
        g.add_argument(f"--{name}", action="store_true", help=argparse.SUPPRESS)
    for name in SPEED_VALUE_FLAGS:
        g.add_argument(f"--{name}", default=None, help=argparse.SUPPRESS)
    g = parser.add_argument_group("recognised, not implemented (an error when given)")
    g.add_argument("--enable-mg2hf-convert", action="store_true", default=None, help=argparse.SUPPRESS)


MOE_SPEED_FLAGS = ("moe-permutation-async-comm", "moe-alltoall-overlap-comm", "moe-permute-fusion",
                   "moe-fb-overlap", "moe-grouped-gemm")


def add_moe_args(parser: argparse.ArgumentParser) -> None:
    """MindSpeed-LLM's mixture-of-experts flags (Qwen3-MoE recipes). Unset shape values come from the checkpoint
    or config.json; `flag_policy` says which kernel switches have no effect."""
    g = parser.add_argument_group("mixture of experts")
    g.add_argument("--num-experts", type=int, default=None, help="routed experts per MoE layer")
    g.add_argument("--moe-router-topk", type=int, default=None, help="experts per token")
    g.add_argument("--moe-ffn-hidden-size", "--moe-intermediate-size", dest="moe_ffn_hidden_size", type=int,
                   default=None, help="each expert's FFN size (--moe-intermediate-size: older spelling)")
    g.add_argument("--norm-topk-prob", action="store_true", help="renormalise the top-k routing weights")
    g.add_argument("--moe-router-load-balancing-type", default="aux_loss",
                   choices=["aux_loss", "none", "softmax_topk"],
                   help="aux_loss: Switch load-balancing loss; none / softmax_topk (MindSpeed: same routing, "
                        "no aux loss)")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=None,
                   help="weight of the load-balancing loss (default: the checkpoint's, else config.json's)")
    g.add_argument("--moe-layer-freq", type=int, default=None, help="MindSpeed: with --first-k-dense-replace, "
                   "which layers are MoE; checked against the model")
    g.add_argument("--first-k-dense-replace", type=int, default=None, help="MindSpeed: leading dense layers")
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None,
                   help="1: whole experts on every TP rank; default: experts split over TP like the dense MLP")
    g.add_argument("--moe-token-dispatcher-type", default="allgather", choices=["allgather", "alltoall", "alltoall_seq"],
                   help="megatron-core token dispatcher (alltoall_seq runs as alltoall)")
    for name in MOE_SPEED_FLAGS:
        g.add_argument(f"--{name}", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--moe-zero-memory", default=None, help=argparse.SUPPRESS)


def add_lora_args(parser: argparse.ArgumentParser, training: bool) -> None:
    """MindSpeed-LLM's LoRA flags: --lora-target-modules switches LoRA on (`models.lora`)."""
    g = parser.add_argument_group("LoRA")
    g.add_argument("--lora-target-modules", nargs="+", default=None, metavar="MODULE",
                   help="add adapters to these megatron layers: linear_qkv linear_proj linear_fc1 linear_fc2")
    g.add_argument("--lora-r", type=int, default=None, help="adapter rank (default 16, or the --lora-load one)")
    g.add_argument("--lora-alpha", type=float, default=None,
                   help="adapter scale alpha/r (default 32, or the --lora-load one)")
    g.add_argument("--lora-load", default=None,
                   help="LoRA checkpoint (adapters, and optimizer state to resume) on top of the --load base")
    if not training:
        g.add_argument("--lora-ignore-base-mismatch", action="store_true",
                       help="merge the --lora-load adapters even though --load is not the base they were trained "
                            "on (by its weights' fingerprint)")
        return
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapter input (default 0)")
    g.add_argument("--lora-modules-to-save", nargs="+", default=None, metavar="MODULE",
                   help="modules trained in full beside the adapters, e.g. word_embeddings output_layer")
    g.add_argument("--lora-ckpt-filter", action="store_true",
                   help="checkpoints hold only the trained weights (adapters), not the frozen base")
    g.add_argument("--lora-fusion", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--lora-register-forward-hook", nargs="+", default=None, help=argparse.SUPPRESS)


def add_loaded_model_args(parser: argparse.ArgumentParser) -> None:
    """The flags of a tool that loads a trained model to run it (inference.py, evaluation.py): shape, parallel
    layout, checkpoint, device kernels, adapters, tokenizer and chat template."""
    add_model_args(parser)
    add_parallel_args(parser)
    add_checkpoint_args(parser)
    add_speed_args(parser)
    add_moe_args(parser)
    add_lora_args(parser, training=False)
    add_tokenizer_args(parser)
    add_template_args(parser)


def add_mindspeed_spellings(parser: argparse.ArgumentParser) -> None:
    """Flags of MindSpeed-LLM's published recipes, older releases included, that training also accepts."""
    g = parser.add_argument_group("MindSpeed-LLM recipe spellings")
    g.add_argument("--variable-seq-lengths", dest="no_pad_to_seq_lengths", action="store_true",
                   help="older spelling of --no-pad-to-seq-lengths (v2.1.0, v2.2.0 recipes)")
    g.add_argument("--pack", action="store_true",
                   help="the data at --data-path must be packed (preprocess_data.py --pack); checked against it")


def add_pretrain_data_args(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM's pretraining data flags (pretrain_gpt.py, `training.pretrain_data`)."""
    g = parser.add_argument_group("pretraining data")
    g.add_argument("--train-data-path", nargs="+", default=None,
                   help="blend of the train split alone ([WEIGHT] PREFIX ...); replaces --data-path and --split")
    g.add_argument("--valid-data-path", nargs="+", default=None, help="blend of the validation split alone")
    g.add_argument("--test-data-path", nargs="+", default=None, help="blend of the test split alone")
    g.add_argument("--eod-mask-loss", action="store_true", help="no loss on predicting the token after an EOD")


def build_train_parser(pretrain: bool = False) -> OneLineArgumentParser:
    """posttrain_gpt.py's flags, or with `pretrain` pretrain_gpt.py's: the same plus the pretraining data flags;
    `flag_policy` refuses the instruction-data ones there."""
    p = OneLineArgumentParser(prog="pretrain_gpt.py" if pretrain else "posttrain_gpt.py",
                              description=("Pretraining" if pretrain else "Supervised fine-tuning")
                              + " on megatron-core (torchrun)", allow_abbrev=False)
    add_model_args(p)
    add_parallel_args(p)
    add_checkpoint_args(p)
    add_training_args(p)
    add_optimizer_args(p)
    add_preference_args(p)
    add_data_args(p)
    add_logging_args(p)
    add_speed_args(p)
    add_moe_args(p)
    add_lora_args(p, training=True)
    add_tokenizer_args(p)
    add_template_args(p)
    add_mindspeed_spellings(p)
    if pretrain:
        add_pretrain_data_args(p)
        p.set_defaults(stage="pretrain")
    return p


def parse_train_args(argv: list[str] | None = None, pretrain: bool = False) -> argparse.Namespace:
    """Parse and validate the fine-tuning flags, or with `pretrain` pretrain_gpt.py's (sizes that need the world
    size are checked at start-up)."""
    from mindspeed_llm.training.validate import validate_train_args

    from mindspeed_llm.explicit import explicit_dests

    parser = build_train_parser(pretrain)
    args = parser.parse_args(argv)
    args.explicit = explicit_dests(parser, argv)     # typed flags: checked against checkpoint and data; rest filled
    apply_flag_policy("pretrain" if pretrain else "train", parser, args)
    validate_train_args(args)
    return args


def parse_pretrain_args(argv: list[str] | None = None) -> argparse.Namespace:
    """pretrain_gpt.py's flags, parsed and validated (`args.stage` is "pretrain")."""
    return parse_train_args(argv, pretrain=True)


def apply_flag_policy(tool: str, parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Errors for unsupported values and one notice line per no-effect flag (see `flag_policy`)."""
    from mindspeed_llm.platform import detect_platform, notice

    from mindspeed_llm.explicit import explicit_of

    flag_policy.apply(tool, parser, args, explicit_of(args, parser), detect_platform().device_type, notice)


def params_dtype(args: argparse.Namespace):
    """The torch dtype that --bf16 / --fp16 select (fp32 without either)."""
    import torch

    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
