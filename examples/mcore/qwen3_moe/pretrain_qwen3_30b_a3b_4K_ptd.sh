#!/bin/bash
# Qwen3-30B-A3B continued pretraining at 4K sequence length (TP1 PP2 EP8, 2 node(s) x 8 devices): MindSpeed-LLM's
# flags. 128 routed experts, top-8 (--norm-topk-prob), aux-loss load balancing (coeff 0.001), experts as
# megatron-core's GroupedMLP (--moe-grouped-gemm). Steps: preprocess the corpus (data_convert_qwen3_moe_pretrain.sh;
# DATA_PATH is its --output-prefix followed by _text_document), then run this script on every node. The weights
# start from the Hugging Face model in CKPT_LOAD_DIR, converted to this TP/PP/EP layout at start-up
# (--enable-hf2mg-convert); to pretrain from scratch, drop --load, --enable-hf2mg-convert and --model-type-hf. A
# weighted blend is DATA_PATH="0.3 PREFIX_A 0.7 PREFIX_B". Works on GPUs (NCCL), Ascend NPUs (HCCL) and CPU (gloo).
export CUDA_DEVICE_MAX_CONNECTIONS=1

NPUS_PER_NODE=${NPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-2}
NODE_RANK=${NODE_RANK:-0}

CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-"./model_from_hf/qwen3_moe_hf/"}   # Hugging Face model (converted at start-up)
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-"./ckpt/qwen3_moe_pretrain/"}
DATA_PATH=${DATA_PATH:-"./dataset/enwiki_text_document"}   # data_convert_qwen3_moe_pretrain.sh output + _text_document
TOKENIZER_PATH=${TOKENIZER_PATH:-"./model_from_hf/qwen3_moe_hf/"}
TP=1
PP=2
EP=8
CP=1
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
    --norm-topk-prob \
    --tokenizer-name-or-path ${TOKENIZER_PATH} \
    --max-position-embeddings 4096 \
    --num-layers 48 \
    --hidden-size 2048 \
    --ffn-hidden-size 6144 \
    --num-attention-heads 32 \
    --tokenizer-type PretrainedFromHF \
    --make-vocab-size-divisible-by 1 \
    --padded-vocab-size 151936 \
    --rotary-base 1000000 \
    --untie-embeddings-and-output-weights \
    --disable-bias-linear \
    --position-embedding-type rope \
    --normalization RMSNorm \
    --norm-epsilon 1e-6 \
    --swiglu \
    --attention-softmax-in-fp32 \
    --no-gradient-accumulation-fusion \
    --group-query-attention \
    --num-query-groups 4 \
    --ckpt-format torch \
    --data-path ${DATA_PATH} \
    --handler-name GeneralPretrainHandler \
    --split 100,0,0 \
    --num-experts 128 \
    --moe-router-topk 8 \
    --moe-router-load-balancing-type aux_loss \
    --moe-ffn-hidden-size 768 \
    --moe-grouped-gemm \
    --moe-permutation-async-comm \
    --moe-token-dispatcher-type alltoall_seq \
    --moe-layer-freq -1 \
    --first-k-dense-replace -1 \
    --moe-aux-loss-coeff 0.001 \
    --log-interval 1 \
    --save-interval 2000 \
    --eval-interval 2000 \
    --eval-iters 0 \
    --no-load-optim \
    --no-load-rng \
    --use-flash-attn \
    --use-fused-rotary-pos-emb \
    --sequence-parallel \
    --use-rotary-position-embeddings \
    --use-fused-swiglu \
    --use-fused-rmsnorm \
    --no-masked-softmax-fusion \
    --use-distributed-optimizer \
    --gemm-gradient-accumulation-fusion \
    --recompute-method uniform \
    --recompute-granularity full \
    --recompute-num-layers 1 \
    --micro-batch-size 1 \
    --global-batch-size 256 \
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
    --no-shared-storage \
    --manual-gc \
    --manual-gc-interval 15 \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --expert-model-parallel-size ${EP} \
    --context-parallel-size ${CP} \
    --context-parallel-algo ulysses_cp_algo \
    --enable-hf2mg-convert \
    --model-type-hf qwen3-moe \
    --distributed-backend nccl \
    --load ${CKPT_LOAD_DIR} \
    --save ${CKPT_SAVE_DIR} \
    --transformer-impl local
"

mkdir -p logs
torchrun $DISTRIBUTED_ARGS pretrain_gpt.py \
    $PRETRAIN_ARGS \
    2>&1 | tee logs/pretrain_qwen3_30b_a3b_4K_ptd.log
exit ${PIPESTATUS[0]}
