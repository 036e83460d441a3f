#!/bin/bash
# Qwen3-30B-A3B: generate with a Megatron (mcore) checkpoint (MindSpeed-LLM's generate_qwen3_30b_a3b_ptd.sh flags) --
# the fixed prompt through greedy, sampling and beam search, then an interactive chat (type q to quit). The
# checkpoint's TP/PP/EP must match TP/PP/EP below: convert with convert_ckpt.py --model-type-hf qwen3-moe
# --target-tensor-parallel-size TP --target-pipeline-parallel-size PP --target-expert-parallel-size EP, or point
# CHECKPOINT at a posttrain_gpt.py --save dir. Expert parallelism splits the experts over the data-parallel ranks of
# each TP/PP slot: those ranks decode the same prompts together. The MoE kernel switches
# (--moe-permutation-async-comm) are accepted with a notice; the router runs in eval mode, so
# --moe-router-load-balancing-type and --moe-aux-loss-coeff change nothing here. Batch mode: add  --input-file
# prompts.jsonl --output-file answers.jsonl  (one {"prompt": ...} per line). Chat-tuned weights: add  --prompt-type
# qwen3  (or --hf-chat-template) so prompts use the chat template.
# The experts run in the layout the checkpoint holds (GroupedMLP weight1/weight2 when it was converted with
# --moe-grouped-gemm, as ckpt_convert_qwen3_moe_hf2mcore.sh does); a notice says when the flag differs.

export CUDA_DEVICE_MAX_CONNECTIONS=1

# please fill these path configurations
CHECKPOINT="your model ckpt path"
TOKENIZER_PATH="your tokenizer path"

# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR (and MASTER_PORT, NPUS_PER_NODE) in the environment of each node
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPUS_PER_NODE=${NPUS_PER_NODE:-8}
WORLD_SIZE=$((NPUS_PER_NODE * NNODES))

TP=1
PP=8
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
torchrun $DISTRIBUTED_ARGS inference.py \
    --num-experts 128 \
    --moe-router-topk 8 \
    --moe-router-load-balancing-type softmax_topk \
    --moe-ffn-hidden-size 768 \
    --moe-permutation-async-comm \
    --moe-layer-freq -1 \
    --first-k-dense-replace -1 \
    --moe-token-dispatcher-type allgather \
    --moe-aux-loss-coeff 0.001 \
    --ckpt-format torch \
    --use-mcore-models \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --expert-model-parallel-size ${EP} \
    --load ${CHECKPOINT} \
    --moe-grouped-gemm \
    --norm-topk-prob \
    --spec mindspeed_llm.tasks.models.spec.qwen3_spec layer_spec \
    --kv-channels 128 \
    --qk-layernorm \
    --num-layers 48 \
    --hidden-size 2048 \
    --use-rotary-position-embeddings \
    --num-attention-heads 32 \
    --ffn-hidden-size 6144 \
    --max-position-embeddings 40960 \
    --seq-length ${SEQ_LENGTH} \
    --make-vocab-size-divisible-by 1 \
    --padded-vocab-size 151936 \
    --rotary-base 1000000 \
    --untie-embeddings-and-output-weights \
    --micro-batch-size 1 \
    --disable-bias-linear \
    --swiglu \
    --use-fused-swiglu \
    --use-fused-rmsnorm \
    --tokenizer-type PretrainedFromHF \
    --tokenizer-name-or-path ${TOKENIZER_PATH} \
    --normalization RMSNorm \
    --position-embedding-type rope \
    --norm-epsilon 1e-6 \
    --hidden-dropout 0 \
    --attention-dropout 0 \
    --tokenizer-not-use-fast \
    --max-new-tokens 256 \
    --no-gradient-accumulation-fusion \
    --attention-softmax-in-fp32 \
    --exit-on-missing-checkpoint \
    --no-masked-softmax-fusion \
    --group-query-attention \
    --num-query-groups 4 \
    --seed 42 \
    --bf16 \
    --transformer-impl local \
    | tee logs/generate_mcore_qwen3_30b_a3b.log
