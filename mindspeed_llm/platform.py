"""Device layer: picks the accelerator and collective backend, and adapts megatron-core to CPU.

CUDA + NCCL when a GPU is visible, Ascend NPU + HCCL when `torch_npu` imports, otherwise CPU + gloo.
megatron-core 0.16.1 assumes CUDA in many places; `adapt_megatron_for_cpu()` is the one place where those
assumptions are redirected to the CPU, and it is applied only when no accelerator is present. The rest of the
package is device-agnostic: it asks `current_device()` for a device and never names one, makes tensors for
collectives with `device_tensor` / `device_empty` / `to_comm_device`, and reads the accelerator's RNG state, memory
counters and pinned-memory support through `device_rng_state`, `memory_stats` and `pin_memory_available`.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import logging
import os
import sys
import types
from dataclasses import dataclass
from typing import Any, Optional

import torch

from mindspeed_llm.errors import UserError

__all__ = ["Platform", "detect_platform", "current_device", "resolve_backend", "adapt_megatron_for_cpu",
           "cpu_adapted", "init_distributed", "destroy_distributed", "notice", "COLLECTIVE_HELPERS",
           "comm_device", "device_tensor", "device_empty", "to_comm_device", "device_rng_state",
           "set_device_rng_state", "memory_stats", "pin_memory_available", "device_count",
           "check_ranks_per_node", "adapt_megatron_grad_accum_fusion", "adapt_megatron_moe",
           "adapt_megatron_grouped_mlp", "grouped_gemm"]

_BACKEND_FOR = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}
_CPU_ADAPTED = False


@dataclass(frozen=True)
class Platform:
    device_type: str   # "cuda" | "npu" | "cpu"
    backend: str       # "nccl" | "hccl" | "gloo"

    @property
    def is_cpu(self) -> bool:
        return self.device_type == "cpu"


def notice(msg: str) -> None:
    """One-line notice on stderr, from rank 0 only (torchrun's RANK before torch.distributed is up: flag notices
    come at parse time, on every rank)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_rank() != 0:
            return
    elif os.environ.get("RANK", "0") != "0":
        return
    print(f"[mindspeed_llm] {msg}", file=sys.stderr, flush=True)


def _npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401
    except Exception:
        return False
    return bool(getattr(torch, "npu", None)) and torch.npu.is_available()


@functools.lru_cache(maxsize=1)
def detect_platform() -> Platform:
    """The accelerator of this process. `MINDSPEED_DEVICE=cpu` forces the CPU path (for tests on a GPU box)."""
    forced = os.environ.get("MINDSPEED_DEVICE", "").lower()
    if forced == "cpu":
        return Platform("cpu", "gloo")
    if forced not in ("", "cuda", "npu"):
        raise UserError(f"MINDSPEED_DEVICE={forced!r} is not one of cpu, cuda, npu")
    if forced in ("", "cuda") and torch.cuda.is_available() and not cpu_adapted():
        return Platform("cuda", "nccl")
    if forced in ("", "npu") and _npu_available():
        return Platform("npu", "hccl")
    return Platform("cpu", "gloo")


def current_device() -> torch.device:
    """The device this rank computes on (cuda:LOCAL_RANK, npu:LOCAL_RANK or cpu)."""
    plat = detect_platform()
    if plat.is_cpu:
        return torch.device("cpu")
    return torch.device(plat.device_type, int(os.environ.get("LOCAL_RANK", 0)))


# --------------------------------------------------------------------------------------------------------------
# Tensors for collectives. NCCL/HCCL only take tensors on the accelerator, so a `torch.tensor(...)` on the CPU
# handed to `all_reduce` works under gloo and fails on a GPU. Every tensor the package hands to a
# torch.distributed collective is made (or moved) by one of these helpers; tests/test_collective_devices.py
# checks that statically over the whole package.
# --------------------------------------------------------------------------------------------------------------

COLLECTIVE_HELPERS = ("device_tensor", "device_empty", "to_comm_device")


def comm_device(group: Any = None) -> torch.device:
    """The device collectives on `group` (default: the world) take tensors on: the accelerator for NCCL/HCCL,
    the CPU for gloo (which is also what `--distributed-backend gloo` on a GPU machine needs for send/recv)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_backend(group) in ("gloo", "mpi"):
        return torch.device("cpu")
    return current_device()


def device_tensor(values: Any, dtype: Optional[torch.dtype] = None, group: Any = None) -> torch.Tensor:
    """A new tensor holding `values` on the device collectives on `group` use."""
    return torch.tensor(values, dtype=dtype, device=comm_device(group))


def device_empty(shape: Any, dtype: torch.dtype, group: Any = None) -> torch.Tensor:
    """An uninitialised receive buffer on the device collectives on `group` use."""
    return torch.empty(shape, dtype=dtype, device=comm_device(group))


def to_comm_device(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """`tensor` itself when it already lives on the collective device of `group`, else a copy there (an
    in-place collective on the copy must then be copied back by the caller)."""
    device = comm_device(group)
    if tensor.device.type == device.type and (device.index is None or tensor.device.index == device.index):
        return tensor
    return tensor.to(device)


# --------------------------------------------------------------------------------------------------------------
# Accelerator state: RNG, memory, pinned host memory, device count
# --------------------------------------------------------------------------------------------------------------

def _accelerator(plat: Optional[Platform] = None) -> Optional[types.ModuleType]:
    """`torch.cuda` / `torch.npu` for an accelerator platform, None on the CPU."""
    plat = plat or detect_platform()
    return None if plat.is_cpu else getattr(torch, plat.device_type)


def device_rng_state() -> Optional[torch.Tensor]:
    """The accelerator's default generator state of this rank's device (None on the CPU, whose generator is
    `torch.get_rng_state()`)."""
    acc = _accelerator()
    return None if acc is None else acc.get_rng_state()


def set_device_rng_state(state: torch.Tensor) -> None:
    """Restore what `device_rng_state()` returned (on the same kind of accelerator)."""
    acc = _accelerator()
    if acc is None:
        raise ValueError("set_device_rng_state: no accelerator on this machine (the CPU generator is "
                         "restored with torch.set_rng_state)")
    acc.set_rng_state(state)


def memory_stats() -> dict[str, float]:
    """This process's memory in bytes: allocated / max_allocated / reserved / max_reserved on the accelerator
    (the caching allocator's counters), or the resident set size of the process on the CPU (current for
    allocated and reserved, the peak for the max values)."""
    acc = _accelerator()
    if acc is not None:
        return {"allocated": float(acc.memory_allocated()), "max_allocated": float(acc.max_memory_allocated()),
                "reserved": float(acc.memory_reserved()), "max_reserved": float(acc.max_memory_reserved())}
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0   # KiB on Linux
    try:
        with open("/proc/self/statm") as f:
            current = float(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        current = peak
    peak = max(peak, current)      # the kernel updates its high-water mark lazily
    return {"allocated": current, "max_allocated": peak, "reserved": current, "max_reserved": peak}


def pin_memory_available() -> bool:
    """Whether data loaders should pin host memory (only useful, and only possible, with an accelerator)."""
    return not detect_platform().is_cpu


def device_count() -> int:
    """Accelerators visible to this process (0 on the CPU)."""
    acc = _accelerator()
    return 0 if acc is None else int(acc.device_count())


def check_ranks_per_node(local_world_size: int, devices: int, device_type: str) -> None:
    """More ranks on a node than accelerators would make two ranks share one device, where NCCL/HCCL
    collectives between them hang: refuse it up front. CPU ranks (gloo) may share the host freely."""
    from mindspeed_llm.errors import UserError

    if device_type == "cpu" or local_world_size <= devices:
        return
    raise UserError(f"torchrun --nproc_per_node {local_world_size} starts more processes on this node than its "
                    f"{devices} {device_type} device(s); launch at most --nproc_per_node {devices} (one process "
                    f"per device)")


def resolve_backend(requested: Optional[str]) -> str:
    """The collective backend to use for `--distributed-backend requested` on this platform.

    nccl/hccl on a machine without that accelerator falls back to gloo with a one-line notice, so GPU recipes
    run unchanged on CPU; nccl on an NPU becomes hccl (MindSpeed recipes say nccl).
    """
    plat = detect_platform()
    if requested in (None, "", plat.backend):
        return plat.backend
    if requested not in ("nccl", "hccl", "gloo", "mpi"):
        raise UserError(f"--distributed-backend {requested!r} is not one of nccl, hccl, gloo, mpi")
    if requested in ("gloo", "mpi"):
        return requested
    notice(f"--distributed-backend {requested} is not available on {plat.device_type}; using {plat.backend}")
    return plat.backend


# --------------------------------------------------------------------------------------------------------------
# megatron-core's optimizer without Apex / Transformer Engine
# --------------------------------------------------------------------------------------------------------------

_FUSED_ADAM_DEVICES = ("cuda", "cpu")     # where torch ships a fused Adam/AdamW kernel


def _foreach_l2_norm(chunk_size: int, noop_flag: Any, tensor_lists: list, per_tensor: bool, *args: Any):
    """Apex `multi_tensor_l2norm` on torch's foreach norm: one launch per device and dtype, the result left on the
    device (megatron-core's fallback takes one norm per tensor, reads the total to the host and re-creates it on
    "cuda")."""
    tensors = [t for group in tensor_lists for t in group]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32, device=current_device()), None
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def _foreach_scale(chunk_size: int, noop_flag: Any, tensor_lists: list, scale: float) -> None:
    """Apex `multi_tensor_scale` (dst = src * scale) on torch's foreach ops."""
    src, dst = tensor_lists[0], tensor_lists[1]
    if all(a is b for a, b in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def compiled_fusions_supported() -> bool:
    """Whether megatron-core's fused elementwise kernels (built with `torch.compile`) may be used: on CUDA and CPU;
    not on Ascend, where they have not been verified (MindSpeed swaps in its own NPU kernels there)."""
    return detect_platform().device_type in ("cuda", "cpu")


def adapt_megatron_optimizer(optimizer: Any) -> None:
    """Where megatron-core fell back to torch (no Apex/TE): grad norms and scaling through torch's foreach kernels,
    and Adam/AdamW through torch's fused kernel on devices that have one (one launch for all parameters instead of
    a per-tensor loop). Same update, fewer kernels; loading a checkpoint keeps the fused kernel."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mc_optimizer

    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = _foreach_l2_norm
    for module in (clip_grads, mc_optimizer):
        if module.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = _foreach_scale
    if detect_platform().device_type not in _FUSED_ADAM_DEVICES:
        return
    for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(wrapper, "optimizer", None)
        if type(inner) in (torch.optim.Adam, torch.optim.AdamW):
            _use_fused_kernel(inner)


def _use_fused_kernel(opt: torch.optim.Optimizer) -> None:
    def fused(groups: list) -> None:
        for group in groups:
            group.update(fused=True, foreach=False)

    fused(opt.param_groups)
    # Saved param groups replace these on load; they must say fused too, so the step counters land on the device.
    opt.register_load_state_dict_pre_hook(lambda _opt, state: fused(state["param_groups"]))


# --------------------------------------------------------------------------------------------------------------
# megatron-core's gradient-accumulation fusion without Apex
# --------------------------------------------------------------------------------------------------------------

def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """Apex `wgrad_gemm_accum_fp32`: main_grad (fp32) += grad_output^T @ total_input as one GEMM, so the weight
    gradient is never written out on its own and DDP's hook has nothing left to add. bf16/fp16 inputs accumulate
    in fp32 inside the GEMM where torch has that kernel (CUDA); elsewhere the product is formed in the inputs' dtype
    and added, as the unfused path does."""
    if total_input.dtype == main_grad.dtype:
        main_grad.addmm_(grad_output.t(), total_input)
    elif _fp32_accumulating_gemm(main_grad.device, total_input.dtype):
        torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=main_grad.dtype, out=main_grad)
    else:
        main_grad.add_(grad_output.t() @ total_input)


def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """Apex `wgrad_gemm_accum_fp16`: the same with bf16/fp16 main grads (DDP without --grad-reduce-in-fp32)."""
    main_grad.addmm_(grad_output.t().to(main_grad.dtype), total_input.to(main_grad.dtype))


@functools.lru_cache(maxsize=None)
def _fp32_accumulating_gemm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `addmm(out_dtype=float32)` runs for `dtype` on `device` and accumulates in place (checked once on
    small exact values, so a kernel that is missing or mishandles the aliased output falls back)."""
    g = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 4.0]], dtype=dtype, device=device)
    x = torch.tensor([[2.0, 1.0, 0.0], [-1.0, 0.5, 3.0], [1.0, 1.0, 1.0]], dtype=dtype, device=device)
    acc = torch.ones(2, 3, dtype=torch.float32, device=device)
    try:
        torch.addmm(acc, g.t(), x, out_dtype=torch.float32, out=acc)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return bool(torch.equal(acc, 1 + g.float().t() @ x.float()))


def adapt_megatron_grad_accum_fusion() -> None:
    """Let megatron-core's linear layers take `gradient_accumulation_fusion` without Apex: its CUDA extension is
    replaced by the two kernels above (Apex, when installed, is kept). Idempotent."""
    from megatron.core.tensor_parallel import layers

    if layers._grad_accum_fusion_available:
        return
    layers.fused_weight_gradient_mlp_cuda = types.SimpleNamespace(wgrad_gemm_accum_fp32=wgrad_gemm_accum_fp32,
                                                                  wgrad_gemm_accum_fp16=wgrad_gemm_accum_fp16)
    layers._grad_accum_fusion_available = True


def adapt_megatron_moe() -> None:
    """megatron-core 0.16.1's MoE router calls `moe_utils.te_general_gemm`, which that module defines only when
    Transformer Engine imports (a NameError on every device without TE, GPUs included): define it as None so the
    router takes its torch matmul; the alltoall dispatcher's split sizes as lists of ints; and GroupedMLP without
    the grouped_gemm package (`adapt_megatron_grouped_mlp`). Idempotent; TE's kernel is kept when it exists."""
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    adapt_megatron_grouped_mlp()
    # The alltoall dispatcher passes its split sizes as tensors / numpy arrays, which gloo's all_to_all_single
    # binding rejects (TypeError); every backend takes them as lists of ints.
    forward = mappings._AllToAll.forward
    if not getattr(forward, "__mindspeed_int_splits__", False):
        def int_splits(ctx, group, input_, output_split_sizes, input_split_sizes):
            return forward(ctx, group, input_, _int_list(output_split_sizes), _int_list(input_split_sizes))

        int_splits.__mindspeed_int_splits__ = True
        mappings._AllToAll.forward = staticmethod(int_splits)


def adapt_megatron_grouped_mlp() -> None:
    """Let megatron-core's GroupedMLP (`--moe-grouped-gemm`: `weight1`/`weight2` parameters, MindSpeed's grouped
    layout) run without the `grouped_gemm` package: its `gg.ops.gmm` becomes `grouped_gemm` below, and its bf16
    assertion, which is that package's kernel limit, is lifted for each GroupedMLP (its config copy says bf16; no
    other GroupedMLP code reads the field). Idempotent."""
    from megatron.core.transformer.moe import experts
    from megatron.core.transformer.moe import grouped_gemm_util as gg

    if gg.grouped_gemm is None and gg.ops is None:
        gg.ops = types.SimpleNamespace(gmm=grouped_gemm)
        gg.assert_grouped_gemm_is_available = lambda: None
    init = experts.GroupedMLP.__init__
    if getattr(init, "__mindspeed_any_dtype__", False):
        return

    @functools.wraps(init)
    def any_dtype_init(self, num_local_experts, config, *args, **kwargs):
        init(self, num_local_experts, config, *args, **kwargs)
        if not config.bf16 and gg.ops.gmm is grouped_gemm:
            self.config = copy.copy(config)
            self.config.bf16 = True

    any_dtype_init.__mindspeed_any_dtype__ = True
    experts.GroupedMLP.__init__ = any_dtype_init


def grouped_gemm(a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, trans_b: bool = False) -> torch.Tensor:
    """`grouped_gemm.ops.gmm`: rows `a[offset_e : offset_e + batch_sizes[e]]` times `b[e]` (transposed with
    `trans_b`) for each expert e, concatenated. One `torch._grouped_mm` kernel where the device runs it for this
    dtype (recent CUDA), else one matmul per expert."""
    if trans_b:
        b = b.transpose(1, 2)
    kernel = _grouped_mm_runs(a.device, a.dtype)
    if kernel and _grouped_mm_aligned(a, b):
        offsets = batch_sizes.to(device=a.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return torch._grouped_mm(a, b, offs=offsets)
    why = "its rows are not 16-byte aligned" if kernel else f"{a.device.type} has no grouped GEMM kernel for {a.dtype}"
    _notice_once("grouped-gemm-loop", f"--moe-grouped-gemm: {why}; the local experts run one matmul each "
                                      f"(same results)")
    rows = a.split(_int_list(batch_sizes))
    return torch.cat([x @ w for x, w in zip(rows, b.unbind(0))])


def _grouped_mm_aligned(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch._grouped_mm needs 16-byte aligned row strides of both operands."""
    return all(n * a.element_size() % 16 == 0 for n in (a.shape[1], b.shape[2]))


@functools.lru_cache(maxsize=None)
def _grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs forward and backward for `dtype` on `device` and gives the per-expert
    matmuls (checked once on small exact values, including an expert with no rows). CUDA only: the CPU kernel
    has no backward."""
    if device.type != "cuda" or not hasattr(torch, "_grouped_mm"):
        return False
    a = torch.arange(48, dtype=torch.float32, device=device).reshape(6, 8).remainder(5).to(dtype).requires_grad_()
    b = torch.arange(192, dtype=torch.float32, device=device).reshape(3, 8, 8).remainder(3).to(dtype).requires_grad_()
    sizes = [2, 0, 4]
    try:
        # the first call may come from a no-grad (generation) or autocast region
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            out = torch._grouped_mm(a, b, offs=torch.tensor([2, 2, 6], dtype=torch.int32, device=device))
            out.sum().backward()
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    want = torch.cat([x.float() @ w.float() for x, w in zip(a.detach().split(sizes), b.detach().unbind(0))])
    return bool(torch.equal(out.detach().float(), want)) and a.grad is not None and b.grad is not None


_NOTICED: set = set()


def _notice_once(key: str, msg: str) -> None:
    if key not in _NOTICED:
        _NOTICED.add(key)
        notice(msg)


def _int_list(sizes: Any) -> Optional[list[int]]:
    return None if sizes is None else [int(n) for n in (sizes.tolist() if hasattr(sizes, "tolist") else sizes)]


# --------------------------------------------------------------------------------------------------------------
# CPU adaptation of megatron-core's CUDA assumptions
# --------------------------------------------------------------------------------------------------------------

def cpu_adapted() -> bool:
    return _CPU_ADAPTED


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


def _redirect_device(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)      # staging for a host-to-device copy that does not happen here
        return fn(*args, **kwargs)

    wrapper.__mindspeed_cpu__ = True
    return wrapper


class _NullStream:
    """Stands in for torch.cuda.Stream / Event on CPU: every operation is synchronous already."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


_CUDA_TYPE_NAMES = {torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
                    torch.bfloat16: "torch.cuda.BFloat16Tensor"}

_FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint", "randperm",
              "empty_strided", "linspace", "as_tensor", "zeros_like", "ones_like", "empty_like", "full_like")


class _CpuTorch(types.ModuleType):
    """`torch` as megatron-core modules see it on CPU: tensor factories map `device="cuda"` to the CPU.

    Installed as the `torch` global of megatron-core's modules only, so other libraries (transformers builds
    models under a meta-device context) keep the real factories.
    """

    def __init__(self):
        super().__init__("torch")
        self.__dict__.update({name: _redirect_device(getattr(torch, name)) for name in _FACTORIES
                              if hasattr(torch, name)})

    def __getattr__(self, name: str):
        return getattr(torch, name)


# megatron-core modules that allocate with device="cuda" literals (imported so their globals can be rerouted).
_MEGATRON_MODULES = (
    "megatron.core.utils", "megatron.core.rerun_state_machine", "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.utils", "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.tensor_parallel.data", "megatron.core.tensor_parallel.layers", "megatron.core.transformer.utils",
    "megatron.core.optimizer.optimizer", "megatron.core.optimizer.clip_grads", "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.distrib_optimizer", "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads", "megatron.core.models.gpt.gpt_model",
    "megatron.core.transformer.moe.moe_utils", "megatron.core.models.common.embeddings.rope_utils",
)


def _route_megatron_factories_to_cpu() -> None:
    import importlib

    for name in _MEGATRON_MODULES:
        try:
            importlib.import_module(name)
        except Exception:       # optional pieces (e.g. MoE utils needing extra packages) may not import
            pass
    proxy = _CpuTorch()
    for name, mod in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(mod, "torch", None) is torch:
            mod.torch = proxy


class _QuietForkWarning(logging.Filter):
    """On CPU the tracked "CUDA" RNG *is* the CPU generator, so megatron's check that the CPU RNG was left alone
    inside `fork()` always fires; drop that one message."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def adapt_megatron_for_cpu() -> None:
    """Redirect megatron-core's CUDA calls to the CPU. Idempotent; never call it when an accelerator is used.

    What megatron-core 0.16.1 needs for GPTModel forward/backward at TP/PP, the pipeline schedules, DDP and
    its optimizers on CPU with gloo:
      * `torch.cuda.current_device()` -> "cpu"; `torch.cuda.synchronize`, streams and events -> no-ops;
      * tensor factories called by megatron-core with `device="cuda"` (the schedules allocate on "cuda") ->
        CPU (only megatron-core's own modules see the rerouted factories), and `Tensor.cuda()` -> the tensor;
      * the model-parallel RNG tracker's CUDA generator state -> the CPU generator state;
      * `Tensor.type()` with no argument reports the `torch.cuda.*Tensor` name megatron's optimizers and grad
        clipping compare against as strings.
    """
    global _CPU_ADAPTED
    if _CPU_ADAPTED:
        return
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = lambda *a, **k: None
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.set_device = lambda *a, **k: None
    cuda.device_count = lambda: 0
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None   # torch.manual_seed seeds the CPU generator and then calls this
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.max_memory_reserved = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None

    _route_megatron_factories_to_cpu()

    orig_type = torch.Tensor.type

    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            return _CUDA_TYPE_NAMES.get(self.dtype) or orig_type(self)
        return orig_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = tensor_type
    torch.Tensor.cuda = lambda self, *a, **k: self

    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    logging.getLogger(mp_random.__name__).addFilter(_QuietForkWarning())
    _CPU_ADAPTED = True


# --------------------------------------------------------------------------------------------------------------
# torch.distributed + megatron parallel state
# --------------------------------------------------------------------------------------------------------------

def init_distributed(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                     virtual_pipeline_model_parallel_size: Optional[int] = None, *,
                     backend: Optional[str] = None, seed: int = 1234, timeout_minutes: int = 30,
                     context_parallel_size: int = 1, expert_model_parallel_size: int = 1,
                     ulysses_degree_in_cp: Optional[int] = None,
                     expert_tensor_parallel_size: Optional[int] = None) -> Platform:
    """Initialise torch.distributed from the torchrun environment and megatron-core's parallel state.

    Works without torchrun too (a world of one). Applies the CPU adaptation when no accelerator is present,
    binds the rank to its local accelerator otherwise, and seeds megatron's model-parallel RNG tracker.
    Calling it again with different sizes re-creates the parallel groups (the process group is kept).
    `ulysses_degree_in_cp` (hybrid_cp_algo) also splits the CP groups into Ulysses and ring groups.
    """
    from megatron.core import parallel_state, tensor_parallel

    plat = detect_platform()
    if plat.is_cpu:
        adapt_megatron_for_cpu()
    else:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        check_ranks_per_node(local_world, device_count(), plat.device_type)
        # Object collectives (broadcast_object_list, all_gather_object) stage through the current device:
        # binding it here is what lets them run on NCCL/HCCL.
        getattr(torch, plat.device_type).set_device(current_device())
    be = resolve_backend(backend)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        torch.distributed.init_process_group(backend=be, world_size=world, rank=int(os.environ.get("RANK", "0")),
                                             timeout=datetime.timedelta(minutes=timeout_minutes))
    world = torch.distributed.get_world_size()
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size * context_parallel_size
    if world % model_parallel:
        raise UserError(f"world size {world} is not divisible by --tensor-model-parallel-size "
                         f"{tensor_model_parallel_size} x --pipeline-model-parallel-size "
                         f"{pipeline_model_parallel_size} x --context-parallel-size {context_parallel_size}; "
                         f"launch a multiple of {model_parallel} processes")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    from mindspeed_llm.models.context_parallel import build_hybrid_cp_groups   # the models import this module

    build_hybrid_cp_groups(ulysses_degree_in_cp if context_parallel_size > 1 else None)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    return plat


def destroy_distributed() -> None:
    """Tear down megatron's parallel groups and the process group (safe to call when neither exists)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
