#!/bin/bash
# Qwen3-14B pretraining at 4K sequence length (TP8 PP1), the Atlas A3 variant: MindSpeed-LLM's flags.
# Steps: preprocess the corpus (data_convert_qwen3_pretrain.sh, DATA_PATH is its --output-prefix followed by
# _text_document), then run this script on every node. The weights start from the Hugging Face model in
# CKPT_LOAD_DIR, converted to this TP/PP layout at start-up (--enable-hf2mg-convert); to pretrain from scratch, drop
# --load, --enable-hf2mg-convert and --model-type-hf (weights drawn with --init-method-std). A weighted blend is
# DATA_PATH="0.3 PREFIX_A 0.7 PREFIX_B". Works on GPUs (NCCL), Ascend NPUs (HCCL) and CPU (gloo; --distributed-backend
# falls back with a notice).
export CUDA_DEVICE_MAX_CONNECTIONS=1

NPUS_PER_NODE=${NPUS_PER_NODE:-16}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}

CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-"./model_from_hf/qwen3_hf/"}   # Hugging Face model (converted at start-up)
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-"./ckpt/qwen3_pretrain/"}
DATA_PATH=${DATA_PATH:-"./dataset/enwiki_text_document"}   # data_convert_qwen3_pretrain.sh output + _text_document
TOKENIZER_PATH=${TOKENIZER_PATH:-"./model_from_hf/qwen3_hf/"}
TP=8
PP=1
SEQ_LENGTH=4096
TRAIN_ITERS=2000

DISTRIBUTED_ARGS="
    --nproc_per_node $NPUS_PER_NODE \
    --nnodes $NNODES \
    --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT
"

PRETRAIN_ARGS="
    --use-mcore-models \
    --spec mindspeed_llm.tasks.models.spec.qwen3_spec layer_spec \
    --kv-channels 128 \
    --qk-layernorm \
    --num-layers 40 \
    --hidden-size 5120 \
    --untie-embeddings-and-output-weights \
    --num-attention-heads 40 \
    --ffn-hidden-size 17408 \
    --max-position-embeddings 40960 \
    --make-vocab-size-divisible-by 1 \
    --padded-vocab-size 151936 \
    --use-rotary-position-embeddings \
    --rotary-base 1000000 \
    --disable-bias-linear \
    --swiglu \
    --tokenizer-type PretrainedFromHF \
    --tokenizer-name-or-path ${TOKENIZER_PATH} \
    --normalization RMSNorm \
    --position-embedding-type rope \
    --norm-epsilon 1e-6 \
    --attention-softmax-in-fp32 \
    --group-query-attention \
    --num-query-groups 8 \
    --no-load-optim \
    --no-load-rng \
    --sequence-parallel \
    --ckpt-format torch \
    --data-path ${DATA_PATH} \
    --handler-name GeneralPretrainHandler \
    --split 100,0,0 \
    --log-interval 1 \
    --save-interval 2000 \
    --eval-interval 2000 \
    --eval-iters 0 \
    --log-throughput \
    --use-flash-attn \
    --use-fused-rotary-pos-emb \
    --use-fused-swiglu \
    --use-fused-rmsnorm \
    --use-distributed-optimizer \
    --overlap-grad-reduce \
    --overlap-param-gather \
    --use-ascend-coc \
    --coc-fused-kernel \
    --micro-batch-size 4 \
    --global-batch-size 128 \
    --lr 1.25e-6 \
    --min-lr 1.25e-7 \
    --weight-decay 1e-1 \
    --lr-warmup-fraction 0.01 \
    --attention-dropout 0.0 \
    --hidden-dropout 0.0 \
    --clip-grad 1.0 \
    --adam-beta1 0.9 \
    --adam-beta2 0.95 \
    --seed 42 \
    --bf16 \
    --train-iters ${TRAIN_ITERS} \
    --seq-length ${SEQ_LENGTH} \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --context-parallel-size 1 \
    --context-parallel-algo ulysses_cp_algo \
    --enable-hf2mg-convert \
    --model-type-hf qwen3 \
    --distributed-backend nccl \
    --load ${CKPT_LOAD_DIR} \
    --save ${CKPT_SAVE_DIR} \
    --transformer-impl local
"

mkdir -p logs
torchrun $DISTRIBUTED_ARGS pretrain_gpt.py \
    $PRETRAIN_ARGS \
    2>&1 | tee logs/pretrain_qwen3_14b_4K_ptd_A3.log
exit ${PIPESTATUS[0]}
