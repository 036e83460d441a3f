#!/bin/bash
# The whole pipeline on an embedded default: a tiny Qwen3-shaped model and the synthetic demo tasks (reverse,
# capitalise or repeat spaced letters, sort spaced digits), all made here. Under 10 minutes on 2 CPU cores (gloo);
# on a GPU (NPU) machine the same commands run on CUDA/NCCL (Ascend/HCCL), one process per device: TP=1 on one
# device, TP=2 on two or more (the model has 2 KV heads).
#   tiny HF model + demo data -> preprocess -> convert HF->Megatron at that TP -> held-out accuracy before
#   (inference.py answers, and evaluation.py on the same prompts in BIG-Bench-Hard's layout: the same score)
#   -> fine-tune -> held-out accuracy after -> convert back to HF -> LoRA on the fine-tuned model -> held-out
#   accuracy with the adapters -> merged HF weights and a PEFT adapter
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${WORK:-./work_dirs/quickstart}
HF_DIR=${WORK}/tiny_qwen3_hf
DATA=${WORK}/data
SFT_DIR=${WORK}/ckpt_sft
LORA_DIR=${WORK}/ckpt_lora
SEQ_LENGTH=128
TRAIN_ITERS=${TRAIN_ITERS:-450}
LORA_ITERS=${LORA_ITERS:-300}
# Distinct training questions: 450 iterations x 32 see each about twice, so held-out answers need the rule.
TRAIN_EXAMPLES=${TRAIN_EXAMPLES:-8000}
# Two CPU processes share the host (gloo); on accelerators each process needs a device of its own.
read -r DEVICE_TYPE DEVICES < <(python -c "from mindspeed_llm.platform import detect_platform, device_count
print(detect_platform().device_type, device_count())")
if [ "${DEVICE_TYPE}" = cpu ]; then NPROC=2; elif [ "${DEVICES}" -ge 2 ]; then NPROC=2; else NPROC=1; fi
TP=${NPROC}
MG_DIR=${WORK}/tiny_qwen3_mcore_tp${TP}
echo "devices: ${DEVICES} ${DEVICE_TYPE} -> ${NPROC} process(es), TP=${TP}"
export MASTER_PORT=${MASTER_PORT:-29517}
export CUDA_DEVICE_MAX_CONNECTIONS=1  # as the Megatron recipes set it

rm -rf "${WORK}" && mkdir -p "${WORK}"
echo "== 1. tiny Qwen3-shaped model (4 layers, hidden 128, GQA 4/2) and demo data"
python tools/make_tiny_model.py --out "${HF_DIR}" --hidden-size 128 --head-dim 32 --intermediate-size 384
python tools/make_demo_data.py --out "${DATA}/raw" --n-train ${TRAIN_EXAMPLES}

# The training questions are asked as evaluation.py asks BBH questions ("Q: ...\nA:" as the user turn), as are
# the held-out requests of inference.py: both then score the same prompts.
echo "== 2. preprocess: alpaca records, qwen3 template -> Megatron indexed dataset"
python preprocess_data.py \
    --input "${DATA}/raw/alpaca_bbh_train.jsonl" \
    --tokenizer-name-or-path "${HF_DIR}" \
    --output-prefix "${DATA}/alpaca" \
    --handler-name AlpacaStyleInstructionHandler \
    --prompt-type qwen3 \
    --seq-length ${SEQ_LENGTH} \
    --workers 2 \
    --log-interval 1000

echo "== 3. convert HF -> Megatron (TP=${TP}) and compare logits with transformers"
python convert_ckpt.py \
    --load-model-type hf --save-model-type mg --model-type-hf qwen3 \
    --load-dir "${HF_DIR}" --save-dir "${MG_DIR}" \
    --target-tensor-parallel-size ${TP} --target-pipeline-parallel-size 1 \
    --verify

GENERATE_ARGS=(
    --tokenizer-name-or-path "${HF_DIR}" --tensor-model-parallel-size ${TP}
    --prompt-type qwen3 --seq-length ${SEQ_LENGTH} --max-new-tokens 16
    --input-file "${DATA}/raw/prompts_test.jsonl" --inference-batch-size 8 --distributed-backend nccl
)
# evaluation.py on the held-out prompts written in BIG-Bench-Hard's layout (exact match of the greedy answer),
# in batches of inference.py's size and order: the same answers, so the same score
EVAL_ARGS=(
    --tokenizer-name-or-path "${HF_DIR}" --tensor-model-parallel-size ${TP} --prompt-type qwen3
    --seq-length ${SEQ_LENGTH} --max-new-tokens 16 --task bbh --task-data-path "${DATA}/raw/bbh"
    --evaluation-batch-size 8 --distributed-backend nccl
)
echo "== 4. held-out answers before fine-tuning (inference.py, then evaluation.py)"
torchrun --nproc_per_node ${NPROC} --master_port ${MASTER_PORT} inference.py --load "${MG_DIR}" \
    "${GENERATE_ARGS[@]}" --output-file "${WORK}/answers_before.jsonl"
python tools/score_demo.py "${WORK}/answers_before.jsonl" --label "held-out accuracy before"
torchrun --nproc_per_node ${NPROC} --master_port ${MASTER_PORT} evaluation.py --load "${MG_DIR}" \
    "${EVAL_ARGS[@]}" --results-file "${WORK}/eval_before.json"

# The model, parallel layout, data and schedule flags of both fine-tuning runs (step 5 and step 8).
TRAIN_ARGS=(
    --use-mcore-models --spec mindspeed_llm.tasks.models.spec.qwen3_spec layer_spec
    --num-layers 4 --hidden-size 128 --ffn-hidden-size 384 --num-attention-heads 4
    --group-query-attention --num-query-groups 2 --kv-channels 32 --qk-layernorm
    --normalization RMSNorm --norm-epsilon 1e-6 --swiglu --disable-bias-linear
    --position-embedding-type rope --use-rotary-position-embeddings --rotary-base 1000000
    --max-position-embeddings 512 --untie-embeddings-and-output-weights
    --make-vocab-size-divisible-by 1 --padded-vocab-size 448
    --hidden-dropout 0 --attention-dropout 0 --attention-softmax-in-fp32 --no-masked-softmax-fusion
    --transformer-impl local
    --tokenizer-type PretrainedFromHF --tokenizer-name-or-path "${HF_DIR}"
    --tensor-model-parallel-size ${TP} --pipeline-model-parallel-size 1 --sequence-parallel
    --distributed-backend nccl
    --micro-batch-size 32 --global-batch-size 32 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-fraction 0.05
    --weight-decay 0.0 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95 --seed 42
    --data-path "${DATA}/alpaca" --split 100,0,0
    --is-instruction-dataset --stage sft --prompt-type qwen3
    --seq-length ${SEQ_LENGTH} --no-pad-to-seq-lengths --finetune --ckpt-format torch
    --log-interval 50 --eval-iters 0
)
echo "== 5. fine-tune (full parameters, TP=${TP} with sequence parallelism when TP>1, dynamic padding)"
torchrun --nproc_per_node ${NPROC} --master_port ${MASTER_PORT} posttrain_gpt.py "${TRAIN_ARGS[@]}" \
    --train-iters ${TRAIN_ITERS} --lr 2e-3 --load "${MG_DIR}" --save "${SFT_DIR}"

echo "== 6. held-out answers after fine-tuning"
torchrun --nproc_per_node ${NPROC} --master_port ${MASTER_PORT} inference.py --load "${SFT_DIR}" \
    "${GENERATE_ARGS[@]}" --output-file "${WORK}/answers_after.jsonl"
torchrun --nproc_per_node ${NPROC} --master_port ${MASTER_PORT} evaluation.py --load "${SFT_DIR}" \
    "${EVAL_ARGS[@]}" --results-file "${WORK}/eval_after.json"
python tools/score_demo.py "${WORK}/answers_before.jsonl" --label "held-out accuracy before"
python tools/score_demo.py "${WORK}/answers_after.jsonl" --label "held-out accuracy after "
python -c "
import json, sys
shown = set()
for line in open(sys.argv[1], encoding='utf-8'):
    r = json.loads(line)
    if r['task'] not in shown:  # one sample answer per task
        shown.add(r['task'])
        print(f\"  {r['messages'][-1]['content']!r} -> {r['response']!r} (expected {r['expected']!r})\")" \
    "${WORK}/answers_after.jsonl"

echo "== 7. convert the fine-tuned checkpoint back to Hugging Face"
python convert_ckpt.py \
    --load-model-type mg --save-model-type hf \
    --load-dir "${SFT_DIR}" --save-dir "${WORK}/tiny_qwen3_sft_hf" --hf-cfg-dir "${HF_DIR}"

echo "== 8. LoRA on top of the fine-tuned model (rank 16 on qkv/proj/fc1/fc2, base frozen, adapter-only saves)"
torchrun --nproc_per_node ${NPROC} --master_port ${MASTER_PORT} posttrain_gpt.py "${TRAIN_ARGS[@]}" \
    --train-iters ${LORA_ITERS} --lr 5e-3 --load "${SFT_DIR}" --save "${LORA_DIR}" \
    --lora-r 16 --lora-alpha 32 --lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2 --lora-ckpt-filter

echo "== 9. held-out answers with the adapters (merged into the weights at load)"
torchrun --nproc_per_node ${NPROC} --master_port ${MASTER_PORT} inference.py --load "${SFT_DIR}" \
    --lora-load "${LORA_DIR}" "${GENERATE_ARGS[@]}" --output-file "${WORK}/answers_lora.jsonl"
python tools/score_demo.py "${WORK}/answers_after.jsonl" --label "held-out accuracy after fine-tuning"
python tools/score_demo.py "${WORK}/answers_lora.jsonl" --label "held-out accuracy after LoRA     "
torchrun --nproc_per_node ${NPROC} --master_port ${MASTER_PORT} evaluation.py --load "${SFT_DIR}" \
    --lora-load "${LORA_DIR}" "${EVAL_ARGS[@]}" --results-file "${WORK}/eval_lora.json"

echo "== 10. LoRA -> Hugging Face: merged weights, and the adapter alone for peft"
python convert_ckpt.py --load-model-type mg --save-model-type hf --load-dir "${SFT_DIR}" --lora-load "${LORA_DIR}" \
    --save-dir "${WORK}/tiny_qwen3_lora_hf" --hf-cfg-dir "${HF_DIR}"
python convert_ckpt.py --load-model-type mg --save-model-type hf --load-dir "${SFT_DIR}" --lora-load "${LORA_DIR}" \
    --save-dir "${WORK}/tiny_qwen3_lora_peft" --hf-cfg-dir "${HF_DIR}" --save-lora-to-hf

echo "quickstart finished: outputs under ${WORK}"
