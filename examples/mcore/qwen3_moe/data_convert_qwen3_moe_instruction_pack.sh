#!/bin/bash
# Packed variant for Qwen3-MoE (tune_qwen3_235b_a22b_*_pack_*_ptd.sh): rows of exactly SEQ_LENGTH tokens with
# per-sample segment ids (--neat-pack), for training with --reset-attention-mask (attention never crosses
# samples, positions restart per sample).
set -e

INPUT=${INPUT:-"./dataset/train-00000-of-00001-a09b74b3ef9c3b56.parquet"}
TOKENIZER_PATH=${TOKENIZER_PATH:-"./model_from_hf/qwen3_moe_hf/"}
OUTPUT_PREFIX=${OUTPUT_PREFIX:-"./finetune_dataset/alpaca_pack"}
SEQ_LENGTH=${SEQ_LENGTH:-4096}

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
    --seq-length "${SEQ_LENGTH}" \
    --pack \
    --neat-pack \
    "$@"
