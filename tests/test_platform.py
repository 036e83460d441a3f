"""Device layer: platform detection, backend fallback, and megatron-core on CPU/gloo under torchrun."""
from __future__ import annotations

import pytest

from mindspeed_llm import platform
from mindspeed_llm.errors import UserError
from tests.conftest import run_cli, run_torchrun


def test_cpu_platform_and_backend_fallback(capsys, monkeypatch):
    monkeypatch.delenv("MINDSPEED_DEVICE", raising=False)
    platform.detect_platform.cache_clear()
    plat = platform.detect_platform()
    if plat.device_type != "cpu":
        pytest.skip("accelerator present: the CPU fallback is exercised on CPU-only machines")
    assert plat.backend == "gloo" and str(platform.current_device()) == "cpu"
    assert platform.resolve_backend(None) == "gloo"
    assert platform.resolve_backend("gloo") == "gloo"
    capsys.readouterr()
    assert platform.resolve_backend("nccl") == "gloo"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--distributed-backend nccl" in err[0] and "gloo" in err[0]
    with pytest.raises(UserError, match="--distributed-backend 'nclc'"):
        platform.resolve_backend("nclc")


def test_forced_device_env(monkeypatch):
    monkeypatch.setenv("MINDSPEED_DEVICE", "cpu")
    platform.detect_platform.cache_clear()
    try:
        assert platform.detect_platform() == platform.Platform("cpu", "gloo")
        monkeypatch.setenv("MINDSPEED_DEVICE", "tpu")
        platform.detect_platform.cache_clear()
        with pytest.raises(UserError, match="MINDSPEED_DEVICE='tpu'"):
            platform.detect_platform()
    finally:
        monkeypatch.delenv("MINDSPEED_DEVICE")
        platform.detect_platform.cache_clear()


def test_cpu_adaptation_is_scoped_to_megatron():
    """In a fresh process: megatron sees CPU stand-ins; other libraries (transformers) keep the real torch."""
    code = """
import torch
from mindspeed_llm.platform import adapt_megatron_for_cpu, cpu_adapted
adapt_megatron_for_cpu(); adapt_megatron_for_cpu()
assert cpu_adapted()
import megatron.core.pipeline_parallel.schedules as sched
assert sched.torch.zeros(2, device="cuda").device.type == "cpu"
assert torch.zeros(2).type() == "torch.cuda.FloatTensor" and torch.zeros(2, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
assert torch.zeros(2).type(torch.float64).dtype == torch.float64
assert torch.cuda.current_device() == "cpu"
torch.cuda.synchronize()
with torch.cuda.stream(torch.cuda.Stream()):
    pass
from megatron.core.tensor_parallel import random as r
state = r._get_cuda_rng_state(); a = torch.rand(3); r._set_cuda_rng_state(state); assert torch.equal(a, torch.rand(3))
assert torch.zeros is not sched.torch.zeros   # the global torch factories are untouched
print("ADAPT OK")
"""
    assert "ADAPT OK" in run_cli("-c", code).stdout


def test_collective_tensors_on_the_platform_device():
    import torch

    t = platform.device_tensor([1, 2, 3], torch.int64)
    assert t.device == platform.current_device() and t.dtype == torch.int64 and t.tolist() == [1, 2, 3]
    assert platform.device_tensor([0.5]).dtype == torch.get_default_dtype()
    buf = platform.device_empty((2, 3), torch.bfloat16)
    assert buf.shape == (2, 3) and buf.dtype == torch.bfloat16 and buf.device == platform.current_device()
    assert platform.to_comm_device(t) is t          # already there: no copy, in-place collectives stay in place


def test_device_state_on_cpu(monkeypatch):
    import torch

    monkeypatch.setenv("MINDSPEED_DEVICE", "cpu")
    platform.detect_platform.cache_clear()
    try:
        assert platform.device_rng_state() is None
        with pytest.raises(ValueError, match="no accelerator"):
            platform.set_device_rng_state(torch.get_rng_state())
        assert platform.pin_memory_available() is False and platform.device_count() == 0
        before = platform.memory_stats()
        assert set(before) == {"allocated", "max_allocated", "reserved", "max_reserved"}
        assert 0 < before["allocated"] <= before["max_allocated"]
        block = torch.ones(64 * 1024 * 1024, dtype=torch.uint8)      # 64 MiB, touched
        after = platform.memory_stats()
        assert after["allocated"] - before["allocated"] > 48 * 1024 * 1024
        assert after["max_allocated"] >= after["allocated"]
        del block
        # an accelerator platform asks its own torch module (torch.cuda / torch.npu), never a fixed one
        assert platform._accelerator(platform.Platform("cuda", "nccl")) is torch.cuda
        assert platform._accelerator(platform.Platform("cpu", "gloo")) is None
    finally:
        monkeypatch.delenv("MINDSPEED_DEVICE")
        platform.detect_platform.cache_clear()


def test_more_ranks_than_devices_is_an_error():
    from mindspeed_llm.errors import UserError

    platform.check_ranks_per_node(1, 1, "cuda")
    platform.check_ranks_per_node(8, 8, "npu")
    platform.check_ranks_per_node(4, 0, "cpu")         # gloo ranks share the host
    with pytest.raises(UserError) as err:
        platform.check_ranks_per_node(2, 1, "cuda")
    assert "--nproc_per_node 2" in str(err.value) and "1 cuda device" in str(err.value)
    with pytest.raises(UserError, match="--nproc_per_node 16 .* 8 npu"):
        platform.check_ranks_per_node(16, 8, "npu")


def test_checkpoint_rng_of_another_device_kind_is_not_applied(capsys):
    import torch

    from mindspeed_llm.training.checkpointing import _set_device_rng

    here = platform.detect_platform().device_type
    other = "npu" if here != "npu" else "cuda"
    _set_device_rng({"cuda_rng_state": torch.zeros(16, dtype=torch.uint8), "device_rng_type": other})
    err = capsys.readouterr().err
    assert f"checkpoint's {other} RNG state is not restored on {here}" in err
    _set_device_rng({})                                  # saved without an accelerator: nothing to restore
    assert capsys.readouterr().err == ""


@pytest.fixture(scope="module")
def tiny_checkpoints(tiny_qwen3, tmp_path_factory):
    from mindspeed_llm.checkpoint import cli

    root = tmp_path_factory.mktemp("platform")
    for name, flags in (("tp2", ["--target-tensor-parallel-size", "2"]), ("pp2", ["--target-pipeline-parallel-size", "2"])):
        assert cli.main(["--load-dir", str(tiny_qwen3), "--save-dir", str(root / name), *flags]) == 0
    return tiny_qwen3, root / "tp2", root / "pp2"


@pytest.mark.distributed
def test_megatron_training_machinery_on_cpu(tiny_checkpoints):
    hf, tp2, pp2 = tiny_checkpoints
    proc = run_torchrun("tests/dist_platform.py", str(hf), str(tp2), str(pp2))
    for check in ("tp2-train", "ce-tp2", "packed", "pp2-train"):
        assert proc.stdout.count(f"CHECK {check}: OK") == 2, proc.stdout[-3000:]
