"""What each command-line flag does, per entry script, in one table.

Every flag a parser accepts is exactly one of:
  implemented  -- the code reads it (`IMPLEMENTED`);
  notice       -- accepted, one line on stderr names it and says why it changes nothing on this device
                  (`NOTICE`; printed only when the flag is given);
  error        -- only its default (or the `Allowed` values) is honoured: any other value stops with an error
                  naming it (`ERROR`).
tests/test_flag_policy.py enumerates every option of the four parsers and checks it is in one of these sets (and,
for implemented ones, that some module reads it).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

from mindspeed_llm.errors import UserError

TOOLS = ("train", "pretrain", "inference", "preprocess", "convert", "evaluation")

# --- implemented: read by the code ------------------------------------------------------------------------------
_MODEL = {
    "spec", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
    "group_query_attention", "num_query_groups", "kv_channels", "qk_layernorm", "norm_epsilon", "add_qkv_bias",
    "rotary_base", "rope_scaling_type", "rope_scaling_factor", "max_position_embeddings",
    "untie_embeddings_and_output_weights", "make_vocab_size_divisible_by", "padded_vocab_size", "bf16", "fp16",
    "tensor_model_parallel_size", "pipeline_model_parallel_size",
    "num_layer_list", "distributed_backend", "distributed_timeout_minutes", "load",
    "load_checkpoint_loosely", "model_type_hf", "seed", "tokenizer_name_or_path", "tokenizer_not_use_fast",
    "seq_length", "prompt_type", "prompt_type_path", "enable_thinking", "trust_remote_code",
    "lora_target_modules", "lora_r", "lora_alpha", "lora_load",
}
# The MoE shape and layout flags every tool that builds a model reads
_MOE = {"expert_model_parallel_size", "num_experts", "moe_router_topk", "moe_ffn_hidden_size", "norm_topk_prob",
        "moe_layer_freq", "first_k_dense_replace", "moe_token_dispatcher_type", "moe_grouped_gemm"}
IMPLEMENTED: dict[str, frozenset[str]] = {
    "train": frozenset(_MODEL | {
        "swiglu", "disable_bias_linear", "hidden_dropout", "attention_dropout", "init_method_std", "sequence_parallel",
        "num_layers_per_virtual_pipeline_stage", "use_distributed_optimizer", "save", "save_interval",
        "no_load_optim", "no_load_rng", "no_save_optim", "no_save_rng", "finetune", "exit_on_missing_checkpoint",
        "enable_hf2mg_convert", "mg_save_dir", "micro_batch_size", "global_batch_size", "train_iters", "stage",
        "exit_interval", "exit_duration_in_mins", "exit_signal_handler", "skip_nan", "calculate_per_token_loss",
        "recompute_granularity", "recompute_method", "recompute_num_layers", "skip_train", "optimizer", "lr",
        "min_lr", "lr_decay_style", "lr_decay_iters", "lr_warmup_fraction", "lr_warmup_iters", "lr_warmup_init",
        "weight_decay", "start_weight_decay", "end_weight_decay", "weight_decay_incr_style", "clip_grad",
        "adam_beta1", "adam_beta2", "adam_eps", "sgd_momentum", "loss_scale", "initial_loss_scale",
        "min_loss_scale", "loss_scale_window", "hysteresis", "override_opt_param_scheduler",
        "use_checkpoint_opt_param_scheduler", "data_path", "split", "is_instruction_dataset", "is_pairwise_dataset",
        "no_pad_to_seq_lengths", "pad_to_multiple_of", "reset_attention_mask", "neat_pack", "pack", "no_shuffle",
        "padded_samples", "full_shuffle_instruction_dataset", "cut_max_seqlen", "no_cut_token",
        "tokenizer_padding_side", "data_cache_path", "num_workers", "handler_name", "log_interval",
        "log_throughput", "eval_interval", "eval_iters", "tensorboard_dir", "tokenizer_type", "transformer_impl",
        "check_for_nan_in_loss_and_grad", "lora_dropout", "lora_modules_to_save",
        "lora_ckpt_filter", "dpo_beta", "dpo_loss_type", "dpo_label_smoothing", "pref_ftx", "ref_model",
        "refer_model_iter", "use_fused_rmsnorm", "use_fused_swiglu", "no_bias_swiglu_fusion",
        "use_fused_rotary_pos_emb", "no_rope_fusion", "no_gradient_accumulation_fusion",
        "expert_model_parallel_size", "num_experts", "moe_router_topk", "moe_ffn_hidden_size", "norm_topk_prob",
        "moe_router_load_balancing_type", "moe_aux_loss_coeff", "moe_layer_freq", "first_k_dense_replace",
        "moe_token_dispatcher_type", "moe_grouped_gemm", "expert_tensor_parallel_size",
        "context_parallel_size", "context_parallel_algo", "ulysses_degree_in_cp", "manual_gc", "manual_gc_interval",
        "noop_layers",
    }),
    "inference": frozenset(_MODEL | _MOE | {
        "task", "prompt", "max_new_tokens", "temperature", "top_k", "top_p", "num_beams", "length_penalty",
        "use_kv_cache", "hf_chat_template", "history_turns", "input_file", "output_file", "inference_batch_size",
        "truncate_prompt", "enable_hf2mg_convert", "mg_save_dir", "lora_ignore_base_mismatch",
    }),
    "evaluation": frozenset(_MODEL | _MOE | {
        "task", "task_data_path", "evaluation_batch_size", "max_eval_samples", "no_chat_template", "eval_language",
        "chain_of_thought", "max_new_tokens", "results_file", "use_kv_cache", "truncate_prompt",
        "hf_chat_template", "enable_hf2mg_convert", "mg_save_dir", "lora_ignore_base_mismatch",
    }),
    "preprocess": frozenset({
        "input", "handler_name", "json_keys", "map_keys", "pack", "neat_pack", "prompt_type", "prompt_type_path",
        "enable_thinking", "tokenizer_type", "tokenizer_name_or_path", "tokenizer_not_use_fast", "seq_length",
        "output_prefix", "append_eod", "workers", "n_subs", "log_interval", "trust_remote_code",
        "reasoning_effort", "drop_thinking",
    }),
    "convert": frozenset({
        "load_model_type", "save_model_type", "load_dir", "save_dir", "model_type_hf", "target_tensor_parallel_size",
        "target_pipeline_parallel_size", "target_expert_parallel_size", "num_layer_list",
        "num_layers_per_virtual_pipeline_stage", "params_dtype", "moe_grouped_gemm", "expert_tensor_parallel_size",
        "noop_layers",
        "hf_cfg_dir", "verify", "verify_threshold", "trust_remote_code", "lora_load", "lora_r", "lora_alpha",
        "lora_target_modules", "save_lora_to_hf", "lora_ignore_base_mismatch",
    }),
}

# pretrain_gpt.py parses posttrain_gpt.py's flags plus its data flags; those of instruction and preference data are
# refused there (`ERROR["pretrain"]`).
_INSTRUCTION_ONLY = (
    "is_instruction_dataset", "is_pairwise_dataset", "no_pad_to_seq_lengths", "pad_to_multiple_of", "neat_pack",
    "pack", "no_shuffle", "padded_samples", "full_shuffle_instruction_dataset", "cut_max_seqlen", "no_cut_token",
    "tokenizer_padding_side", "prompt_type", "prompt_type_path", "enable_thinking", "dpo_beta", "dpo_loss_type",
    "dpo_label_smoothing", "pref_ftx", "ref_model", "refer_model_iter")
IMPLEMENTED["pretrain"] = frozenset(IMPLEMENTED["train"] - set(_INSTRUCTION_ONLY) - {"stage"} | {
    "train_data_path", "valid_data_path", "test_data_path", "eod_mask_loss", "reset_position_ids"})

# --- notice: accepted, no effect here (why) ---------------------------------------------------------------------
_UNFUSED = "megatron-core's unfused local layers are used on every device"
_SDPA = "attention runs torch scaled_dot_product_attention ({kernel})"
_ASCEND = "an Ascend (MindSpeed) communication/compute kernel; {device} runs the plain megatron-core path"
SPEED: dict[str, str] = {
    "use_flash_attn": _SDPA,
    "use_fused_rmsnorm": "RMSNorm runs megatron-core's local (unfused torch) RMSNorm",
    "use_fused_swiglu": "SwiGLU runs as torch silu(x1) * x2 (megatron-core local MLP)",
    "use_fused_rotary_pos_emb": "rotary embeddings run megatron-core's unfused torch implementation",
    "no_gradient_accumulation_fusion": "only training accumulates weight gradients",
    "no_bias_swiglu_fusion": "bias/SwiGLU fusion is never used; " + _UNFUSED,
    "no_bias_dropout_fusion": "bias/dropout fusion is never used; " + _UNFUSED,
    "no_rope_fusion": "rope fusion is never used; " + _UNFUSED,
    "masked_softmax_fusion": "fused masked softmax is never used; " + _SDPA,
    "no_async_tensor_model_parallel_allreduce": "tensor-parallel all-reduces are issued synchronously anyway",
    "no_create_attention_mask_in_dataloader": "masks are built on the device from the batch (causal, or per "
                                              "sample for packed rows)",
    "overlap_grad_reduce": "gradients are reduced after the backward pass (megatron-core DDP without overlap); "
                           "results are the same",
    "overlap_param_gather": "parameters are all-gathered after the optimizer step (no overlap); results are the same",
    "use_cpu_initialization": "weights are initialised (seeded) by megatron-core on the device",
    "use_deter_comp": "an Ascend determinism switch; on {device} use --seed (kernels follow torch defaults)",
    "reuse_fp32_param": "an Ascend memory optimisation; {device} keeps separate fp32 main parameters",
    "use_ascend_mc2": _ASCEND, "use_ascend_coc": _ASCEND, "coc_fused_kernel": _ASCEND, "coc_mode": _ASCEND,
    "coc_parallel_num": _ASCEND, "use_mc2": _ASCEND, "shape_order": _ASCEND,
    "use_fused_ring_attention_update": "ring attention merges its blocks with unfused torch log-sum-exp updates",
    "use_cp_send_recv_overlap": "ring attention all-gathers K/V over the CP group (no send/recv to overlap)",
    "cp_window_size": "ring attention all-gathers K/V over the CP group in one step (no double ring to window)",
    "npu_deterministic": "an Ascend determinism switch; on {device} use --seed (kernels follow torch defaults)",
    "use_fused_moe_token_permute_and_unpermute": "tokens are permuted by megatron-core's torch implementation",
    "attention_mask_type": "the mask follows the data: causal, or per sample with --reset-attention-mask",
    "cp_attention_mask_type": "(MindSpeed's older name of --attention-mask-type) the mask follows the data: "
                              "causal, or per sample with --reset-attention-mask",
}
_COMMON_NOTICE = {
    "use_mcore_models": "models are always megatron-core",
    "use_rotary_position_embeddings": "rotary position embeddings are always used (--position-embedding-type rope)",
    "attention_softmax_in_fp32": "attention softmax is always computed in fp32",
    "context_parallel_algo": "context parallelism is not used (--context-parallel-size 1)",
    "ulysses_degree_in_cp": "context parallelism is not used (--context-parallel-size 1)",
    "local_rank": "the local rank comes from torchrun's LOCAL_RANK",
}
NOTICE: dict[str, dict[str, str]] = {
    "train": {**{k: v for k, v in {**SPEED, **_COMMON_NOTICE}.items() if k not in IMPLEMENTED["train"]},
              "reset_position_ids": "positions always restart per sample in packed rows",
              "no_shared_storage": "every rank reads --data-path and --load itself; nothing is staged per node",
              "workers": "a preprocess_data.py flag; --data-path is already preprocessed",
              "dataloader_type": "samples are drawn by the resumable data-parallel sampler (single)",
              "lora_fusion": "the adapter runs as two rank-r matmuls beside the base GEMM (no fused LoRA kernel)",
              "lora_register_forward_hook": "under LoRA the embedding output always requires grad, so recomputed "
                                            "layers give adapter gradients",
              "moe_permutation_async_comm": "an Ascend overlap of permutation and communication; the token "
                                            "dispatcher communicates synchronously (same results)",
              "moe_alltoall_overlap_comm": "an Ascend overlap of the expert all-to-all; the token dispatcher "
                                           "communicates synchronously (same results)",
              "moe_permute_fusion": "tokens are permuted by megatron-core's torch implementation",
              "recompute_activation_function": "megatron-core 0.16 recomputes the expert activation only for "
                                               "grouped experts (moe_act); activations are kept (memory only, "
                                               "same results)",
              "swap_optimizer": "optimizer state stays on the device (no host swapping; memory only, same results)",
              "swap_attention": "attention activations stay on the device (no host swapping; memory only, "
                                "same results)",
              "gemm_gradient_accumulation_fusion": "MindSpeed's fused weight-gradient GEMM kernel; weight gradients "
                                                   "accumulate as --no-gradient-accumulation-fusion selects",
              "disable_gloo_group": "an Ascend switch that drops the gloo side groups; megatron-core creates its "
                                    "groups as usual (same results)",
              "moe_fb_overlap": "an Ascend forward/backward overlap; the schedule runs them in turn (same results)",
              "moe_zero_memory": "an Ascend activation-memory saving; activations are kept (same results)"},
    "inference": {**SPEED, **_COMMON_NOTICE,
                  "swiglu": "the MLP follows the model family (--model-type-hf / checkpoint)",
                  "disable_bias_linear": "linear biases follow the model family (--model-type-hf / checkpoint)",
                  "hidden_dropout": "generation runs in eval mode: no dropout",
                  "attention_dropout": "generation runs in eval mode: no dropout",
                  "init_method_std": "weights come from --load",
                  "sequence_parallel": "generation runs without sequence parallelism",
                  "use_distributed_optimizer": "generation has no optimizer",
                  "no_load_optim": "generation loads weights only", "no_load_rng": "generation loads weights only",
                  "finetune": "generation loads weights only",
                  "exit_on_missing_checkpoint": "a missing checkpoint is always an error for generation",
                  "micro_batch_size": "--inference-batch-size sets how many prompts decode together",
                  "global_batch_size": "--inference-batch-size sets how many prompts decode together",
                  "max_length": "--max-new-tokens sets the generated length",
                  "add_eos_token": "stop words come from the --prompt-type template",
                  "transformer_impl": "megatron-core's local layers are used on every device"},
    "preprocess": {"cache_dir": "input is streamed; no cache is kept",
                   "overwrite_cache": "input is streamed; no cache is kept"},
    "convert": {"tokenizer_model": "conversion copies no tokenizer (use --hf-cfg-dir on mg -> hf)",
                "use_mcore_models": "checkpoints are always megatron-core",
                "model_type": "GPT is the only model type",
                "spec": "the layer layout follows --model-type-hf / config.json",
                "transformer_impl": "checkpoints use the local layer names",
                "save_layer_by_layer": "conversion always streams layer by layer"},
}

# The MoE kernel switches change nothing in generation either; the load-balancing loss is a training loss
NOTICE["inference"].update({dest: why for dest, why in NOTICE["train"].items() if dest.startswith("moe_")})
NOTICE["inference"].update(
    moe_router_load_balancing_type="the router runs in eval mode: the routing is the same, and no load-balancing "
                                   "loss is computed",
    moe_aux_loss_coeff="the router runs in eval mode: no load-balancing loss is computed")

# evaluation.py loads and runs the model as inference.py does: the same no-effect flags, plus its own
_EVAL_AS_INFERENCE = ("swiglu", "disable_bias_linear", "hidden_dropout", "attention_dropout", "init_method_std",
                      "sequence_parallel", "use_distributed_optimizer", "no_load_optim", "no_load_rng", "finetune",
                      "exit_on_missing_checkpoint", "max_length", "add_eos_token", "transformer_impl",
                      *(dest for dest in NOTICE["inference"] if dest.startswith("moe_")))
NOTICE["pretrain"] = {k: v for k, v in NOTICE["train"].items() if k not in IMPLEMENTED["pretrain"]}
NOTICE["evaluation"] = {
    **SPEED, **_COMMON_NOTICE, **{k: NOTICE["inference"][k] for k in _EVAL_AS_INFERENCE},
    "micro_batch_size": "--evaluation-batch-size sets how many prompts run together",
    "global_batch_size": "--evaluation-batch-size sets how many prompts run together",
    "broadcast": "items are shared out over data-parallel replicas and the results gathered on every rank",
}

# --- error: only the default (or the allowed values) is honoured (why) -------------------------------------------
@dataclass(frozen=True)
class Allowed:
    """The values of a flag that are honoured, where more than its default is."""
    values: tuple
    why: str


Rule = Union[str, Allowed]      # a str: only the default is honoured, for this reason

_ERROR_COMMON: dict[str, Rule] = {
    "rotary_percent": "partial rotary embeddings are not implemented; only 1.0",
    "normalization": "only RMSNorm is implemented",
    "position_embedding_type": "only rope is implemented",
    "params_dtype": "select the dtype with --bf16 or --fp16",
    "hf_cfg_dir": "only convert_ckpt.py (mg -> hf) uses it",
    "enable_mg2hf_convert": "convert after training with convert_ckpt.py --load-model-type mg --save-model-type hf",
    "context_parallel_size": "context parallelism is not implemented; use 1",
    "ckpt_format": Allowed(("torch",), "only the 'torch' checkpoint format is implemented"),
    "use_legacy_models": "only megatron-core models are implemented",
}
_VPP_LOADED = "convert the checkpoint without VPP and drop the flag"
ERROR: dict[str, dict[str, Rule]] = {
    "train": {**{k: v for k, v in _ERROR_COMMON.items() if k not in IMPLEMENTED["train"]},
              "vocab_size": "use --padded-vocab-size",
              "map_keys": "a preprocess_data.py flag; the column mapping is fixed when the data is preprocessed",
              "log_params_norm": "parameter-norm logging is not implemented",
              "timing_log_level": "timers are not implemented",
              "log_timers_to_tensorboard": "timers are not implemented"},
    "inference": {**_ERROR_COMMON,
                  "num_layers_per_virtual_pipeline_stage": _VPP_LOADED,
                  "vocab_size": "use --padded-vocab-size",
                  "tokenizer_type": "only PretrainedFromHF is implemented",
                  "expert_tensor_parallel_size": "the experts are split over TP like the dense MLP (expert TP = "
                                                 "--tensor-model-parallel-size); leave it out",
                  "save": "generation saves no checkpoint", "save_interval": "generation saves no checkpoint",
                  "no_save_optim": "generation saves no checkpoint", "no_save_rng": "generation saves no checkpoint"},
    "preprocess": {},
    "convert": {"make_vocab_size_divisible_by": "the vocabulary keeps the HF checkpoint's rows; use 1"},
}
_PRETRAIN_REFUSES = ("an instruction/preference data flag; pretrain_gpt.py trains on preprocess_data.py "
                     "--handler-name GeneralPretrainHandler text (fine-tune with posttrain_gpt.py)")
ERROR["pretrain"] = {
    **ERROR["train"],
    **{dest: _PRETRAIN_REFUSES for dest in _INSTRUCTION_ONLY},
    "stage": Allowed(("pretrain",), "pretrain_gpt.py pretrains; --stage sft and dpo run posttrain_gpt.py"),
}
ERROR["evaluation"] = {
    **ERROR["inference"],
    "alternative_prompt": "HumanEval runs its standard completion prompt only",
    "origin_postprocess": "answers are read as the benchmark defines (option label, last number)",
}


def flag_name(dest: str, parser: Optional[argparse.ArgumentParser] = None) -> str:
    """The first option string of `dest` in `parser` (e.g. masked_softmax_fusion -> --no-masked-softmax-fusion)."""
    for action in (parser._actions if parser is not None else ()):
        if action.dest == dest and action.option_strings:
            return action.option_strings[0]
    return "--" + dest.replace("_", "-")


def apply(tool: str, parser: argparse.ArgumentParser, args: argparse.Namespace, explicit: Iterable[str],
          device: str, notice: Callable[[str], None]) -> None:
    """Errors for values we cannot honour, then one notice line per given no-effect flag."""
    defaults = {a.dest: a.default for a in parser._actions}
    for dest, rule in ERROR[tool].items():
        value = getattr(args, dest, None)
        allowed, why = (rule.values, rule.why) if isinstance(rule, Allowed) else ((defaults.get(dest),), rule)
        if dest in defaults and value not in allowed:
            text = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            shown = flag_name(dest, parser) if isinstance(value, bool) else f"{flag_name(dest, parser)} {text}".strip()
            raise UserError(f"{shown}: not supported by {parser.prog} ({why})")
    for dest, why in NOTICE[tool].items():
        if dest in explicit and getattr(args, dest, None) != defaults.get(dest):
            kernel = "flash / memory-efficient kernels" if device == "cuda" else f"the {device} kernel"
            where = f" on {device}" if "{" in why else ""      # only reasons that name the device depend on it
            notice(f"{flag_name(dest, parser)}: accepted, no effect{where}: {why.format(device=device, kernel=kernel)}")
