#!/bin/bash
# Qwen3-8B: Hugging Face safetensors -> Megatron (mcore) checkpoint, TP1 PP8.
# Edit the paths and parallel sizes below; they must match the training script's
# --tensor-model-parallel-size / --pipeline-model-parallel-size (and --num-layer-list if set).
set -euo pipefail

HF_DIR=./model_from_hf/qwen3_hf/          # downloaded Qwen3-8B (config.json, *.safetensors, tokenizer)
MG_DIR=./model_weights/qwen3_mcore/       # output: latest_checkpointed_iteration.txt + iter_0000001/
TP=1
PP=8

python convert_ckpt.py \
    --use-mcore-models \
    --model-type GPT \
    --load-model-type hf \
    --save-model-type mg \
    --target-tensor-parallel-size ${TP} \
    --target-pipeline-parallel-size ${PP} \
    --spec mindspeed_llm.tasks.models.spec.qwen3_spec layer_spec \
    --load-dir ${HF_DIR} \
    --save-dir ${MG_DIR} \
    --tokenizer-model ${HF_DIR}/tokenizer.json \
    --params-dtype bf16 \
    --model-type-hf qwen3
    # uneven stages instead of an even split:   --num-layer-list 4,4,4,4,5,5,5,5
    # virtual pipeline (VPP) chunks:           --num-layers-per-virtual-pipeline-stage 3
    # compare logits with transformers after:  --verify
