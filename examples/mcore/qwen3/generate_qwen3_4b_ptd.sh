#!/bin/bash
# Qwen3-4B: generate with a Megatron (mcore) checkpoint — the fixed prompt through greedy, sampling and beam
# search, then an interactive chat (type q to quit). The checkpoint's TP/PP must match TP/PP below: convert with
# examples/mcore/qwen3/ckpt_convert_qwen3_hf2mcore.sh, or point CHECKPOINT at a posttrain_gpt.py --save dir.
# Batch mode: add  --input-file prompts.jsonl --output-file answers.jsonl  (one {"prompt": ...} per line).
# Chat-tuned weights: add  --prompt-type qwen3  (or --hf-chat-template) so prompts use the chat template.
export CUDA_DEVICE_MAX_CONNECTIONS=1

# please fill these path configurations
CHECKPOINT="your model ckpt path"
TOKENIZER_PATH="your tokenizer path"

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
torchrun $DISTRIBUTED_ARGS inference.py \
    --use-mcore-models \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --load ${CHECKPOINT} \
    --spec mindspeed_llm.tasks.models.spec.qwen3_spec layer_spec \
    --num-layers 36 \
    --hidden-size 2560 \
    --ffn-hidden-size 9728 \
    --num-attention-heads 32 \
    --group-query-attention \
    --num-query-groups 8 \
    --kv-channels 128 \
    --qk-layernorm \
    --use-rotary-position-embeddings \
    --position-embedding-type rope \
    --rotary-base 1000000 \
    --max-position-embeddings 4096 \
    --seq-length ${SEQ_LENGTH} \
    --make-vocab-size-divisible-by 1 \
    --padded-vocab-size 151936 \
    --micro-batch-size 1 \
    --disable-bias-linear \
    --swiglu \
    --use-fused-swiglu \
    --use-fused-rmsnorm \
    --normalization RMSNorm \
    --norm-epsilon 1e-6 \
    --hidden-dropout 0 \
    --attention-dropout 0 \
    --attention-softmax-in-fp32 \
    --no-gradient-accumulation-fusion \
    --tokenizer-type PretrainedFromHF \
    --tokenizer-name-or-path ${TOKENIZER_PATH} \
    --tokenizer-not-use-fast \
    --max-new-tokens 256 \
    --use-kv-cache \
    --exit-on-missing-checkpoint \
    --transformer-impl local \
    --distributed-backend nccl \
    --seed 42 \
    | tee logs/generate_mcore_qwen3_4b.log
