#!/bin/bash
# Qwen3-1.7B: benchmark accuracy of a Megatron (mcore) checkpoint with evaluation.py (MindSpeed-LLM's
# evaluate_qwen3_1point7b_ptd.sh flags). The checkpoint's TP/PP must match TP/PP below: convert with
# examples/mcore/qwen3/ckpt_convert_qwen3_hf2mcore.sh, or point CHECKPOINT at a posttrain_gpt.py --save dir.
# DATA_PATH holds the benchmark in its public layout (MMLU: test/{subject}_test.csv and dev/{subject}_dev.csv).
# TASK: mmlu, ceval, cmmlu, gsm8k, boolq, bbh, agieval, hellaswag or human_eval (generation tasks: raise
# --max-new-tokens). Chat-tuned weights: drop --no-chat-template to wrap prompts in the tokenizer's template.
# Per-subject and overall accuracy go to the log and to evaluation_results.json (--results-file to move it).
export CUDA_DEVICE_MAX_CONNECTIONS=1

# please fill these path configurations
CHECKPOINT="your model ckpt path"
TOKENIZER_PATH="your tokenizer path"
DATA_PATH="./mmlu/data/test/"
TASK="mmlu"

# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR (and MASTER_PORT, NPUS_PER_NODE) in the environment of each node
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPUS_PER_NODE=${NPUS_PER_NODE:-1}
WORLD_SIZE=$((NPUS_PER_NODE * NNODES))

TP=1
PP=1
SEQ_LENGTH=4096

DISTRIBUTED_ARGS="
    --nproc_per_node $NPUS_PER_NODE \
    --nnodes $NNODES \
    --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT
"

mkdir -p logs
torchrun $DISTRIBUTED_ARGS evaluation.py \
    --spec mindspeed_llm.tasks.models.spec.qwen3_spec layer_spec \
    --task-data-path ${DATA_PATH} \
    --task ${TASK} \
    --use-mcore-models \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --num-layers 28 \
    --hidden-size 2048 \
    --ffn-hidden-size 6144 \
    --num-attention-heads 16 \
    --group-query-attention \
    --num-query-groups 8 \
    --seq-length ${SEQ_LENGTH} \
    --max-new-tokens 2 \
    --max-position-embeddings 32768 \
    --disable-bias-linear \
    --swiglu \
    --norm-epsilon 1e-6 \
    --padded-vocab-size 151936 \
    --make-vocab-size-divisible-by 1 \
    --position-embedding-type rope \
    --load ${CHECKPOINT} \
    --no-chat-template \
    --kv-channels 128 \
    --qk-layernorm \
    --norm-topk-prob \
    --rotary-base 1000000 \
    --use-rotary-position-embeddings \
    --tokenizer-type PretrainedFromHF \
    --tokenizer-name-or-path ${TOKENIZER_PATH} \
    --normalization RMSNorm \
    --attention-dropout 0.0 \
    --hidden-dropout 0.0 \
    --no-gradient-accumulation-fusion \
    --attention-softmax-in-fp32 \
    --tokenizer-not-use-fast \
    --exit-on-missing-checkpoint \
    --no-masked-softmax-fusion \
    --micro-batch-size 1 \
    --no-load-rng \
    --no-load-optim \
    --seed 42 \
    --bf16 \
    --transformer-impl local \
    --ckpt-format torch \
    | tee logs/evaluate_mcore_qwen3_1point7b_${TASK}.log
