"""The typed configuration of a training run (posttrain_gpt.py, pretrain_gpt.py), resolved once at the entry
(`training.resolve_run`):

    run = resolve_run(parse_train_args())      # flags checked, world size applied, model resolved
    train(run)                                 # training.loop: reads `run`, never the argparse Namespace

`RunConfig` is the model the resolver settled on (`models.resolve`: flags, the --load checkpoint's saved args,
config.json with --enable-hf2mg-convert) plus the training settings, in sections; a field is named as the flag
it comes from (`run.optim.lr` is --lr, `run.parallel.tensor_model_parallel_size` is
--tensor-model-parallel-size), so a Megatron user finds each one by its flag; a few fields are resolved values
(the data-parallel size and micro-batches per step from the world size, the start-up conversion's directory).
Everything is frozen: what a checkpoint records is built from the config (`saved_args`), nothing writes back.
"""
from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional, Union

import torch

from mindspeed_llm.data.prompt_type import get_template
from mindspeed_llm.models.config import ModelConfig
from mindspeed_llm.models.lora import LoraSpec
from mindspeed_llm.models.resolve import model_record
from mindspeed_llm.tokenizer import build_tokenizer


@dataclass(frozen=True)
class ParallelSettings:
    """How the model and the batch are split over the processes."""
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    num_layers_per_virtual_pipeline_stage: Optional[int]
    num_layer_list: Optional[str]
    expert_model_parallel_size: int
    expert_tensor_parallel_size: Optional[int]
    context_parallel_size: int
    context_parallel_algo: str
    ulysses_degree_in_cp: Optional[int]
    sequence_parallel: bool                  # off at TP 1, as in Megatron
    use_distributed_optimizer: bool
    distributed_backend: str
    distributed_timeout_minutes: int
    world_size: int                          # resolved: torchrun's WORLD_SIZE
    data_parallel_size: int                  # resolved: world / (TP x PP x CP)


@dataclass(frozen=True)
class BatchSettings:
    micro_batch_size: int
    global_batch_size: int                   # resolved: micro-batch x DP when not given
    num_microbatches: int                    # resolved: global / (micro-batch x DP)
    variable_seq_lengths: bool               # resolved: the pipeline exchanges each micro-batch's shape


@dataclass(frozen=True)
class DataSettings:
    """The dataset, how samples are batched, and the tokenizer and template the data was made with."""
    data_path: Union[str, list, None]        # one instruction prefix (posttrain), or a pretraining blend
    split: str
    data_cache_path: Optional[str]
    num_workers: int
    seq_length: int
    is_instruction_dataset: bool
    is_pairwise_dataset: bool
    handler_name: Optional[str]
    prompt_type: Optional[str]
    prompt_type_path: Optional[str]
    enable_thinking: Any
    tokenizer_name_or_path: Optional[str]
    tokenizer_type: str
    tokenizer_not_use_fast: bool
    tokenizer_padding_side: Optional[str]
    trust_remote_code: bool
    reset_attention_mask: bool
    reset_position_ids: bool
    pack: bool
    neat_pack: bool
    no_shuffle: bool
    full_shuffle_instruction_dataset: bool
    padded_samples: bool
    cut_max_seqlen: bool
    no_cut_token: bool
    pad_to_multiple_of: int
    no_pad_to_seq_lengths: bool
    # pretrain_gpt.py only
    train_data_path: Optional[list] = None
    valid_data_path: Optional[list] = None
    test_data_path: Optional[list] = None
    eod_mask_loss: bool = False


@dataclass(frozen=True)
class LayerSettings:
    """How the resolved model's layers are built and computed: precision, initialisation, dropout, fused kernels,
    recomputation, the MoE dispatcher and load balancing."""
    bf16: bool
    fp16: bool
    init_method_std: float
    hidden_dropout: float
    attention_dropout: float
    spec: Optional[list]
    use_fused_rmsnorm: bool
    use_fused_rotary_pos_emb: bool
    no_rope_fusion: bool
    use_fused_swiglu: bool
    no_bias_swiglu_fusion: bool
    no_gradient_accumulation_fusion: bool
    recompute_granularity: Optional[str]
    recompute_method: Optional[str]
    recompute_num_layers: Optional[int]
    moe_grouped_gemm: bool
    moe_token_dispatcher_type: str
    moe_router_load_balancing_type: Optional[str]
    moe_aux_loss_coeff: Optional[float]

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32


@dataclass(frozen=True)
class OptimizerSettings:
    optimizer: str
    lr: float
    min_lr: float
    weight_decay: float
    start_weight_decay: float                # resolved: --weight-decay when not given
    end_weight_decay: float                  # resolved: --weight-decay when not given
    weight_decay_incr_style: str
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    sgd_momentum: float
    clip_grad: float
    loss_scale: Optional[float]
    initial_loss_scale: float
    min_loss_scale: float
    loss_scale_window: float
    hysteresis: int
    lr_decay_iters: Optional[int]
    lr_decay_style: str
    lr_warmup_fraction: Optional[float]
    lr_warmup_iters: int
    lr_warmup_init: float
    use_checkpoint_opt_param_scheduler: bool
    override_opt_param_scheduler: bool


@dataclass(frozen=True)
class LoopSettings:
    """How long the loop runs, what it logs and evaluates, and when it stops."""
    train_iters: int
    skip_train: bool
    log_interval: int
    eval_interval: Optional[int]
    eval_iters: int
    exit_interval: Optional[int]
    exit_duration_in_mins: Optional[float]
    exit_signal_handler: bool
    manual_gc: bool
    manual_gc_interval: int
    check_for_nan_in_loss_and_grad: bool
    skip_nan: bool
    calculate_per_token_loss: bool
    tensorboard_dir: Optional[str]
    log_throughput: bool                     # TFLOP/s in the log line, as Megatron


@dataclass(frozen=True)
class CheckpointSettings:
    load: Optional[str]                      # with --enable-hf2mg-convert: where the HF model is converted to
    save: Optional[str]
    save_interval: Optional[int]
    finetune: bool
    no_load_optim: bool
    no_load_rng: bool
    no_save_optim: bool
    no_save_rng: bool
    exit_on_missing_checkpoint: bool
    load_checkpoint_loosely: bool
    enable_hf2mg_convert: bool
    model_type_hf: Optional[str]             # the family of the HF model converted at start-up
    lora_load: Optional[str]
    lora_ckpt_filter: bool
    hf_dir: Optional[str] = None             # resolved: the HF model directory --load named (hf2mg at start-up)


@dataclass(frozen=True)
class DPOSettings:
    """--stage dpo: the preference loss and where its frozen reference comes from."""
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    ftx: float = 0.0
    ref_model: Optional[str] = None
    refer_model_iter: Optional[int] = None


@dataclass(frozen=True)
class RunConfig:
    stage: str                               # "sft", "dpo" or "pretrain": the objective (`objectives.OBJECTIVES`)
    seed: int
    model: ModelConfig                       # the resolver's model (`models.resolve`)
    lora: Optional[LoraSpec]                 # None: every weight trains
    parallel: ParallelSettings
    batch: BatchSettings
    data: DataSettings
    layers: LayerSettings
    optim: OptimizerSettings
    loop: LoopSettings
    checkpoint: CheckpointSettings
    dpo: DPOSettings
    # Every parsed flag with the value the run uses: what `print_args` shows and a save records (`saved_args`).
    # Code reads the sections above.
    flags: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def saved_args(self, **extra: Any) -> argparse.Namespace:
        """What a training save records as its `args` (Megatron's format): the flags with the values the run
        resolved, the resolved model (mg -> hf and later loads read it), and `extra`."""
        return argparse.Namespace(**{**self.flags, **model_record(self.model),
                                     "model_type_hf": self.flags.get("model_type_hf") or self.model.family, **extra})


SECTIONS = ("parallel", "batch", "data", "layers", "optim", "loop", "checkpoint", "dpo")


def section(cls, values: Mapping[str, Any], **resolved: Any):
    """`cls` filled from the flag values of the same names; `resolved` gives the derived fields."""
    return cls(**{f.name: resolved[f.name] if f.name in resolved else values[f.name] for f in fields(cls)
                  if f.name in resolved or f.name in values})


def load_tokenizer(data: DataSettings, hf_dir: Optional[str] = None):
    """The run's tokenizer (with the --prompt-type template's stop word as eos), from --tokenizer-name-or-path or
    else the HF model directory `hf_dir` (--enable-hf2mg-convert). Loaded once per settings: the resolver (which
    needs its length) and the loop share it."""
    return _tokenizer(data.tokenizer_name_or_path or hf_dir, not data.tokenizer_not_use_fast, data.prompt_type,
                      data.prompt_type_path, data.tokenizer_type, data.seq_length, data.trust_remote_code)


@functools.lru_cache(maxsize=4)
def _tokenizer(path: Optional[str], use_fast: bool, prompt_type: Optional[str], prompt_type_path: Optional[str],
               tokenizer_type: str, seq_length: int, trust_remote_code: bool):
    template = None
    if prompt_type:
        template = get_template(prompt_type, prompt_type_path)
    return build_tokenizer(path, use_fast=use_fast, template=template, tokenizer_type=tokenizer_type,
                           seq_length=seq_length, trust_remote_code=trust_remote_code)
