#!/bin/bash
# Pairwise preference data -> Megatron indexed dataset for Qwen3-MoE DPO (dpo_qwen3_30b_a3b_16K_A3_ptd.sh).
# Alpaca-style records ({"instruction", "input", "chosen", "rejected"}) through AlpacaStylePairwiseHandler.
# MindSpeed's recipe reads a "question" column as the prompt (--map-keys below); set MAP_KEYS='' for records
# that already use "instruction", or other --map-keys JSON for other column names.
# Output: ${OUTPUT_PREFIX}_packed_{chosen,rejected}_{input_ids,labels}_document.{bin,idx} + ${OUTPUT_PREFIX}_preprocess.json
# Train with --data-path ${OUTPUT_PREFIX} --stage dpo --is-pairwise-dataset --prompt-type qwen3.
set -e

INPUT=${INPUT:-"./dataset/orca_rlhf.jsonl"}
TOKENIZER_PATH=${TOKENIZER_PATH:-"./model_from_hf/qwen3_moe_hf/"}
OUTPUT_PREFIX=${OUTPUT_PREFIX:-"./pair_dataset/dpo_en"}
MAP_KEYS=${MAP_KEYS-'{"prompt":"question", "query":"", "system":"system"}'}

mkdir -p "$(dirname "${OUTPUT_PREFIX}")"

python ./preprocess_data.py \
    --input "${INPUT}" \
    --tokenizer-name-or-path "${TOKENIZER_PATH}" \
    --output-prefix "${OUTPUT_PREFIX}" \
    --handler-name AlpacaStylePairwiseHandler \
    --tokenizer-type PretrainedFromHF \
    --workers 4 \
    --log-interval 1000 \
    --prompt-type qwen3 \
    ${MAP_KEYS:+--map-keys "${MAP_KEYS}"} \
    "$@"
