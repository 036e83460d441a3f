"""Flag validation for posttrain_gpt.py: one `UserError` line naming the flag, before any process group exists."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from mindspeed_llm.checkpoint.layout import TRACKER
from mindspeed_llm.errors import UserError
from mindspeed_llm.models import lora
from mindspeed_llm.models.context_parallel import CP_ATTENTION


def _need(args: argparse.Namespace, name: str, why: str = "") -> None:
    if getattr(args, name) is None:
        raise UserError(f"--{name.replace('_', '-')} is required{why}")


def validate_train_args(args: argparse.Namespace) -> None:
    """Checks that need no world size; derived values (`params_dtype`, `data_path` as one prefix) are set here."""
    if args.stage == "dpo":
        validate_dpo_args(args)
    elif args.is_pairwise_dataset:
        raise UserError("--is-pairwise-dataset: pairwise (chosen/rejected) data trains with --stage dpo")
    if args.bf16 and args.fp16:
        raise UserError("--bf16 and --fp16 are mutually exclusive")
    _need(args, "train_iters")
    _need(args, "lr")
    if args.stage == "pretrain":
        validate_pretrain_data_args(args)
    else:
        validate_instruction_data_args(args)
    if args.train_iters < 0 or args.micro_batch_size < 1 or args.seq_length < 1:
        raise UserError("--train-iters, --micro-batch-size and --seq-length must be positive")
    if args.neat_pack and not args.reset_attention_mask:
        raise UserError("--neat-pack requires --reset-attention-mask")
    if args.reset_attention_mask and args.no_pad_to_seq_lengths:
        raise UserError("--reset-attention-mask (packed rows) and --no-pad-to-seq-lengths cannot be combined; "
                        "packed rows already fill --seq-length")
    if args.pad_to_multiple_of < 1:
        raise UserError(f"--pad-to-multiple-of {args.pad_to_multiple_of} must be at least 1")
    if args.log_interval < 1:
        raise UserError(f"--log-interval {args.log_interval} must be at least 1")
    if args.save_interval is not None and args.save_interval < 1:
        raise UserError(f"--save-interval {args.save_interval} must be at least 1")
    if args.exit_interval is not None and args.exit_interval < 1:
        raise UserError(f"--exit-interval {args.exit_interval} must be at least 1")
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise UserError("--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler are mutually "
                        "exclusive: the first takes the schedule from the flags, the second from the checkpoint")
    if args.load and not os.path.isdir(args.load):
        raise UserError(f"--load {args.load}: no such directory. To start from randomly initialised weights, "
                        f"drop --load; to fine-tune, point it at a checkpoint (convert_ckpt.py output)")
    if args.lora_load and not os.path.isfile(os.path.join(args.lora_load, TRACKER)):
        raise UserError(f"--lora-load {args.lora_load}: no LoRA checkpoint there (no {TRACKER}); drop --lora-load "
                        f"to start new adapters")
    if lora.spec_from_args(args) is not None and not args.load:
        raise UserError("--lora-target-modules: LoRA trains adapters on a base model; pass its checkpoint in --load")
    if args.lora_ckpt_filter and not args.lora_target_modules:
        raise UserError("--lora-ckpt-filter needs --lora-target-modules (it keeps only the adapters in checkpoints)")
    if args.enable_hf2mg_convert and not args.load:
        raise UserError("--enable-hf2mg-convert needs --load pointing at a Hugging Face model directory")
    if args.lr_warmup_fraction is not None and args.lr_warmup_iters:
        raise UserError("--lr-warmup-fraction and --lr-warmup-iters are mutually exclusive")
    if args.noop_layers and args.num_layers is None:
        raise UserError("--noop-layers needs --num-layers (which counts the noop layers, as in MindSpeed)")
    if args.manual_gc_interval < 0:
        raise UserError(f"--manual-gc-interval {args.manual_gc_interval}: must be >= 0 (0: collect only at start-up)")
    if args.recompute_granularity == "full" and args.recompute_method is None:
        raise UserError("--recompute-granularity full needs --recompute-method uniform or block")
    if args.tensor_model_parallel_size < 1 or args.pipeline_model_parallel_size < 1:
        raise UserError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be at least 1")
    if args.num_experts is not None:
        check_expert_split(args.num_experts, args.expert_model_parallel_size, "--num-experts")
        check_moe_sequence_parallel(args, "--num-experts")
    if args.tensor_model_parallel_size == 1:
        args.sequence_parallel = False       # Megatron switches SP off at TP=1
    validate_context_parallel(args)
    if args.start_weight_decay is None:
        args.start_weight_decay = args.weight_decay
    if args.end_weight_decay is None:
        args.end_weight_decay = args.weight_decay
    # Packed DPO rows are as long as their pairs: the pipeline exchanges each micro-batch's shape.
    # Packed rows split across CP ranks are padded per sample (`context_parallel.split_packed_batch_for_cp`).
    args.variable_seq_lengths = bool(args.no_pad_to_seq_lengths
                                     or (args.reset_attention_mask and (args.stage == "dpo"
                                                                        or args.context_parallel_size > 1)))


def validate_pretrain_data_args(args: argparse.Namespace) -> None:
    """pretrain_gpt.py: a blend in --data-path (split by --split) or per split, of PREFIX.bin/.idx pairs."""
    from mindspeed_llm.data.handlers import PRETRAIN_HANDLERS
    from mindspeed_llm.training.pretrain_data import blends_from_args

    per_split = args.train_data_path or args.valid_data_path or args.test_data_path
    if args.data_path and per_split:
        raise UserError("--data-path and --train-data-path/--valid-data-path/--test-data-path are mutually "
                        "exclusive: give one blend split by --split, or one blend per split")
    if not args.data_path and not args.train_data_path:
        raise UserError("--data-path is required (the PREFIX_text_document of preprocess_data.py --handler-name "
                        "GeneralPretrainHandler), or --train-data-path")
    if args.handler_name and args.handler_name not in PRETRAIN_HANDLERS:
        raise UserError(f"--handler-name {args.handler_name}: pretrain_gpt.py trains on "
                        f"{' or '.join(PRETRAIN_HANDLERS)} data; instruction data trains with posttrain_gpt.py")
    _need(args, "seq_length")
    blends_from_args(args)           # weights parse, every prefix has its .bin and .idx


def validate_instruction_data_args(args: argparse.Namespace) -> None:
    """posttrain_gpt.py: one preprocessed instruction (or pairwise) prefix in --data-path."""
    if not args.data_path:
        raise UserError("--data-path is required (the --output-prefix given to preprocess_data.py)")
    args.data_path = args.data_path[0]      # MindSpeed uses only the first prefix for instruction data
    if not args.is_instruction_dataset and not args.is_pairwise_dataset:
        raise UserError("--is-instruction-dataset is required: posttrain_gpt.py trains on preprocessed "
                        "instruction data (pretraining text trains with pretrain_gpt.py)")
    for text_prefix in (args.data_path, args.data_path + "_text_document"):
        if os.path.isfile(text_prefix + ".idx"):
            raise UserError(f"--data-path {args.data_path}: pretraining text ({text_prefix}.bin/.idx from "
                            f"preprocess_data.py --handler-name GeneralPretrainHandler); it trains with "
                            f"pretrain_gpt.py. posttrain_gpt.py reads instruction data")
    if os.path.isfile(args.data_path) or os.path.isdir(args.data_path):
        raise UserError(f"--data-path {args.data_path} is a raw file or directory; online preprocessing is not "
                        f"implemented: run preprocess_data.py first and pass its --output-prefix")
    _need(args, "seq_length")
    adopt_data_flags(args)


def validate_context_parallel(args: argparse.Namespace) -> None:
    """--context-parallel-size N > 1 splits right-padded SFT batches into 2N chunks (2 per rank), packed rows
    per sample."""
    cp = args.context_parallel_size
    if cp < 1:
        raise UserError(f"--context-parallel-size {cp} must be at least 1")
    if args.ulysses_degree_in_cp is not None and args.context_parallel_algo != "hybrid_cp_algo":
        raise UserError(f"--ulysses-degree-in-cp {args.ulysses_degree_in_cp} applies only to --context-parallel-algo "
                        f"hybrid_cp_algo (given: {args.context_parallel_algo})")
    if cp == 1:
        return
    if args.context_parallel_algo not in CP_ATTENTION:
        raise UserError(f"--context-parallel-algo {args.context_parallel_algo}: not implemented; use one of "
                        f"{', '.join(CP_ATTENTION)}")
    if args.context_parallel_algo == "hybrid_cp_algo":
        degree = args.ulysses_degree_in_cp
        if not degree or degree < 1 or cp % degree or cp // degree < 2:
            raise UserError(f"--context-parallel-algo hybrid_cp_algo needs --ulysses-degree-in-cp dividing "
                            f"--context-parallel-size {cp} with a ring of at least 2 (got {degree})")
    if args.tokenizer_padding_side == "left":
        raise UserError(f"--tokenizer-padding-side left cannot be used with --context-parallel-size {cp} (CP "
                        f"attention is causal without a padding mask)")
    if args.reset_attention_mask:
        return      # every packed sample is padded to a multiple of 2 x CP when the row is split
    if args.no_pad_to_seq_lengths:
        if args.pad_to_multiple_of % (2 * cp):
            raise UserError(f"--pad-to-multiple-of {args.pad_to_multiple_of} must be divisible by 2 x "
                            f"--context-parallel-size = {2 * cp} (each CP rank holds 2 of 2 x CP chunks)")
    elif args.seq_length % (2 * cp):
        raise UserError(f"--seq-length {args.seq_length} must be divisible by 2 x --context-parallel-size = {2 * cp} "
                        f"(each CP rank holds 2 of 2 x CP chunks)")


def validate_dpo_args(args: argparse.Namespace) -> None:
    """`--stage dpo`: preference training (full-parameter or LoRA) on pairwise data, padded or packed per
    micro-batch (--reset-attention-mask)."""
    if not args.is_pairwise_dataset:
        raise UserError("--stage dpo needs --is-pairwise-dataset (data from preprocess_data.py --handler-name "
                        "AlpacaStylePairwiseHandler or SharegptStylePairwiseHandler)")
    if args.dpo_beta <= 0:
        raise UserError(f"--dpo-beta {args.dpo_beta} must be positive")
    if not 0.0 <= args.dpo_label_smoothing <= 0.5:
        raise UserError(f"--dpo-label-smoothing {args.dpo_label_smoothing} must be between 0 and 0.5")
    if args.dpo_label_smoothing and args.dpo_loss_type != "sigmoid":
        raise UserError(f"--dpo-label-smoothing applies to --dpo-loss-type sigmoid, not {args.dpo_loss_type}")
    if args.pack or args.neat_pack:
        raise UserError("--pack/--neat-pack with --stage dpo: pairwise data is preprocessed unpacked; drop the flag "
                        "(--reset-attention-mask packs each micro-batch's pairs at training time)")
    if args.calculate_per_token_loss:
        raise UserError("--calculate-per-token-loss with --stage dpo: the DPO loss is a mean over pairs, not tokens")
    if not args.load and not args.ref_model:
        raise UserError("--stage dpo needs starting weights: pass --load (a converted checkpoint), which also "
                        "serves as the reference unless --ref-model is given")
    if args.ref_model and not os.path.isdir(args.ref_model):
        raise UserError(f"--ref-model {args.ref_model}: no such directory (a Megatron checkpoint from convert_ckpt.py)")
    if args.refer_model_iter is not None and args.refer_model_iter < 0:
        raise UserError(f"--refer-model-iter {args.refer_model_iter} must be a saved iteration (0 or more)")


# Flags whose value is fixed when the data is preprocessed: unless given for training, they take the value in
# PREFIX_preprocess.json (MindSpeed's data recipes pass them to preprocess_data.py only). An explicit, different
# value is refused later by `batching.check_sidecar`.
ADOPTED_FROM_DATA = ("prompt_type", "enable_thinking", "handler_name", "neat_pack")


def adopt_data_flags(args: argparse.Namespace) -> list[str]:
    """Fill the `ADOPTED_FROM_DATA` flags the command line left out from the data's sidecar; one log line each.
    Returns the adopted flag names."""
    from mindspeed_llm.training.sft_dataset import read_sidecar

    sidecar = read_sidecar(args.data_path)
    explicit = getattr(args, "explicit", None)
    if sidecar is None or explicit is None:
        return []
    adopted = []
    for dest in ADOPTED_FROM_DATA:
        if dest in explicit or dest not in sidecar or sidecar[dest] == getattr(args, dest, None):
            continue
        if dest == "neat_pack" and not args.reset_attention_mask:
            continue                         # packed data without --reset-attention-mask is refused as such
        setattr(args, dest, sidecar[dest])
        adopted.append(dest)
        if os.environ.get("RANK", "0") == "0":
            shown = "none" if sidecar[dest] is None else str(sidecar[dest]).lower() if isinstance(
                sidecar[dest], bool) else sidecar[dest]
            print(f"[mindspeed_llm] --{dest.replace('_', '-')} {shown}: taken from {args.data_path}_preprocess.json "
                  f"(not given for training)", flush=True)
    return adopted


@dataclass(frozen=True)
class World:
    """What the world size decides: the data-parallel size, the global batch and micro-batches per step."""
    data_parallel_size: int
    global_batch_size: int
    num_microbatches: int


def resolve_world(args: argparse.Namespace, world_size: int) -> World:
    """DP size, micro-batch count and sequence-parallel divisibility, once the world size is known."""
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    if world_size % (tp * pp * cp):
        raise UserError(f"{world_size} processes (torchrun --nproc_per_node x --nnodes) is not a multiple of "
                        f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} x "
                        f"--context-parallel-size {cp}; launch a multiple of {tp * pp * cp}")
    dp = world_size // (tp * pp * cp)
    ep = args.expert_model_parallel_size
    etp = args.expert_tensor_parallel_size
    if etp not in (None, tp, 1):
        raise UserError(f"--expert-tensor-parallel-size {etp}: only 1 (whole experts on every TP rank) or "
                        f"--tensor-model-parallel-size {tp} (the default) is implemented, as in MindSpeed")
    if etp == 1 and tp > 1:
        # megatron-core's expert groups: ETP x EP x PP ranks per expert replica
        if ep < 1 or world_size % (ep * pp):
            raise UserError(f"--expert-model-parallel-size {ep} x --expert-tensor-parallel-size 1 x "
                            f"--pipeline-model-parallel-size {pp} does not divide {world_size} processes")
    elif ep < 1 or (dp * cp) % ep:        # megatron-core's expert groups span DP x CP
        raise UserError(f"--expert-model-parallel-size {ep} x --tensor-model-parallel-size {tp} x "
                        f"--pipeline-model-parallel-size {pp} x --context-parallel-size {cp} does not fit "
                        f"{world_size} processes: expert parallelism splits the {dp * cp} data- and context-parallel "
                        f"ranks of each TP/PP slot, so EP must divide {dp * cp}")
    gbs = args.micro_batch_size * dp if args.global_batch_size is None else args.global_batch_size
    if gbs % (args.micro_batch_size * dp):
        raise UserError(f"--global-batch-size {gbs} is not divisible by --micro-batch-size "
                        f"{args.micro_batch_size} x data-parallel size {dp} (= {world_size} processes / "
                        f"(TP {tp} x PP {pp} x CP {cp}))")
    world = World(dp, gbs, gbs // (args.micro_batch_size * dp))
    if args.sequence_parallel:
        if args.seq_length % tp:
            raise UserError(f"--sequence-parallel: --seq-length {args.seq_length} must be divisible by TP {tp}")
        if args.variable_seq_lengths and args.pad_to_multiple_of % tp:
            raise UserError(f"--sequence-parallel: --pad-to-multiple-of {args.pad_to_multiple_of} must be "
                            f"divisible by TP {tp}")
    if args.num_layers_per_virtual_pipeline_stage and pp > 1 and world.num_microbatches % pp:
        raise UserError(f"interleaved pipeline: the number of micro-batches {world.num_microbatches} "
                        f"(--global-batch-size / (--micro-batch-size x DP)) must be a multiple of PP {pp}")
    return world


def check_moe_sequence_parallel(args: argparse.Namespace, source: str) -> None:
    """megatron-core's MoE layer refuses to train under tensor parallelism without sequence parallelism."""
    tp = args.tensor_model_parallel_size
    if tp > 1 and not args.sequence_parallel:
        raise UserError(f"--tensor-model-parallel-size {tp}: {source} makes this a mixture-of-experts model, whose "
                        f"layers train under tensor parallelism only with --sequence-parallel (megatron-core); add it")


def check_expert_split(num_experts: int, ep: int, source: str) -> None:
    if ep < 1 or num_experts % ep:
        raise UserError(f"--expert-model-parallel-size {ep} does not divide the {num_experts} experts of {source}; "
                        f"use a divisor of {num_experts}")
