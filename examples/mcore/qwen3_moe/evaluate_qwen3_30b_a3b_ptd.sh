#!/bin/bash
# Qwen3-30B-A3B: benchmark accuracy of a Megatron (mcore) checkpoint with evaluation.py (MindSpeed-LLM's
# evaluate_qwen3_30b_a3b_ptd.sh flags). The checkpoint's TP/PP/EP must match TP/PP/EP below: convert with
# convert_ckpt.py --model-type-hf qwen3-moe --target-tensor-parallel-size TP --target-pipeline-parallel-size PP
# --target-expert-parallel-size EP, or point CHECKPOINT at a posttrain_gpt.py --save dir. Expert parallelism splits
# the experts over the data-parallel ranks of each TP/PP slot: those ranks score the same prompts together. DATA_PATH
# holds the benchmark in its public layout (MMLU: test/{subject}_test.csv and dev/{subject}_dev.csv). The MoE kernel
# switches (--moe-permutation-async-comm) are accepted with a notice; the router runs in eval
# mode, so --moe-router-load-balancing-type and --moe-aux-loss-coeff change nothing here. Like MindSpeed's script
# this one leaves out --untie-embeddings-and-output-weights. Qwen3-30B-A3B is untied and its checkpoint records it,
# so the model is built untied (the checkpoint's own output layer is evaluated); the flag is not needed here and
# typing a value that disagrees with the checkpoint is an error. Per-subject and overall accuracy go to the log and
# to evaluation_results.json (--results-file to move it).
# The experts run in the layout the checkpoint holds (GroupedMLP weight1/weight2 when it was converted with
# --moe-grouped-gemm, as ckpt_convert_qwen3_moe_hf2mcore.sh does); a notice says when the flag differs.

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
NPUS_PER_NODE=${NPUS_PER_NODE:-8}
WORLD_SIZE=$((NPUS_PER_NODE * NNODES))

TP=4
PP=2
EP=1
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
    --num-experts 128 \
    --moe-router-topk 8 \
    --moe-router-load-balancing-type softmax_topk \
    --moe-ffn-hidden-size 768 \
    --moe-grouped-gemm \
    --moe-layer-freq -1 \
    --first-k-dense-replace -1 \
    --moe-permutation-async-comm \
    --moe-token-dispatcher-type allgather \
    --moe-aux-loss-coeff 0.001 \
    --ckpt-format torch \
    --spec mindspeed_llm.tasks.models.spec.qwen3_spec layer_spec \
    --task-data-path ${DATA_PATH} \
    --task ${TASK} \
    --use-mcore-models \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --expert-model-parallel-size ${EP} \
    --num-layers 48 \
    --hidden-size 2048 \
    --ffn-hidden-size 6144 \
    --num-attention-heads 32 \
    --group-query-attention \
    --num-query-groups 4 \
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
    | tee logs/evaluate_mcore_qwen3_30b_a3b_${TASK}.log
