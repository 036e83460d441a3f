#!/bin/bash
# Pairwise preference data -> Megatron indexed dataset for Qwen3 DPO (dpo_qwen3_8b_4K_full_ptd.sh).
# ShareGPT records ({"conversations", "chosen", "rejected"}, as dpo_en_demo.json) by default; for Alpaca-style
# records ({"instruction", "input", "chosen", "rejected"}) pass HANDLER=AlpacaStylePairwiseHandler (rename
# columns with --map-keys, e.g. '{"prompt":"question", "query":"", "system":"system"}').
# Output: ${OUTPUT_PREFIX}_packed_{chosen,rejected}_{input_ids,labels}_document.{bin,idx} + ${OUTPUT_PREFIX}_preprocess.json
# Train with --data-path ${OUTPUT_PREFIX} --stage dpo --is-pairwise-dataset --prompt-type qwen3.
set -e

INPUT=${INPUT:-"./dataset/dpo_en_demo.json"}
HANDLER=${HANDLER:-"SharegptStylePairwiseHandler"}
TOKENIZER_PATH=${TOKENIZER_PATH:-"./model_from_hf/qwen3_hf/"}
OUTPUT_PREFIX=${OUTPUT_PREFIX:-"./pair_dataset/dpo_en"}

mkdir -p "$(dirname "${OUTPUT_PREFIX}")"

python ./preprocess_data.py \
    --input "${INPUT}" \
    --tokenizer-name-or-path "${TOKENIZER_PATH}" \
    --output-prefix "${OUTPUT_PREFIX}" \
    --handler-name "${HANDLER}" \
    --tokenizer-type PretrainedFromHF \
    --workers 4 \
    --log-interval 1000 \
    --prompt-type qwen3 \
    "$@"
