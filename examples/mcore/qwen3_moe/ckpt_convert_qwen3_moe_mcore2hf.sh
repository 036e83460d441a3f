#!/bin/bash
# Qwen3-MoE: Megatron (mcore) checkpoint -> Hugging Face safetensors (Qwen3MoeForCausalLM).
# TP/PP/EP/VPP are read from the checkpoint; --hf-cfg-dir supplies config.json and the tokenizer files.
# LoRA: LORA_LOAD_DIR (a run's adapters, same TP/PP/EP as MG_DIR) is merged into the weights; with
# SAVE_LORA_TO_HF=1 the adapters alone are written as a PEFT adapter (every expert's under its HF names:
# fc1's A for gate_proj and up_proj, B split into its gate and up halves).
set -euo pipefail

MG_DIR=${MG_DIR:-./model_weights/qwen3_moe_mcore/}       # Megatron checkpoint root (holds latest_checkpointed_iteration.txt)
HF_CFG_DIR=${HF_CFG_DIR:-./model_from_hf/qwen3_moe_hf/}  # original HF model dir: config and tokenizer are copied from here
HF_OUT=${HF_OUT:-./model_from_hf/qwen3_moe_hf_out/}      # output HF directory (transformers' from_pretrained loads it)
LORA_LOAD_DIR=${LORA_LOAD_DIR:-}                         # optional: a LoRA run's checkpoint to merge or export
SAVE_LORA_TO_HF=${SAVE_LORA_TO_HF:-}

python convert_ckpt_v2.py \
    --load-model-type mg \
    --save-model-type hf \
    --load-dir ${MG_DIR} \
    --save-dir ${HF_OUT} \
    --hf-cfg-dir ${HF_CFG_DIR} \
    --moe-grouped-gemm \
    --model-type-hf qwen3-moe \
    ${LORA_LOAD_DIR:+--lora-load ${LORA_LOAD_DIR}} \
    ${SAVE_LORA_TO_HF:+--save-lora-to-hf}
