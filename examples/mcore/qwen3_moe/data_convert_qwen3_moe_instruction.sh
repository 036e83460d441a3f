#!/bin/bash
# Alpaca-style instruction data -> Megatron indexed dataset for Qwen3-MoE fine-tuning (tune_qwen3_30b_a3b_4K_{full,lora}_ptd.sh).
# Output: ${OUTPUT_PREFIX}_packed_{input_ids,attention_mask,labels}_document.{bin,idx} + ${OUTPUT_PREFIX}_preprocess.json
# Train with --data-path ${OUTPUT_PREFIX} --is-instruction-dataset --prompt-type qwen3.
set -e

INPUT=${INPUT:-"./dataset/train-00000-of-00001-a09b74b3ef9c3b56.parquet"}
TOKENIZER_PATH=${TOKENIZER_PATH:-"./model_from_hf/qwen3_moe_hf/"}
OUTPUT_PREFIX=${OUTPUT_PREFIX:-"./finetune_dataset/alpaca"}

mkdir -p "$(dirname "${OUTPUT_PREFIX}")"

python ./preprocess_data.py \
    --input "${INPUT}" \
    --tokenizer-name-or-path "${TOKENIZER_PATH}" \
    --output-prefix "${OUTPUT_PREFIX}" \
    --handler-name AlpacaStyleInstructionHandler \
    --tokenizer-type PretrainedFromHF \
    --workers 4 \
    --log-interval 1000 \
    --enable-thinking true \
    --prompt-type qwen3 \
    "$@"
