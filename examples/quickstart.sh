#!/bin/bash
# The whole pipeline on an embedded default: a tiny Qwen3-shaped model and the synthetic demo tasks, all made
# here. About 6-8 minutes on 2 CPU cores (gloo); on a GPU machine the same commands run on CUDA (NCCL).
#   tiny HF model + demo data -> preprocess -> convert HF->Megatron TP=2 -> held-out accuracy before
#   -> fine-tune on 2 processes (TP=2) -> held-out accuracy after -> convert back to HF
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${WORK:-./work_dirs/quickstart}
HF_DIR=${WORK}/tiny_qwen3_hf
DATA=${WORK}/data
MG_DIR=${WORK}/tiny_qwen3_mcore_tp2
SFT_DIR=${WORK}/ckpt_sft
SEQ_LENGTH=128
TRAIN_ITERS=${TRAIN_ITERS:-600}
NPROC=2
export MASTER_PORT=${MASTER_PORT:-29517}
export CUDA_DEVICE_MAX_CONNECTIONS=1  # as the Megatron recipes set it

rm -rf "${WORK}" && mkdir -p "${WORK}"
echo "== 1. tiny Qwen3-shaped model (4 layers, hidden 128, GQA 4/2) and demo data"
python tools/make_tiny_model.py --out "${HF_DIR}" --hidden-size 128 --head-dim 32 --intermediate-size 384
python tools/make_demo_data.py --out "${DATA}/raw"

echo "== 2. preprocess: alpaca records, qwen3 template -> Megatron indexed dataset"
python preprocess_data.py \
    --input "${DATA}/raw/alpaca_train.jsonl" \
    --tokenizer-name-or-path "${HF_DIR}" \
    --output-prefix "${DATA}/alpaca" \
    --handler-name AlpacaStyleInstructionHandler \
    --prompt-type qwen3 \
    --map-keys '{"system": "system"}' \
    --seq-length ${SEQ_LENGTH} \
    --workers 2 \
    --log-interval 1000

echo "== 3. convert HF -> Megatron (TP=2) and compare logits with transformers"
python convert_ckpt.py \
    --load-model-type hf --save-model-type mg --model-type-hf qwen3 \
    --load-dir "${HF_DIR}" --save-dir "${MG_DIR}" \
    --target-tensor-parallel-size 2 --target-pipeline-parallel-size 1 \
    --verify

GENERATE_ARGS=(
    --tokenizer-name-or-path "${HF_DIR}" --tensor-model-parallel-size 2
    --prompt-type qwen3 --seq-length ${SEQ_LENGTH} --max-new-tokens 16
    --input-file "${DATA}/raw/prompts_test.jsonl" --distributed-backend gloo
)
echo "== 4. held-out answers before fine-tuning"
torchrun --nproc_per_node ${NPROC} --master_port ${MASTER_PORT} inference.py --load "${MG_DIR}" \
    "${GENERATE_ARGS[@]}" --output-file "${WORK}/answers_before.jsonl"
python tools/score_demo.py "${WORK}/answers_before.jsonl" --label "held-out accuracy before"

echo "== 5. fine-tune (full parameters, TP=2 with sequence parallelism, dynamic padding)"
torchrun --nproc_per_node ${NPROC} --master_port ${MASTER_PORT} posttrain_gpt.py \
    --use-mcore-models --spec mindspeed_llm.tasks.models.spec.qwen3_spec layer_spec \
    --num-layers 4 --hidden-size 128 --ffn-hidden-size 384 --num-attention-heads 4 \
    --group-query-attention --num-query-groups 2 --kv-channels 32 --qk-layernorm \
    --normalization RMSNorm --norm-epsilon 1e-6 --swiglu --disable-bias-linear \
    --position-embedding-type rope --use-rotary-position-embeddings --rotary-base 1000000 \
    --max-position-embeddings 512 --untie-embeddings-and-output-weights \
    --make-vocab-size-divisible-by 1 --padded-vocab-size 448 \
    --hidden-dropout 0 --attention-dropout 0 --attention-softmax-in-fp32 --no-masked-softmax-fusion \
    --transformer-impl local \
    --tokenizer-type PretrainedFromHF --tokenizer-name-or-path "${HF_DIR}" \
    --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 --sequence-parallel \
    --distributed-backend nccl \
    --micro-batch-size 32 --global-batch-size 32 --train-iters ${TRAIN_ITERS} \
    --lr 2e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-fraction 0.05 \
    --weight-decay 0.0 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95 --seed 42 \
    --data-path "${DATA}/alpaca" --split 100,0,0 \
    --is-instruction-dataset --stage sft --prompt-type qwen3 \
    --seq-length ${SEQ_LENGTH} --no-pad-to-seq-lengths \
    --finetune --load "${MG_DIR}" --save "${SFT_DIR}" --ckpt-format torch \
    --log-interval 50 --eval-iters 0

echo "== 6. held-out answers after fine-tuning"
torchrun --nproc_per_node ${NPROC} --master_port ${MASTER_PORT} inference.py --load "${SFT_DIR}" \
    "${GENERATE_ARGS[@]}" --output-file "${WORK}/answers_after.jsonl"
python tools/score_demo.py "${WORK}/answers_before.jsonl" --label "held-out accuracy before"
python tools/score_demo.py "${WORK}/answers_after.jsonl" --label "held-out accuracy after "
head -n 3 "${WORK}/answers_after.jsonl" | python -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print(f\"  {r['messages'][-1]['content']!r} -> {r['response']!r} (expected {r['expected']!r})\")"

echo "== 7. convert the fine-tuned checkpoint back to Hugging Face"
python convert_ckpt.py \
    --load-model-type mg --save-model-type hf \
    --load-dir "${SFT_DIR}" --save-dir "${WORK}/tiny_qwen3_sft_hf" --hf-cfg-dir "${HF_DIR}"

echo "quickstart finished: outputs under ${WORK}"
