#!/bin/bash
# Qwen3-30B-A3B (or any Qwen3-MoE): Hugging Face safetensors -> Megatron (mcore) checkpoint, TP1 PP8 EP1.
# Edit the paths and parallel sizes below; they must match the training script's --tensor-model-parallel-size /
# --pipeline-model-parallel-size / --expert-model-parallel-size. Expert e goes to EP rank e // (128 / EP);
# rank directories are named mp_rank_TT[_PPP][_EEE] as MindSpeed names them.
# --moe-grouped-gemm writes MindSpeed's grouped expert layout (mlp.experts.weight1/weight2); drop it for
# sequential experts (local_experts.N.linear_fc1/fc2), the layout LoRA adapts.
set -euo pipefail

HF_DIR=${HF_DIR:-./model_from_hf/qwen3_moe_hf/}          # downloaded Qwen3-30B-A3B (config.json, *.safetensors)
MG_DIR=${MG_DIR:-./model_weights/qwen3_moe_mcore/}       # output: latest_checkpointed_iteration.txt + iter_0000001/
TP=${TP:-1}
PP=${PP:-8}
EP=${EP:-1}

python convert_ckpt_v2.py \
    --load-model-type hf \
    --save-model-type mg \
    --target-tensor-parallel-size ${TP} \
    --target-pipeline-parallel-size ${PP} \
    --target-expert-parallel-size ${EP} \
    --load-dir ${HF_DIR} \
    --save-dir ${MG_DIR} \
    --moe-grouped-gemm \
    --model-type-hf qwen3-moe
    # Qwen3-235B-A22B (MindSpeed's ckpt_convert_qwen3_moe_235b_hf2mcore): TP1 PP4 EP32 and
    #   --num-layers-per-virtual-pipeline-stage 8 --noop-layers 94,95
    # compare logits with transformers after:  --verify
