#!/bin/bash
# Qwen3: merge a LoRA checkpoint (tune_qwen3_*_lora_ptd.sh) into the base weights and write Hugging Face
# safetensors: W + alpha/r * B @ A per TP shard, in fp32. The LoRA checkpoint must come from a run on the
# base checkpoint's TP/PP layout. Add --save-lora-to-hf to write only the adapters instead, as a PEFT adapter
# directory (adapter_model.safetensors + adapter_config.json) that `peft.PeftModel.from_pretrained` loads.
set -euo pipefail

MG_DIR=./model_weights/qwen3_mcore/       # the base Megatron checkpoint the LoRA run started from
LORA_DIR=./ckpt/qwen3_lora/               # the LoRA run's --save
HF_CFG_DIR=./model_from_hf/qwen3_hf/      # original HF model dir: config and tokenizer are copied from here
HF_OUT=./model_from_hf/qwen3_lora_hf/     # output HF directory

python convert_ckpt_v2.py \
    --load-model-type mg \
    --save-model-type hf \
    --lora-r 16 \
    --lora-alpha 32 \
    --lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2 \
    --load-dir ${MG_DIR} \
    --lora-load ${LORA_DIR} \
    --save-dir ${HF_OUT} \
    --hf-cfg-dir ${HF_CFG_DIR} \
    --model-type-hf qwen3
