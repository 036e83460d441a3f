#!/bin/bash
# Qwen3-8B: Megatron (mcore) checkpoint -> Hugging Face safetensors.
# TP/PP/VPP are read from the checkpoint; --hf-cfg-dir supplies config.json and the tokenizer files.
set -euo pipefail

MG_DIR=./model_weights/qwen3_mcore/       # Megatron checkpoint root (holds latest_checkpointed_iteration.txt)
HF_CFG_DIR=./model_from_hf/qwen3_hf/      # original HF model dir: config and tokenizer are copied from here
HF_OUT=./model_from_hf/qwen3_hf_out/      # output HF directory (transformers' from_pretrained loads it)

python convert_ckpt.py \
    --use-mcore-models \
    --model-type GPT \
    --load-model-type mg \
    --save-model-type hf \
    --load-dir ${MG_DIR} \
    --save-dir ${HF_OUT} \
    --hf-cfg-dir ${HF_CFG_DIR} \
    --model-type-hf qwen3
