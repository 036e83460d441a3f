#!/bin/bash
# Qwen3-32B full-parameter SFT on packed 256K rows with context parallelism (TP8 PP1 CP8;
# 8 node(s) x 16 devices, DP 2). Every packed sample is split over the 8 CP ranks (Ulysses: all-to-all to
# whole samples over heads/CP); attention never crosses samples and positions restart in each.
# Steps: preprocess with --pack --neat-pack --seq-length 262144 (data_convert_qwen3_instruction_pack.sh), convert
# the HF weights to TP8 PP1 (ckpt_convert_qwen3_hf2mcore.sh), then run this script on every node.
# Works on GPUs (NCCL), Ascend NPUs (HCCL) and CPU (gloo; --distributed-backend falls back with a notice).
# To resume an interrupted run: CKPT_LOAD_DIR=$CKPT_SAVE_DIR and drop --finetune.
export CUDA_DEVICE_MAX_CONNECTIONS=1

NPUS_PER_NODE=${NPUS_PER_NODE:-16}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-8}
NODE_RANK=${NODE_RANK:-0}
WORLD_SIZE=$((NPUS_PER_NODE * NNODES))

CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-"./model_weights/qwen3_mcore/"}   # converted checkpoint (TP/PP as below)
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-"./ckpt/qwen3_sft/"}
DATA_PATH=${DATA_PATH:-"./finetune_dataset/alpaca_pack"}   # --output-prefix of preprocess_data.py --pack --neat-pack
TOKENIZER_PATH=${TOKENIZER_PATH:-"./model_from_hf/qwen3_hf/"}
TP=8
PP=1
CP=8
SEQ_LENGTH=262144
TRAIN_ITERS=2000

DISTRIBUTED_ARGS="
    --nproc_per_node $NPUS_PER_NODE \
    --nnodes $NNODES \
    --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT
"

GPT_ARGS="
    --use-mcore-models \
    --spec mindspeed_llm.tasks.models.spec.qwen3_spec layer_spec \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --context-parallel-size ${CP} \
    --context-parallel-algo ulysses_cp_algo \
    --sequence-parallel \
    --use-distributed-optimizer \
    --recompute-granularity full \
    --recompute-method block \
    --recompute-num-layers 48 \
    --use-ascend-coc \
    --coc-fused-kernel \
    --num-layers 64 \
    --hidden-size 5120 \
    --ffn-hidden-size 25600 \
    --num-attention-heads 64 \
    --group-query-attention \
    --num-query-groups 8 \
    --kv-channels 128 \
    --qk-layernorm \
    --normalization RMSNorm \
    --norm-epsilon 1e-6 \
    --swiglu \
    --disable-bias-linear \
    --position-embedding-type rope \
    --use-rotary-position-embeddings \
    --rotary-base 1000000 \
    --max-position-embeddings 262144 \
    --untie-embeddings-and-output-weights \
    --make-vocab-size-divisible-by 1 \
    --padded-vocab-size 151936 \
    --hidden-dropout 0 \
    --attention-dropout 0 \
    --init-method-std 0.01 \
    --attention-softmax-in-fp32 \
    --no-masked-softmax-fusion \
    --transformer-impl local \
    --use-flash-attn \
    --use-fused-rmsnorm \
    --use-fused-swiglu \
    --use-fused-rotary-pos-emb \
    --no-gradient-accumulation-fusion \
    --tokenizer-type PretrainedFromHF \
    --tokenizer-name-or-path ${TOKENIZER_PATH} \
    --tokenizer-not-use-fast \
    --seq-length ${SEQ_LENGTH} \
    --micro-batch-size 1 \
    --global-batch-size 32 \
    --train-iters ${TRAIN_ITERS} \
    --lr 1.25e-6 \
    --lr-decay-style cosine \
    --min-lr 1.25e-7 \
    --lr-warmup-fraction 0.01 \
    --weight-decay 1e-1 \
    --clip-grad 1.0 \
    --adam-beta1 0.9 \
    --adam-beta2 0.95 \
    --initial-loss-scale 4096 \
    --seed 42 \
    --bf16
"

DATA_ARGS="
    --data-path ${DATA_PATH} \
    --split 100,0,0
"

TUNE_ARGS="
    --finetune \
    --stage sft \
    --is-instruction-dataset \
    --prompt-type qwen3 \
    --reset-attention-mask \
    --attention-mask-type general \
    --neat-pack \
    --enable-thinking true
"

CKPT_ARGS="
    --load ${CKPT_LOAD_DIR} \
    --save ${CKPT_SAVE_DIR} \
    --save-interval ${TRAIN_ITERS} \
    --no-load-optim \
    --no-load-rng \
    --ckpt-format torch
"

OUTPUT_ARGS="
    --log-interval 1 \
    --log-throughput \
    --eval-interval ${TRAIN_ITERS} \
    --eval-iters 0
"

mkdir -p logs
torchrun $DISTRIBUTED_ARGS posttrain_gpt.py \
    $GPT_ARGS \
    $DATA_ARGS \
    $TUNE_ARGS \
    $CKPT_ARGS \
    $OUTPUT_ARGS \
    --distributed-backend nccl \
    2>&1 | tee logs/tune_qwen3_32b_256K_full_pack_A3_ptd.log
exit ${PIPESTATUS[0]}
