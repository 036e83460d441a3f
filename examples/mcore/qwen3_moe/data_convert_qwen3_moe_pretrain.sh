#!/bin/bash
# Plain text (a "text" column) -> Megatron indexed dataset for Qwen3-MoE pretraining.
# Output: ${OUTPUT_PREFIX}_text_document.{bin,idx} + ${OUTPUT_PREFIX}_preprocess.json
# Train with pretrain_gpt.py --data-path ${OUTPUT_PREFIX}_text_document (pretrain_qwen3_30b_a3b_4K_ptd.sh). MindSpeed's
# recipe appends no EOD token; add --append-eod (an argument of this script) to end every document with the eos
# token, which --reset-attention-mask, --reset-position-ids and --eod-mask-loss act on.
set -e

INPUT=${INPUT:-"./dataset/train-00000-of-00042-d964455e17e96d5a.parquet"}
TOKENIZER_PATH=${TOKENIZER_PATH:-"./model_from_hf/qwen3_moe_hf/"}
OUTPUT_PREFIX=${OUTPUT_PREFIX:-"./dataset/enwiki"}

mkdir -p "$(dirname "${OUTPUT_PREFIX}")"

python ./preprocess_data.py \
    --input "${INPUT}" \
    --tokenizer-name-or-path "${TOKENIZER_PATH}" \
    --tokenizer-type PretrainedFromHF \
    --handler-name GeneralPretrainHandler \
    --output-prefix "${OUTPUT_PREFIX}" \
    --json-keys text \
    --workers 4 \
    --log-interval 1000 \
    "$@"
