#!/bin/bash
# The whole pipeline on an embedded default: a tiny Qwen3-shaped model and the synthetic demo tasks,
# all made here. Runs on CPU (gloo) in a few minutes; on a GPU machine the same commands use CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${WORK:-./work_dirs/quickstart}
HF_DIR=${WORK}/tiny_qwen3_hf
DATA_DIR=${WORK}/data
MG_DIR=${WORK}/tiny_qwen3_mcore_tp2
SEQ_LENGTH=256

mkdir -p "${WORK}"
echo "== 1. tiny Qwen3-shaped model and demo data"
python tools/make_tiny_model.py --out "${HF_DIR}"
python tools/make_demo_data.py --out "${DATA_DIR}/raw"

echo "== 2. preprocess (alpaca, qwen3 template) -> Megatron indexed dataset"
python preprocess_data.py \
    --input "${DATA_DIR}/raw/alpaca_train.jsonl" \
    --tokenizer-name-or-path "${HF_DIR}" \
    --output-prefix "${DATA_DIR}/alpaca" \
    --handler-name AlpacaStyleInstructionHandler \
    --prompt-type qwen3 \
    --enable-thinking false \
    --map-keys '{"system": "system"}' \
    --seq-length ${SEQ_LENGTH} \
    --workers 2 \
    --log-interval 500

echo "== 3. convert HF -> Megatron, TP=2"
python convert_ckpt.py \
    --load-model-type hf --save-model-type mg \
    --load-dir "${HF_DIR}" --save-dir "${MG_DIR}" \
    --model-type-hf qwen3 \
    --target-tensor-parallel-size 2 --target-pipeline-parallel-size 1 \
    --verify

echo "== 4. convert back Megatron -> HF"
python convert_ckpt.py \
    --load-model-type mg --save-model-type hf \
    --load-dir "${MG_DIR}" --save-dir "${WORK}/tiny_qwen3_back_hf" \
    --hf-cfg-dir "${HF_DIR}"

echo "quickstart finished: outputs under ${WORK}"
