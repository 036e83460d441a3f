"""The fused paths compute what the unfused ones do: RMSNorm through `F.rms_norm`, grouped-query SDPA without
repeated K/V, megatron-core's optimizer on torch's foreach norm/scale and fused AdamW, weight gradients accumulated
into main grads without Apex, the block-wise cross entropy. (Whole training runs with and without the recipes'
kernel flags are compared in tests/test_train.py.)"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mindspeed_llm import platform

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rmsnorm_equals_qwen_formula(dtype):
    from mindspeed_llm.models.spec import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(SimpleNamespace(params_dtype=dtype, sequence_parallel=False, fused_rmsnorm=True), 64, eps=1e-6)
    norm.weight.data.copy_(torch.randn(64))
    x = (3 * torch.randn(5, 3, 64)).to(dtype).requires_grad_()
    out = norm(x)
    ref_x = x.detach().clone().requires_grad_()
    ref_w = norm.weight.detach().clone().requires_grad_()
    h = ref_x.float()                                   # Qwen3RMSNorm: fp32 normalise, cast, then scale
    ref = ref_w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(norm.weight.grad, ref_w.grad, rtol=tol, atol=tol)


def test_gqa_attention_equals_repeated_heads():
    from megatron.core.transformer.enums import AttnMaskType

    from mindspeed_llm.models.attention import SDPAttention

    config = SimpleNamespace(context_parallel_size=1, num_attention_heads=8, num_query_groups=2, kv_channels=16,
                             attention_dropout=0.0)
    tp1 = SimpleNamespace(tp=SimpleNamespace(size=lambda: 1))
    attn = SDPAttention(config, 1, AttnMaskType.causal, pg_collection=tp1)
    torch.manual_seed(0)
    q, k, v = torch.randn(10, 2, 8, 16), torch.randn(10, 2, 2, 16), torch.randn(10, 2, 2, 16)
    out = attn(q, k, v, None)
    ref = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k.repeat_interleave(4, 2),
                                                                             v.repeat_interleave(4, 2))),
                                         is_causal=True).permute(2, 0, 1, 3).reshape(10, 2, -1)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_foreach_grad_norm_and_scale():
    torch.manual_seed(0)
    tensors = [torch.randn(3, 4), torch.randn(7), torch.randn(2, 2, 5)]
    norm, _ = platform._foreach_l2_norm(0, None, [tensors], False)
    want = torch.cat([t.flatten() for t in tensors]).double().norm()
    assert norm.shape == (1,) and abs(float(norm) - float(want)) <= 1e-6 * float(want)
    dst = [torch.empty_like(t) for t in tensors]
    platform._foreach_scale(0, None, [tensors, dst], 0.5)
    for a, b in zip(tensors, dst):
        torch.testing.assert_close(b, a * 0.5, rtol=0, atol=0)
    same = [t.clone() for t in tensors]
    platform._foreach_scale(0, None, [same, same], 3.0)
    for a, b in zip(tensors, same):
        torch.testing.assert_close(b, a * 3.0, rtol=0, atol=0)


def _adam(params):
    return torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)


def _steps(opt, params, grads):
    for g in grads:
        for p, gp in zip(params, g):
            p.grad = gp.clone()
        opt.step()


def test_megatron_optimizer_runs_fused_adamw_and_keeps_it_on_load():
    """megatron-core's wrapper around torch AdamW is switched to the fused kernel; the update equals torch's
    default AdamW within fp32 rounding, and loading a state saved by an unfused optimizer keeps the fused kernel.
    In a fresh interpreter: megatron's optimizer wrappers need the device layer's CPU adaptation."""
    code = "from tests.test_fused import fused_adam_check; fused_adam_check(); print('OK')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def fused_adam_check() -> None:
    from megatron.core.optimizer import ChainedOptimizer, FP32Optimizer, OptimizerConfig

    if platform.detect_platform().is_cpu:
        platform.adapt_megatron_for_cpu()
    torch.manual_seed(0)
    start = [torch.randn(16, 8), torch.randn(8)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(6)]
    ref_params = [p.clone().requires_grad_() for p in start]
    ref = _adam(ref_params)
    _steps(ref, ref_params, grads)

    params = [p.clone().requires_grad_() for p in start]
    inner = _adam(params)
    wrapped = ChainedOptimizer([FP32Optimizer(inner, OptimizerConfig(lr=1e-2), None)])
    platform.adapt_megatron_optimizer(wrapped)
    assert all(g["fused"] and not g["foreach"] for g in inner.param_groups)
    _steps(inner, params, grads[:3])
    # a checkpoint written by an unfused run: its param groups say fused=None, its step counters are host floats
    half_params = [p.clone().requires_grad_() for p in start]
    unfused = _adam(half_params)
    _steps(unfused, half_params, grads[:3])
    inner.load_state_dict(unfused.state_dict())
    assert all(g["fused"] for g in inner.param_groups)
    with torch.no_grad():
        for p, h in zip(params, half_params):
            p.copy_(h)
    _steps(inner, params, grads[3:])
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-6)


def test_kernel_flags_reach_the_layer_config():
    from mindspeed_llm.arguments import parse_train_args
    from mindspeed_llm.training.model_setup import transformer_overrides
    from mindspeed_llm.training.resolve_run import resolve_run

    base = ["--data-path", "x", "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "1",
            "--lr", "1e-5", "--seq-length", "8", "--is-instruction-dataset", "--num-layers", "2", "--hidden-size",
            "64", "--num-attention-heads", "4", "--swiglu", "--disable-bias-linear"]

    def overrides(extra: list[str]) -> dict:
        return transformer_overrides(resolve_run(parse_train_args(base + extra), world_size=1, tokenizer_len=100))

    fused = overrides(["--use-fused-rmsnorm", "--use-fused-swiglu", "--use-fused-rotary-pos-emb"])
    plain = overrides([])
    off = overrides(["--use-fused-swiglu", "--no-bias-swiglu-fusion", "--use-fused-rotary-pos-emb", "--no-rope-fusion"])
    assert fused["fused_rmsnorm"] and fused["bias_activation_fusion"] and fused["fused_rope"]
    assert not plain["fused_rmsnorm"] and not plain["bias_activation_fusion"] and not plain["fused_rope"]
    assert not off["bias_activation_fusion"] and not off["fused_rope"]
    # gradient-accumulation fusion is Megatron-LM's default; the recipes turn it off
    no_gaf = overrides(["--no-gradient-accumulation-fusion"])
    assert plain["gradient_accumulation_fusion"] and not no_gaf["gradient_accumulation_fusion"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wgrad_gemm_accumulates_into_main_grad(dtype):
    """Apex's wgrad_gemm_accum_fp32 contract: main_grad += grad_output^T @ input, over several micro-batches."""
    torch.manual_seed(0)
    main_grad = torch.randn(6, 5)
    expected = main_grad.double()
    for _ in range(3):
        x, g = torch.randn(7, 5, dtype=dtype), torch.randn(7, 6, dtype=dtype)
        platform.wgrad_gemm_accum_fp32(x, g, main_grad)
        expected += g.double().t() @ x.double()
    tol = 1e-6 if dtype == torch.float32 else 0.05    # bf16: the product may be rounded to bf16 before adding
    torch.testing.assert_close(main_grad.double(), expected, rtol=tol, atol=tol)
    assert main_grad.dtype == torch.float32

    half = torch.zeros(6, 5, dtype=torch.bfloat16)
    x, g = torch.randn(7, 5, dtype=torch.bfloat16), torch.randn(7, 6, dtype=torch.bfloat16)
    platform.wgrad_gemm_accum_fp16(x, g, half)
    torch.testing.assert_close(half, g.t() @ x)


@pytest.mark.skipif(importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None,
                    reason="Apex's extension is installed: megatron-core uses it")
def test_megatron_layers_take_grad_accum_fusion_without_apex():
    """Without Apex the device layer lets megatron-core accept gradient_accumulation_fusion, with our kernels."""
    from megatron.core.tensor_parallel import layers

    platform.adapt_megatron_grad_accum_fusion()
    assert layers._grad_accum_fusion_available
    kernels = layers.fused_weight_gradient_mlp_cuda
    assert kernels.wgrad_gemm_accum_fp32 is platform.wgrad_gemm_accum_fp32
    assert kernels.wgrad_gemm_accum_fp16 is platform.wgrad_gemm_accum_fp16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_elements", [1 << 25, 37])
def test_lean_cross_entropy_equals_fp32_cross_entropy(dtype, block_elements):
    """Per-token loss and logits gradient equal F.cross_entropy on fp32 logits (blocks of 1 token and of all)."""
    from mindspeed_llm.models.cross_entropy import vocab_parallel_cross_entropy

    torch.manual_seed(0)
    logits = (4 * torch.randn(6, 3, 50)).to(dtype).requires_grad_()        # [s, b, V]
    target = torch.randint(0, 50, (6, 3))
    grad = torch.rand(6, 3)
    loss = vocab_parallel_cross_entropy(logits, target, None, block_elements=block_elements)
    loss.backward(grad)
    ref_logits = logits.detach().float().requires_grad_()
    ref = F.cross_entropy(ref_logits.flatten(0, 1), target.flatten(), reduction="none").view(6, 3)
    ref.backward(grad)
    assert loss.dtype == torch.float32 and logits.grad.dtype == dtype
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    tol = 1e-6 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(logits.grad.float(), ref_logits.grad, rtol=tol, atol=tol)
