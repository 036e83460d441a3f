"""The FLOPs behind the training log's TFLOP/s: Megatron's count for full fine-tuning, and for LoRA frozen weights
that compute no weight gradients plus the adapters trained in full."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from mindspeed_llm.models.lora import LoraSpec
from mindspeed_llm.training.log import flops_per_iteration, flops_per_token
from tests.conftest import run_torchrun
from tests.train_fixtures import env, model_flags, train_flags  # noqa: F401  (env is a fixture)

# L=2 layers, h=8, ffn=12, N=2 heads, G=1 group, kv=4, V=16, SwiGLU, untied output layer.
TINY = SimpleNamespace(num_layers=2, hidden_size=8, ffn_hidden_size=12, num_attention_heads=2, num_query_groups=1,
                       kv_channels=4, vocab_size=16, tie_word_embeddings=False)
# Weights per layer: qkv 8 x 4*(2+2*1) = 128, proj 8 x 8 = 64, fc1 8 x 2*12 = 192, fc2 12 x 8 = 96 -> 480;
# two layers 960, output layer 8 x 16 = 128: 1088 matmul weights per token.
# Attention at length 4, causal (rho 0.5): 3 (fwd + bwd) x 2 matmuls x 2 x 4 x 0.5 x kv 4 x N 2 per layer = 96,
# Megatron writes it 12 x L x S x rho x 2 x kv x N = 12 x 2 x 4 x 0.5 x 2 x 4 x 2 = 768 for both layers.
ATTENTION = 768


def test_full_fine_tuning_is_megatrons_formula():
    assert flops_per_token(TINY, 4, 0.5) == 6 * 1088 + ATTENTION == 7296
    # Megatron's own expression: 12*L*h*ffn*g + 12*L*h^2*(1 + G/N + (S/h)*2*rho)*(kv*N/h) + 6*h*V
    megatron = 12 * 2 * 8 * 12 * 1.5 + 12 * 2 * 64 * (1 + 1 / 2 + (4 / 8) * 2 * 0.5) * (4 * 2 / 8) + 6 * 8 * 16
    assert flops_per_token(TINY, 4, 0.5) == megatron
    assert flops_per_iteration(TINY, [(3, 4, 0.5), (1, 4, 0.5)]) == 4 * 4 * 7296


def test_lora_frozen_weights_compute_no_weight_gradients():
    lora = LoraSpec(r=2, alpha=4.0, targets=("linear_qkv", "linear_fc2"))
    # frozen base: forward 2 + input gradient 2 per weight; adapters (r=2): qkv 2 x (8 + 16) = 48,
    # fc2 2 x (12 + 8) = 40 per layer, trained in full (6 per weight) in both layers.
    assert flops_per_token(TINY, 4, 0.5, lora=lora) == 4 * 1088 + 6 * 2 * (48 + 40) + ATTENTION == 6176
    # --lora-modules-to-save output_layer: its 128 weights get their weight gradient too
    saved = LoraSpec(r=2, alpha=4.0, targets=("linear_qkv", "linear_fc2"), modules_to_save=("output_layer",))
    assert flops_per_token(TINY, 4, 0.5, lora=saved) == 6176 + 2 * 128
    # tied embeddings: saving word_embeddings trains the output matmul's weights as well
    tied = SimpleNamespace(**{**vars(TINY), "tie_word_embeddings": True})
    saved_emb = LoraSpec(r=2, alpha=4.0, targets=("linear_qkv", "linear_fc2"), modules_to_save=("word_embeddings",))
    assert flops_per_token(tied, 4, 0.5, lora=saved_emb) == 6176 + 2 * 128


@pytest.mark.distributed
def test_lora_run_logs_lora_flops(env):
    """A LoRA run of the tiny Qwen3 model (4 layers, h 64, ffn 128, 4 heads, 2 groups, kv 16, V 448; r 4 on all
    four linears): the FLOPs its log line's TFLOP/s divides by the time are the LoRA count."""
    iters, seq, global_batch = 2, 128, 4
    argv = [*model_flags(env["hf"]), *train_flags(iters, seq), "--data-path", env["plain"], "--load",
            str(env["ckpt"][(1, 1)]), "--finetune", "--lora-r", "4", "--lora-alpha", "8", "--lora-target-modules",
            "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "--log-throughput"]
    plan, out = env["root"] / "lora_flops_plan.json", env["root"] / "lora_flops_out.json"
    plan.write_text(json.dumps([{"name": "lora", "argv": argv}]))
    proc = run_torchrun("tests/dist_train_checks.py", str(plan), str(out), nproc=1)
    assert "throughput per GPU (TFLOP/s/GPU):" in proc.stdout
    h, L, V = 64, 4, 448
    qkv, proj, fc1, fc2 = (h, 16 * (4 + 2 * 2)), (16 * 4, h), (h, 2 * 128), (128, h)
    frozen = L * sum(i * o for i, o in (qkv, proj, fc1, fc2)) + h * V
    adapters = L * sum(4 * (i + o) for i, o in (qkv, proj, fc1, fc2))
    attention = 12 * L * seq * 0.5 * 2 * 16 * 4
    per_token = 4 * frozen + 6 * adapters + attention
    assert json.loads(out.read_text())["lora"]["flops"] == pytest.approx(iters * global_batch * seq * per_token)
