"""Training checkpoints in the conversion layout (`--ckpt-format torch`), with optimizer, scheduler, RNG state
and consumed samples, so that a run resumed without `--finetune` continues exactly.

    SAVE/iter_0000004/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt  written by the first (expert-)DP rank of each
                                                                 TP/PP/EP slot (_EEE: the EP rank, EP > 1)
    SAVE/iter_0000004/mp_rank_TT[_PPP][_EEE]/distrib_optim.pt    with --use-distributed-optimizer (gathered over DP)
    SAVE/latest_checkpointed_iteration.txt                   replaced last

Every rank writes into one temporary iteration directory; only when all of them succeeded does rank 0 rename
it into place and then replace the tracker, so a failed save (disk full) leaves the previous checkpoint valid.
"""
from __future__ import annotations

import errno
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from mindspeed_llm.errors import UserError
from mindspeed_llm.models import lora
from mindspeed_llm.training.run_config import RunConfig

DISTRIB_OPTIM = "distrib_optim.pt"


def _print0(msg: str) -> None:
    if torch.distributed.get_rank() == 0:
        print(msg, flush=True)


def rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    from mindspeed_llm.platform import detect_platform, device_rng_state

    np_state = np.random.get_state(legacy=False)   # numpy arrays made plain so weights_only=True loads them
    np_state["state"] = {"key": np_state["state"]["key"].tolist(), "pos": int(np_state["state"]["pos"])}
    state = {"random_rng_state": random.getstate(), "np_rng_state": np_state,
             "torch_rng_state": torch.get_rng_state(),
             "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}
    device_state = device_rng_state()
    if device_state is not None:
        # Megatron's key holds the accelerator's generator (CUDA or NPU); the device type says which.
        state["cuda_rng_state"] = device_state
        state["device_rng_type"] = detect_platform().device_type
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random_rng_state"])
    np_state = state["np_rng_state"]
    if isinstance(np_state, dict):      # ours (plain lists); Megatron-LM's is the legacy tuple with an array
        np_state = {**np_state, "state": {**np_state["state"],
                                          "key": np.asarray(np_state["state"]["key"], dtype=np.uint32)}}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch_rng_state"])
    _set_device_rng(state)
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def _set_device_rng(state: dict[str, Any]) -> None:
    """Restore the accelerator generator saved by `rng_state` when it came from the same kind of device (a save
    made on CUDA resumed on an NPU, or on the CPU, keeps this device's generator, with a notice)."""
    from mindspeed_llm.platform import detect_platform, notice, set_device_rng_state

    here = detect_platform().device_type
    saved = state.get("device_rng_type", "cuda") if "cuda_rng_state" in state else None
    if saved is None:
        return
    if saved != here:
        notice(f"the checkpoint's {saved} RNG state is not restored on {here}; random draws on the device differ "
               f"from the uninterrupted run")
        return
    set_device_rng_state(state["cuda_rng_state"])


def _rank_dir() -> str:
    from megatron.core import parallel_state as ps

    from mindspeed_llm.checkpoint import layout

    return layout.rank_dir_name(ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                                ps.get_pipeline_model_parallel_world_size(), ps.get_expert_model_parallel_rank(),
                                ps.get_expert_model_parallel_world_size())


def _inner_optimizers(optimizer) -> list:
    return [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])
            if getattr(o, "optimizer", None) is not None]


def adam_steps(optimizer) -> list[Optional[float]]:
    """torch Adam keeps its step count per parameter, which megatron's `distrib_optim.pt` does not carry;
    it is saved beside it so bias correction continues exactly (every parameter steps together)."""
    steps = []
    for inner in _inner_optimizers(optimizer):
        step = next((st["step"] for st in inner.state.values() if "step" in st), None)
        steps.append(float(step) if step is not None else None)
    return steps


def load_distributed_state(optimizer, path: str, steps: list[Optional[float]]) -> None:
    """Collective. `distrib_optim.pt` is read on DP rank 0 with `layout.load_pt` (weights_only, one-line errors
    agreed on by every rank) instead of megatron's `load_parameter_state`, whose torch.load does neither.
    Loading copies every per-parameter state key from the file, which has no "step" for torch Adam: set the step
    aside during the copy and restore the saved count afterwards."""
    from megatron.core import parallel_state as ps

    from mindspeed_llm.checkpoint import layout
    from mindspeed_llm.checkpoint.errors import ConversionError

    states, error = None, ""
    if ps.get_data_parallel_rank(with_context_parallel=True) == 0:     # the optimizer shards over DP x CP
        try:
            states = layout.load_pt(Path(path), "the distributed optimizer state written with "
                                                "--use-distributed-optimizer (a dict of parameter state)")
        except ConversionError as exc:
            error = str(exc)
    errors: list[str] = [""] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(errors, error)
    error = next((e for e in errors if e), "")
    if error:
        raise UserError(error)
    inners = _inner_optimizers(optimizer)
    for inner in inners:
        for st in inner.state.values():
            st.pop("step", None)
    chained = [o for o in getattr(optimizer, "chained_optimizers", [optimizer])
               if hasattr(o, "load_parameter_state_from_dp_zero") and not getattr(o, "is_stub_optimizer", False)]
    for idx, opt in enumerate(chained):
        # megatron's ChainedOptimizer saves one optimizer's state bare and several as a list
        opt.load_parameter_state_from_dp_zero(None if states is None else states if len(chained) == 1 else states[idx])
    for inner, step in zip(inners, steps):
        if step is not None:
            for st in inner.state.values():
                st["step"] = torch.tensor(step, dtype=torch.float32)


def _all_ok(ok: bool) -> bool:
    from mindspeed_llm.platform import device_tensor

    flag = device_tensor([0 if ok else 1], torch.int64)
    torch.distributed.all_reduce(flag)
    return int(flag.item()) == 0


@torch.no_grad()
def _weights_finite(model: list) -> bool:
    """This rank's parameters are all finite (checked before anything is written or published)."""
    return all(bool(torch.isfinite(p).all()) for m in model for p in m.parameters() if p.is_floating_point())


def save_checkpoint(run: RunConfig, iteration: int, model: list, optimizer, scheduler, consumed_samples: int,
                    recorded: Optional[dict[str, Any]] = None) -> None:
    """Collective: every rank calls it. Raises UserError (on every rank) if any rank failed to write. The saved
    args are `run.saved_args` with `recorded` (what the run found at start-up, e.g. the LoRA base)."""
    from mindspeed_llm.checkpoint import layout
    from mindspeed_llm.training.model_setup import unwrap

    save_dir = Path(run.checkpoint.save)
    if not _all_ok(_weights_finite(model)):
        raise UserError(f"the weights hold NaN/inf at iteration {iteration}; the checkpoint is not saved to "
                        f"--save {save_dir} (the last one there stays the latest). Lower --lr or pass --skip-nan")
    _print0(f"saving checkpoint at iteration {iteration:7d} to {save_dir} in torch format")
    box: list[Optional[str]] = [None]
    error = ""
    if torch.distributed.get_rank() == 0:
        try:
            box[0] = str(layout.new_iteration_dir(save_dir, iteration))
        except OSError as exc:
            error = str(exc)
    torch.distributed.broadcast_object_list(box, src=0)
    if box[0] is None:
        raise UserError(f"cannot create a checkpoint directory under --save {save_dir}" + (f": {error}" if error else ""))
    tmp = Path(box[0])
    # One writer per TP/PP/EP slot: the first rank of those that write the same file (they hold the same weights:
    # DP and CP replicas, and with --expert-tensor-parallel-size 1 the ranks of an expert-data-parallel group).
    rank_dir = tmp / _rank_dir()
    names: list[Optional[str]] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(names, rank_dir.name)
    writer = names.index(rank_dir.name) == torch.distributed.get_rank()
    ok = True
    try:
        if writer:
            saved_args = run.saved_args(**(recorded or {}), consumed_train_samples=consumed_samples,
                                        iteration=iteration)
            models = {key: (lora.trainable_state(unwrap(m)) if run.checkpoint.lora_ckpt_filter
                            else unwrap(m).state_dict())
                      for key, m in zip(layout.model_keys(len(model)), model)}
            state = layout.checkpoint_state(saved_args, models, iteration)
            state["consumed_train_samples"] = consumed_samples
            if not run.checkpoint.no_save_optim:
                state["optimizer"] = optimizer.state_dict()
                state["opt_param_scheduler"] = scheduler.state_dict()
                if run.parallel.use_distributed_optimizer:
                    state["optimizer_steps"] = adam_steps(optimizer)
            if not run.checkpoint.no_save_rng:
                state["rng_state"] = [rng_state()]
            layout.save_rank_file(tmp, rank_dir.name, state)
            del state, models
    except (OSError, RuntimeError) as exc:
        ok, error = False, _write_error(exc, rank_dir / layout.FILE_NAME)
    if run.parallel.use_distributed_optimizer and not run.checkpoint.no_save_optim and _all_ok(ok):
        try:
            rank_dir.mkdir(parents=True, exist_ok=True)
            optimizer.save_parameter_state(str(rank_dir / DISTRIB_OPTIM))   # gathers over DP; DP rank 0 writes
        except (OSError, RuntimeError) as exc:
            ok, error = False, _write_error(exc, rank_dir / DISTRIB_OPTIM)
    errors: list[str] = [""] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(errors, "" if ok else error)
    error = next((e for e in errors if e), "")
    if error:
        if torch.distributed.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        torch.distributed.barrier()
        previous = _tracker_text(save_dir)
        raise UserError(f"saving the checkpoint of iteration {iteration} to --save {save_dir} failed ({error}); "
                        f"{'the previous checkpoint (' + previous + ') is still valid' if previous else 'nothing was published'}")
    if torch.distributed.get_rank() == 0:
        layout.publish_iteration(tmp, save_dir, iteration)
    torch.distributed.barrier()
    _print0(f"  successfully saved checkpoint from iteration {iteration:7d} to {save_dir}")


def _write_error(exc: Exception, path: Path) -> str:
    """What went wrong writing `path`. torch.save reports a full disk as a bare stream-writer failure (no errno),
    so a failed write with (almost) no space left on that file system is named as such."""
    where = f"rank {torch.distributed.get_rank()} writing {path}"
    full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
    if not full:
        try:
            full = shutil.disk_usage(path.parent if path.parent.exists() else path.parent.parent).free < (1 << 20)
        except OSError:
            pass
    return f"{where}: no space left on device" if full else f"{where}: {exc}"


def _tracker_text(save_dir: Path) -> str:
    from mindspeed_llm.checkpoint import layout

    tracker = save_dir / layout.TRACKER
    return f"iteration {tracker.read_text().strip()}" if tracker.is_file() else ""


@dataclass
class Loaded:
    """What `load_model` found: the rank file's dict and where training resumes."""
    state: Optional[dict]
    iteration: int = 0
    consumed_samples: int = 0
    resume: bool = False          # optimizer/scheduler/RNG are restored (not finetune / release / converted)
    load_dir: Optional[str] = None
    recorded: dict[str, Any] = field(default_factory=dict)    # what saves record of it (the LoRA base)


def load_model(run: RunConfig, chunks: list) -> Loaded:
    """Load weights into this rank's unwrapped chunks (before DDP/optimizer exist, so the optimizer's fp32
    main params start from these weights). Decides whether the run resumes or starts a fine-tune."""
    from mindspeed_llm.checkpoint import layout
    from mindspeed_llm.checkpoint.load import load_checkpoint

    ck = run.checkpoint
    if not ck.load and run.lora is not None:
        raise UserError("--lora-target-modules: LoRA trains adapters on a base model; pass its checkpoint in --load")
    if not ck.load:
        _print0("no --load given: training starts from randomly initialised weights")
        return Loaded(None)
    load_dir = Path(ck.load)
    if not (load_dir / layout.TRACKER).is_file():
        if ck.exit_on_missing_checkpoint:
            raise UserError(f"--load {load_dir}: no {layout.TRACKER} there (--exit-on-missing-checkpoint)")
        if any(load_dir.glob("*.safetensors")):
            raise UserError(f"--load {load_dir} is a Hugging Face model directory; add --enable-hf2mg-convert "
                            f"or convert it first with convert_ckpt.py")
        if run.lora is not None:
            raise UserError(f"--load {load_dir}: no {layout.TRACKER} there; LoRA needs the base model's "
                            f"checkpoint in --load")
        _print0(f"WARNING: --load {load_dir} holds no {layout.TRACKER}; training starts from random weights")
        return Loaded(None)
    from mindspeed_llm.models.resolve import weight_args

    # The resolved model must be the one each rank file was saved with.
    expected = weight_args(run.model)
    state = load_checkpoint(chunks, load_dir, expected=expected, strict=not ck.load_checkpoint_loosely)
    # A LoRA run resumes from --load only when it holds adapters (an unfiltered LoRA save); a base model
    # (converted, or a full fine-tune with its own optimizer state) only gives the frozen weights.
    first_chunk = state.get(layout.model_keys(len(chunks))[0], {})
    weights_only = run.lora is not None and not lora.has_adapters(first_chunk)
    recorded: dict[str, Any] = {}
    if run.lora is not None:
        # Saves record the base the adapters train on (a resumed unfiltered LoRA save: the one it recorded), so
        # that merging them onto another base can be refused.
        from mindspeed_llm.checkpoint.load import base_fingerprint

        saved = state.get("args")
        recorded = ({"lora_base_load": str(load_dir), "lora_base_fingerprint": base_fingerprint(chunks, state)}
                    if weights_only else
                    {"lora_base_load": getattr(saved, "lora_base_load", None),
                     "lora_base_fingerprint": getattr(saved, "lora_base_fingerprint", None)})
    loaded = _resume_point(run, state, load_dir, weights_only)
    if ck.lora_load:
        from mindspeed_llm.checkpoint.load import load_adapters

        lora_dir = Path(ck.lora_load)
        lora_expected = {**expected, "lora_r": run.lora.r, "lora_alpha": run.lora.alpha,
                         "lora_target_modules": list(run.lora.targets)}
        loaded = _resume_point(run, load_adapters(chunks, lora_dir, expected=lora_expected), lora_dir, False)
    loaded.recorded = recorded
    return loaded


def _resume_point(run: RunConfig, state: dict, load_dir: Path, weights_only: bool) -> Loaded:
    """Where training goes on from checkpoint `state`: its iteration, samples, optimizer and RNG (a resume), or
    iteration 0 (--finetune, a release or converted checkpoint, or `weights_only`)."""
    from megatron.core import parallel_state as ps

    from mindspeed_llm.checkpoint import layout

    release = str(layout.read_tracker(load_dir)) == "release"
    # A converted checkpoint (weights only, never trained here) starts at iteration 0 even with --no-load-optim;
    # a training save always records its consumed samples.
    saved_args = state.get("args")
    trained = "consumed_train_samples" in state or layout.get(saved_args, "consumed_train_samples") is not None
    converted = "optimizer" not in state and "rng_state" not in state and not trained
    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    iteration = int(state.get("iteration", 0))
    finetune = run.checkpoint.finetune
    if finetune or release or converted or weights_only:
        if converted and not (finetune or release or weights_only):
            _print0(f"{load_dir} holds weights only (no optimizer state): starting a fine-tune at iteration 0")
        loaded = Loaded(state, 0, 0, False, str(load_dir))
    else:
        saved = state.get("args")
        consumed = int(state.get("consumed_train_samples", getattr(saved, "consumed_train_samples", 0) or 0))
        for name, ours in (("global_batch_size", run.batch.global_batch_size), ("seed", run.seed)):
            if saved is not None and getattr(saved, name, None) not in (None, ours):
                _print0(f"WARNING: --{name.replace('_', '-')} {ours} differs from the checkpoint's "
                        f"{getattr(saved, name)}; the data order will not continue exactly")
        loaded = Loaded(state, iteration, consumed, True, str(load_dir))
    _print0(f"  successfully loaded checkpoint from {load_dir} [ t {tp + 1}/{ps.get_tensor_model_parallel_world_size()}, "
            f"p {pp + 1}/{ps.get_pipeline_model_parallel_world_size()} ] at iteration {loaded.iteration}")
    return loaded


@torch.no_grad()   # fp32 runs: the optimizer's main params are the model's leaf params themselves
def load_training_state(run: RunConfig, loaded: Loaded, optimizer, scheduler) -> None:
    """Optimizer, scheduler and RNG from a resumed checkpoint (collective with the distributed optimizer)."""
    from mindspeed_llm.checkpoint import layout

    if not loaded.resume or loaded.state is None:
        return
    state = loaded.state
    if not run.checkpoint.no_load_optim:
        if "optimizer" not in state:
            raise UserError(f"--load {loaded.load_dir}: the checkpoint has no optimizer state (saved with "
                            "--no-save-optim); pass --no-load-optim or --finetune")
        optimizer.load_state_dict(state["optimizer"])
        if run.parallel.use_distributed_optimizer:
            path = layout.iteration_dir(Path(loaded.load_dir)) / _rank_dir() / DISTRIB_OPTIM
            saved_with = "optimizer_steps" in state or layout.get(state.get("args"), "use_distributed_optimizer")
            if not path.is_file() and saved_with:
                raise UserError(f"{path} is missing: the checkpoint is incomplete (it was saved with "
                                f"--use-distributed-optimizer, and this file holds that optimizer state)")
            if not path.is_file():
                raise UserError(f"{path} is missing: the checkpoint was saved without --use-distributed-optimizer; "
                                "pass --no-load-optim or drop --use-distributed-optimizer")
            load_distributed_state(optimizer, str(path), state.get("optimizer_steps", []))
        if "opt_param_scheduler" in state:
            check_scheduler(run, state["opt_param_scheduler"], scheduler, loaded.load_dir)
            scheduler.load_state_dict(state["opt_param_scheduler"])
    if not run.checkpoint.no_load_rng and state.get("rng_state"):
        set_rng_state(state["rng_state"][0])
    loaded.state = None


# OptimizerParamScheduler state keys (with the older names megatron-core still reads) -> attribute, flags.
_SCHEDULE = (
    (("max_lr", "start_lr"), "max_lr", "--lr"),
    (("min_lr",), "min_lr", "--min-lr"),
    (("lr_warmup_steps", "warmup_steps", "warmup_iter"), "lr_warmup_steps", "--lr-warmup-iters/--lr-warmup-fraction"),
    (("lr_decay_steps", "decay_steps", "end_iter"), "lr_decay_steps", "--lr-decay-iters/--train-iters"),
    (("lr_decay_style", "decay_style"), "lr_decay_style", "--lr-decay-style"),
    (("start_wd",), "start_wd", "--start-weight-decay"),
    (("end_wd",), "end_wd", "--end-weight-decay"),
    (("wd_incr_steps",), "wd_incr_steps", "--train-iters"),
    (("wd_incr_style",), "wd_incr_style", "--weight-decay-incr-style"),
)


def check_scheduler(run: RunConfig, saved: dict, scheduler, load_dir: Optional[str]) -> None:
    """A resumed run whose LR/WD schedule differs from the checkpoint's must say which one wins
    (megatron-core would stop on a bare assertion)."""
    if run.optim.override_opt_param_scheduler or run.optim.use_checkpoint_opt_param_scheduler:
        return
    diffs = []
    for keys, attr, flags in _SCHEDULE:
        stored = next((saved[k] for k in keys if k in saved), None)
        ours = getattr(scheduler, attr)
        if stored is not None and stored != ours:
            if attr.endswith("_steps"):      # kept in samples; iterations are what the flags say
                gbs = run.batch.global_batch_size
                stored, ours = f"{stored / gbs:g} iterations", f"{ours / gbs:g} iterations"
            diffs.append(f"{attr} {stored} in the checkpoint, {ours} from {flags}")
    if diffs:
        raise UserError(f"--load {load_dir}: the learning-rate schedule differs from the checkpoint's "
                        f"({'; '.join(diffs)}); pass --override-opt-param-scheduler to use the new flags' schedule "
                        f"or --use-checkpoint-opt-param-scheduler to keep the checkpoint's")
