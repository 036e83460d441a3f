#!/bin/bash
# Qwen3-8B pretraining at 4K sequence length (TP1 PP2): MindSpeed-LLM's flags.
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
PP=2
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
    --qk-layernorm \
    --tokenizer-name-or-path ${TOKENIZER_PATH} \
    --max-position-embeddings 4096 \
    --num-layers 36 \
    --hidden-size 4096 \
    --ffn-hidden-size 12288 \
    --num-attention-heads 32 \
    --tokenizer-type PretrainedFromHF \
    --make-vocab-size-divisible-by 1 \
    --padded-vocab-size 151936 \
    --rotary-base 1000000 \
    --untie-embeddings-and-output-weights \
    --disable-bias-linear \
    --position-embedding-type rope \
    --normalization RMSNorm \
    --swiglu \
    --attention-softmax-in-fp32 \
    --no-gradient-accumulation-fusion \
    --group-query-attention \
    --num-query-groups 8 \
    --norm-epsilon 1e-6 \
    --ckpt-format torch \
    --handler-name GeneralPretrainHandler \
    --workers 4 \
    --data-path ${DATA_PATH} \
    --split 100,0,0 \
    --log-interval 1 \
    --save-interval 2000 \
    --eval-interval 2000 \
    --eval-iters 0 \
    --no-load-optim \
    --no-load-rng \
    --use-flash-attn \
    --use-fused-rotary-pos-emb \
    --use-rotary-position-embeddings \
    --use-fused-swiglu \
    --use-fused-rmsnorm \
    --no-masked-softmax-fusion \
    --use-distributed-optimizer \
    --reuse-fp32-param \
    --overlap-grad-reduce \
    --overlap-param-gather \
    --use-ascend-coc \
    --micro-batch-size 1 \
    --global-batch-size 64 \
    --lr 1.25e-6 \
    --lr-decay-style cosine \
    --min-lr 1.25e-7 \
    --weight-decay 1e-1 \
    --lr-warmup-fraction 0.01 \
    --attention-dropout 0.0 \
    --init-method-std 0.01 \
    --hidden-dropout 0.0 \
    --clip-grad 1.0 \
    --adam-beta1 0.9 \
    --adam-beta2 0.95 \
    --initial-loss-scale 4096 \
    --seed 42 \
    --bf16 \
    --train-iters ${TRAIN_ITERS} \
    --seq-length ${SEQ_LENGTH} \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --load ${CKPT_LOAD_DIR} \
    --save ${CKPT_SAVE_DIR} \
    --distributed-backend nccl \
    --transformer-impl local \
    --enable-hf2mg-convert \
    --model-type-hf qwen3
"

mkdir -p logs
torchrun $DISTRIBUTED_ARGS pretrain_gpt.py \
    $PRETRAIN_ARGS \
    2>&1 | tee logs/pretrain_qwen3_8b_4K_ptd.log
exit ${PIPESTATUS[0]}
