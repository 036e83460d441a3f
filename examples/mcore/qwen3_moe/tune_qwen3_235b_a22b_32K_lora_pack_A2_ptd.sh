#!/bin/bash
# Qwen3-235B-A22B LoRA SFT on packed 32K rows (TP4 PP8 EP2 ETP4, VPP 4 layers, 8 node(s) x 8 devices).
# Adapters (r 16, alpha 32) on linear_qkv/proj and every expert's linear_fc1/fc2 (sequential experts: no
# --moe-grouped-gemm); checkpoints hold the adapters only (--lora-ckpt-filter).
# Steps: preprocess with data_convert_qwen3_moe_instruction_pack.sh (SEQ_LENGTH=32768), convert the HF weights
# with ckpt_convert_qwen3_moe_hf2mcore.sh to the TP/PP/EP/VPP below (96 layers, --noop-layers 94,95),
# then run this script on every node. To resume: LORA_LOAD_DIR=$CKPT_SAVE_DIR, drop --finetune.
export CUDA_DEVICE_MAX_CONNECTIONS=1

NPUS_PER_NODE=${NPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-8}
NODE_RANK=${NODE_RANK:-0}
WORLD_SIZE=$((NPUS_PER_NODE * NNODES))

CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-"./model_weights/qwen3_moe_mcore/"}   # converted checkpoint (TP/PP/EP as below)
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-"./ckpt/qwen3_moe_235b_lora/"}
LORA_LOAD_DIR=${LORA_LOAD_DIR:-}                                  # a LoRA checkpoint to resume from
DATA_PATH=${DATA_PATH:-"./finetune_dataset/alpaca_pack"}   # --output-prefix of data_convert_qwen3_moe_instruction_pack.sh
TOKENIZER_PATH=${TOKENIZER_PATH:-"./model_from_hf/qwen3_moe_hf/"}
TP=4
PP=8
EP=2
CP=1
SEQ_LENGTH=32768
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
    --max-position-embeddings 32768 \
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
    --swiglu \
    --attention-softmax-in-fp32 \
    --group-query-attention \
    --num-query-groups 4 \
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
    --recompute-granularity full \
    --recompute-method block \
    --recompute-num-layers 4 \
    --use-cp-send-recv-overlap \
    --manual-gc \
    --manual-gc-interval 10 \
    --micro-batch-size 1 \
    --global-batch-size 32 \
    --lr 1.5e-5 \
    --lr-decay-style cosine \
    --min-lr 1e-7 \
    --weight-decay 1e-1 \
    --lr-warmup-fraction 0.03 \
    --attention-dropout 0.05 \
    --init-method-std 0.01 \
    --hidden-dropout 0.05 \
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
    --attention-mask-type causal \
    --sequence-parallel
"

MOE_ARGS="
    --norm-topk-prob \
    --num-experts 128 \
    --moe-router-topk 8 \
    --moe-ffn-hidden-size 1536 \
    --moe-router-load-balancing-type aux_loss \
    --moe-token-dispatcher-type alltoall_seq \
    --moe-aux-loss-coeff 0.001 \
    --moe-permutation-async-comm \
    --moe-layer-freq 1 \
    --first-k-dense-replace 0 \
    --expert-model-parallel-size ${EP} \
    --expert-tensor-parallel-size 4
"

LORA_ARGS="
    --lora-ckpt-filter \
    --lora-r 16 \
    --lora-alpha 32 \
    --lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2 \
    ${LORA_LOAD_DIR:+--lora-load ${LORA_LOAD_DIR}}
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
    --neat-pack
"

CKPT_ARGS="
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
    $LORA_ARGS \
    $DATA_ARGS \
    $TUNE_ARGS \
    $CKPT_ARGS \
    $OUTPUT_ARGS \
    --distributed-backend nccl \
    2>&1 | tee logs/tune_qwen3_235b_a22b_32K_lora_pack_A2_ptd.log
exit ${PIPESTATUS[0]}
