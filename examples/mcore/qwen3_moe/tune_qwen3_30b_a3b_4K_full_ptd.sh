#!/bin/bash
# Qwen3-30B-A3B full-parameter SFT at 4K sequence length (TP4 PP2 EP2, 2 node(s) x 8 devices).
# 128 routed experts, top-8 (softmax, renormalised: --norm-topk-prob), aux-loss load balancing (coeff 0.001).
# Steps: preprocess (data_convert_qwen3_moe_instruction.sh); --enable-hf2mg-convert converts the HF weights in
# CKPT_LOAD_DIR at start-up to the TP/PP/EP below. Works on GPUs (NCCL), Ascend NPUs (HCCL) and CPU (gloo).
# --moe-grouped-gemm: the experts run as megatron-core's GroupedMLP (MindSpeed's weight1/weight2 layout).
# To resume an interrupted run: CKPT_LOAD_DIR=$CKPT_SAVE_DIR, drop --finetune and --enable-hf2mg-convert.
export CUDA_DEVICE_MAX_CONNECTIONS=1

NPUS_PER_NODE=${NPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-2}
NODE_RANK=${NODE_RANK:-0}
WORLD_SIZE=$((NPUS_PER_NODE * NNODES))

CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-"./model_from_hf/qwen3_moe_hf/"}   # with --enable-hf2mg-convert: the HF model dir (converted at start-up)
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-"./ckpt/qwen3_moe_full/"}
DATA_PATH=${DATA_PATH:-"./finetune_dataset/alpaca"}   # --output-prefix of data_convert_qwen3_moe_instruction.sh
TOKENIZER_PATH=${TOKENIZER_PATH:-"./model_from_hf/qwen3_moe_hf/"}
TP=4
PP=2
EP=2
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

GPT_ARGS="
    --use-mcore-models \
    --spec mindspeed_llm.tasks.models.spec.qwen3_spec layer_spec \
    --kv-channels 128 \
    --qk-layernorm \
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
    --use-flash-attn \
    --use-fused-rotary-pos-emb \
    --sequence-parallel \
    --use-rotary-position-embeddings \
    --use-fused-swiglu \
    --use-fused-rmsnorm \
    --no-masked-softmax-fusion \
    --use-distributed-optimizer \
    --micro-batch-size 4 \
    --global-batch-size 64 \
    --lr 1.25e-5 \
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
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --transformer-impl local \
    --context-parallel-size ${CP}
"

MOE_ARGS="
    --norm-topk-prob \
    --num-experts 128 \
    --moe-router-topk 8 \
    --moe-ffn-hidden-size 768 \
    --moe-grouped-gemm \
    --moe-permutation-async-comm \
    --moe-token-dispatcher-type alltoall_seq \
    --moe-router-load-balancing-type aux_loss \
    --moe-layer-freq -1 \
    --first-k-dense-replace -1 \
    --moe-aux-loss-coeff 0.001 \
    --expert-model-parallel-size ${EP}
"

DATA_ARGS="
    --data-path ${DATA_PATH} \
    --handler-name AlpacaStyleInstructionHandler \
    --split 100,0,0
"

TUNE_ARGS="
    --finetune \
    --stage sft \
    --is-instruction-dataset \
    --tokenizer-not-use-fast \
    --prompt-type qwen3 \
    --no-pad-to-seq-lengths \
    --enable-hf2mg-convert \
    --model-type-hf qwen3-moe
"

CKPT_ARGS="
    --ckpt-format torch \
    --save-interval ${TRAIN_ITERS} \
    --no-load-optim \
    --no-load-rng \
    --load ${CKPT_LOAD_DIR} \
    --save ${CKPT_SAVE_DIR}
"

OUTPUT_ARGS="
    --log-interval 1 \
    --eval-interval ${TRAIN_ITERS} \
    --eval-iters 0
"

mkdir -p logs
torchrun $DISTRIBUTED_ARGS posttrain_gpt.py \
    $GPT_ARGS \
    $MOE_ARGS \
    $DATA_ARGS \
    $TUNE_ARGS \
    $CKPT_ARGS \
    $OUTPUT_ARGS \
    --distributed-backend nccl \
    2>&1 | tee logs/tune_qwen3_30b_a3b_4K_full_ptd.log
exit ${PIPESTATUS[0]}
