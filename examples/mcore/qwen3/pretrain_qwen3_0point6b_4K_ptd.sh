#!/bin/bash
# Qwen3-0.6B pretraining at 4K sequence length (TP1 PP1): MindSpeed-LLM's flags.
# Steps: preprocess the corpus (data_convert_qwen3_pretrain.sh, DATA_PATH is its --output-prefix followed by
# _text_document), then run this script on every node. The weights start from the Hugging Face model in
# CKPT_LOAD_DIR, converted to this TP/PP layout at start-up (--enable-hf2mg-convert); to pretrain from scratch, drop
# --load, --enable-hf2mg-convert and --model-type-hf (weights drawn with --init-method-std). A weighted blend is
# DATA_PATH="0.3 PREFIX_A 0.7 PREFIX_B". Works on GPUs (NCCL), Ascend NPUs (HCCL) and CPU (gloo; --distributed-backend
# falls back with a notice).
export CUDA_DEVICE_MAX_CONNECTIONS=1

NPUS_PER_NODE=${NPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}

CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-"./model_from_hf/qwen3_hf/"}   # Hugging Face model (converted at start-up)
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-"./ckpt/qwen3_pretrain/"}
DATA_PATH=${DATA_PATH:-"./dataset/enwiki_text_document"}   # data_convert_qwen3_pretrain.sh output + _text_document
TOKENIZER_PATH=${TOKENIZER_PATH:-"./model_from_hf/qwen3_hf/"}
TP=1
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
    --sequence-parallel \
    --spec mindspeed_llm.tasks.models.spec.qwen3_spec layer_spec \
    --kv-channels 128 \
    --qk-layernorm \
    --num-layers 28 \
    --hidden-size 1024 \
    --num-attention-heads 16 \
    --ffn-hidden-size 3072 \
    --max-position-embeddings 32768 \
    --make-vocab-size-divisible-by 1 \
    --padded-vocab-size 151936 \
    --rotary-base 1000000 \
    --disable-bias-linear \
    --swiglu \
    --tokenizer-type PretrainedFromHF \
    --tokenizer-name-or-path ${TOKENIZER_PATH} \
    --normalization RMSNorm \
    --position-embedding-type rope \
    --norm-epsilon 1e-6 \
    --no-gradient-accumulation-fusion \
    --attention-softmax-in-fp32 \
    --exit-on-missing-checkpoint \
    --group-query-attention \
    --num-query-groups 8 \
    --no-load-optim \
    --no-load-rng \
    --seed 42 \
    --bf16 \
    --ckpt-format torch \
    --data-path ${DATA_PATH} \
    --handler-name GeneralPretrainHandler \
    --split 100,0,0 \
    --log-interval 1 \
    --save-interval 1000 \
    --eval-interval 1000 \
    --eval-iters 0 \
    --use-flash-attn \
    --use-fused-rotary-pos-emb \
    --use-rotary-position-embeddings \
    --use-fused-swiglu \
    --use-fused-rmsnorm \
    --no-masked-softmax-fusion \
    --use-distributed-optimizer \
    --micro-batch-size 1 \
    --global-batch-size 32 \
    --lr 1.25e-6 \
    --min-lr 1.25e-7 \
    --weight-decay 1e-1 \
    --attention-dropout 0.0 \
    --hidden-dropout 0.0 \
    --clip-grad 1.0 \
    --adam-beta1 0.9 \
    --adam-beta2 0.95 \
    --initial-loss-scale 4096 \
    --train-iters ${TRAIN_ITERS} \
    --seq-length ${SEQ_LENGTH} \
    --no-shared-storage \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --enable-hf2mg-convert \
    --model-type-hf qwen3 \
    --distributed-backend nccl \
    --log-throughput \
    --load ${CKPT_LOAD_DIR} \
    --save ${CKPT_SAVE_DIR} \
    --transformer-impl local
"

mkdir -p logs
torchrun $DISTRIBUTED_ARGS pretrain_gpt.py \
    $PRETRAIN_ARGS \
    2>&1 | tee logs/pretrain_qwen3_0point6b_4K_ptd.log
exit ${PIPESTATUS[0]}
