#!/bin/bash
# Qwen3-235B-A22B full-parameter SFT on packed 256K rows (TP4 PP8 EP32 ETP1 CP8, 16 node(s) x 16 devices).
# MindSpeed's long-context recipe, with its memory and overlap switches; flags not implemented here stop the
# run with one line naming the flag.
# Steps: preprocess with data_convert_qwen3_moe_instruction_pack.sh (SEQ_LENGTH as below); --enable-hf2mg-convert
# converts the HF weights in CKPT_LOAD_DIR at start-up. Works on GPUs (NCCL), Ascend NPUs (HCCL) and CPU (gloo).
export CUDA_DEVICE_MAX_CONNECTIONS=1

NPUS_PER_NODE=${NPUS_PER_NODE:-16}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-16}
NODE_RANK=${NODE_RANK:-0}
WORLD_SIZE=$((NPUS_PER_NODE * NNODES))

CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-"./model_from_hf/qwen3_moe_hf/"}   # with --enable-hf2mg-convert: the HF model dir (converted at start-up)
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-"./ckpt/qwen3_moe_full_pack/"}
DATA_PATH=${DATA_PATH:-"./finetune_dataset/alpaca_pack"}   # --output-prefix of data_convert_qwen3_moe_instruction_pack.sh
TOKENIZER_PATH=${TOKENIZER_PATH:-"./model_from_hf/qwen3_moe_hf/"}
TP=4
PP=8
EP=32
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
    --kv-channels 128 \
    --qk-layernorm \
    --tokenizer-name-or-path ${TOKENIZER_PATH} \
    --max-position-embeddings 262144 \
    --noop-layers 94,95 \
    --num-layers 96 \
    --hidden-size 4096 \
    --ffn-hidden-size 12288 \
    --num-attention-heads 64 \
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
    --use-cp-send-recv-overlap \
    --gemm-gradient-accumulation-fusion \
    --recompute-granularity full \
    --recompute-method uniform \
    --recompute-num-layers 1 \
    --manual-gc \
    --manual-gc-interval 10 \
    --use-ascend-coc \
    --coc-fused-kernel \
    --swap-optimizer \
    --micro-batch-size 1 \
    --global-batch-size 32 \
    --lr 12e-6 \
    --lr-decay-style cosine \
    --min-lr 12e-7 \
    --weight-decay 1e-1 \
    --lr-warmup-fraction 0.005 \
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
    --context-parallel-size ${CP} \
    --context-parallel-algo ulysses_cp_algo \
    --num-layers-per-virtual-pipeline-stage 4 \
    --attention-mask-type general \
    --transformer-impl local
"

MOE_ARGS="
    --num-experts 128 \
    --moe-router-topk 8 \
    --moe-ffn-hidden-size 1536 \
    --moe-router-load-balancing-type aux_loss \
    --norm-topk-prob \
    --moe-grouped-gemm \
    --moe-permutation-async-comm \
    --moe-token-dispatcher-type alltoall \
    --moe-layer-freq 1 \
    --first-k-dense-replace 0 \
    --moe-aux-loss-coeff 0.001 \
    --moe-fb-overlap \
    --moe-permute-fusion \
    --expert-model-parallel-size ${EP} \
    --expert-tensor-parallel-size 1
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
    --reset-attention-mask \
    --neat-pack \
    --enable-hf2mg-convert \
    --model-type-hf qwen3-moe
"

CKPT_ARGS="
    --ckpt-format torch \
    --save-interval ${TRAIN_ITERS} \
    --no-load-optim \
    --load ${CKPT_LOAD_DIR} \
    --save ${CKPT_SAVE_DIR} \
    --no-load-rng
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
    2>&1 | tee logs/tune_qwen3_235b_a22b_256K_full_pack_A3_ptd.log
exit ${PIPESTATUS[0]}
