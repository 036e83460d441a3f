#!/bin/bash
# Qwen3-30B-A3B full-parameter DPO (preference training) at 16K sequence length (TP2 PP8, 2 node(s) x 16 devices).
# The reference model is a frozen copy of the --load weights (or REF_MODEL_DIR, a converted checkpoint with the
# same TP/PP/EP); it runs in eval mode without gradients, so it adds no load-balancing loss, and the policy's
# aux loss trains the routers without entering the reported DPO loss.
# Steps: preprocess pairwise data (data_convert_qwen3_moe_pairwise.sh), convert the HF weights to TP2 PP8
# (ckpt_convert_qwen3_moe_hf2mcore.sh), then run this script on every node.
# To resume an interrupted run: CKPT_LOAD_DIR=$CKPT_SAVE_DIR and drop --finetune.
export CUDA_DEVICE_MAX_CONNECTIONS=1

NPUS_PER_NODE=${NPUS_PER_NODE:-16}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-2}
NODE_RANK=${NODE_RANK:-0}
WORLD_SIZE=$((NPUS_PER_NODE * NNODES))

CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-"./model_weights/qwen3_moe_mcore/"}   # converted checkpoint (TP/PP/EP as below)
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-"./ckpt/qwen3_moe_dpo/"}
REF_MODEL_DIR=${REF_MODEL_DIR:-""}   # optional: another converted checkpoint as the reference
DATA_PATH=${DATA_PATH:-"./pair_dataset/dpo_en"}   # --output-prefix of data_convert_qwen3_moe_pairwise.sh
TOKENIZER_PATH=${TOKENIZER_PATH:-"./model_from_hf/qwen3_moe_hf/"}
TP=2
PP=8
EP=1
CP=1
SEQ_LENGTH=16384
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
    --max-position-embeddings 16384 \
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
    --swiglu \
    --attention-softmax-in-fp32 \
    --no-gradient-accumulation-fusion \
    --group-query-attention \
    --num-query-groups 4 \
    --npu-deterministic \
    --use-flash-attn \
    --use-fused-rotary-pos-emb \
    --sequence-parallel \
    --use-rotary-position-embeddings \
    --use-fused-swiglu \
    --use-fused-rmsnorm \
    --no-masked-softmax-fusion \
    --use-distributed-optimizer \
    --micro-batch-size 1 \
    --global-batch-size 64 \
    --lr 5e-8 \
    --lr-decay-style constant \
    --min-lr 0 \
    --weight-decay 0.0 \
    --lr-warmup-fraction 0.0 \
    --attention-dropout 0.0 \
    --init-method-std 0.02 \
    --hidden-dropout 0.0 \
    --clip-grad 1.0 \
    --adam-beta1 0.9 \
    --adam-beta2 0.999 \
    --norm-epsilon 1e-06 \
    --initial-loss-scale 4096 \
    --seed 42 \
    --bf16 \
    --train-iters ${TRAIN_ITERS} \
    --seq-length ${SEQ_LENGTH} \
    --no-shared-storage \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --context-parallel-size ${CP} \
    --context-parallel-algo megatron_cp_algo \
    --attention-mask-type general \
    --use-cp-send-recv-overlap \
    --recompute-granularity full \
    --recompute-method block \
    --recompute-num-layers 4 \
    --transformer-impl local
"

MOE_ARGS="
    --norm-topk-prob \
    --num-experts 128 \
    --moe-router-topk 8 \
    --moe-intermediate-size 768 \
    --moe-grouped-gemm \
    --moe-token-dispatcher-type alltoall_seq \
    --moe-router-load-balancing-type aux_loss \
    --moe-layer-freq -1 \
    --first-k-dense-replace -1 \
    --moe-aux-loss-coeff 0.001 \
    --expert-model-parallel-size ${EP}
"

DATA_ARGS="
    --data-path ${DATA_PATH} \
    --split 100,0,0 \
    --no-shuffle
"

TUNE_ARGS="
    --finetune \
    --stage dpo \
    --dpo-loss-type sigmoid \
    --is-pairwise-dataset \
    --tokenizer-not-use-fast \
    --prompt-type qwen3 \
    --no-pad-to-seq-lengths \
    --pad-to-multiple-of 2 \
    ${REF_MODEL_DIR:+--ref-model ${REF_MODEL_DIR}}
"

CKPT_ARGS="
    --ckpt-format torch \
    --save-interval ${TRAIN_ITERS} \
    --no-load-optim \
    --no-load-rng \
    --no-save-optim \
    --no-save-rng \
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
    2>&1 | tee logs/dpo_qwen3_30b_a3b_16K_A3_ptd.log
exit ${PIPESTATUS[0]}
