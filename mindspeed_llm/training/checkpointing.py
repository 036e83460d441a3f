"""Training checkpoints in the conversion layout (`--ckpt-format torch`), with optimizer, scheduler, RNG state
and consumed samples, so that a run resumed without `--finetune` continues exactly.

    SAVE/iter_0000004/mp_rank_TT[_PPP]/model_optim_rng.pt   written by the DP-rank-0 rank of each TP/PP slot
    SAVE/iter_0000004/mp_rank_TT[_PPP]/distrib_optim.pt     with --use-distributed-optimizer (gathered over DP)
    SAVE/latest_checkpointed_iteration.txt                   replaced last

Every rank writes into one temporary iteration directory; only when all of them succeeded does rank 0 rename
it into place and then replace the tracker, so a failed save (disk full) leaves the previous checkpoint valid.
"""
from __future__ import annotations

import argparse
import copy
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from mindspeed_llm.errors import UserError

DISTRIB_OPTIM = "distrib_optim.pt"


def _print0(msg: str) -> None:
    if torch.distributed.get_rank() == 0:
        print(msg, flush=True)


def rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state(),
             "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if torch.cuda.is_available() and "cuda_rng_state" in state:
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def _rank_dir() -> str:
    from megatron.core import parallel_state as ps

    from mindspeed_llm.checkpoint import layout

    return layout.rank_dir_name(ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                                ps.get_pipeline_model_parallel_world_size())


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
    """`load_parameter_state` copies every per-parameter state key from the file, which has no "step" for
    torch Adam: set the step aside during the copy and restore the saved count afterwards."""
    inners = _inner_optimizers(optimizer)
    for inner in inners:
        for st in inner.state.values():
            st.pop("step", None)
    optimizer.load_parameter_state(path)
    for inner, step in zip(inners, steps):
        if step is not None:
            for st in inner.state.values():
                st["step"] = torch.tensor(step, dtype=torch.float32)


def _all_ok(ok: bool) -> bool:
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
    torch.distributed.all_reduce(flag)
    return int(flag.item()) == 0


def save_checkpoint(args: argparse.Namespace, iteration: int, model: list, optimizer, scheduler,
                    consumed_samples: int) -> None:
    """Collective: every rank calls it. Raises UserError (on every rank) if any rank failed to write."""
    from megatron.core import parallel_state as ps

    from mindspeed_llm.checkpoint import layout
    from mindspeed_llm.training.model_setup import unwrap

    save_dir = Path(args.save)
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
    writer = ps.get_data_parallel_rank() == 0
    rank_dir = tmp / _rank_dir()
    ok = True
    try:
        if writer:
            saved_args = copy.copy(args)
            saved_args.consumed_train_samples = consumed_samples
            saved_args.iteration = iteration
            models = {key: unwrap(m).state_dict() for key, m in zip(layout.model_keys(len(model)), model)}
            state = layout.checkpoint_state(saved_args, models, iteration)
            state["consumed_train_samples"] = consumed_samples
            if not args.no_save_optim:
                state["optimizer"] = optimizer.state_dict()
                state["opt_param_scheduler"] = scheduler.state_dict()
                if args.use_distributed_optimizer:
                    state["optimizer_steps"] = adam_steps(optimizer)
            if not args.no_save_rng:
                state["rng_state"] = [rng_state()]
            layout.save_rank_file(tmp, rank_dir.name, state)
            del state, models
    except (OSError, RuntimeError) as exc:
        ok, error = False, f"rank {torch.distributed.get_rank()}: {exc}"
    if args.use_distributed_optimizer and not args.no_save_optim and _all_ok(ok):
        try:
            rank_dir.mkdir(parents=True, exist_ok=True)
            optimizer.save_parameter_state(str(rank_dir / DISTRIB_OPTIM))   # gathers over DP; DP rank 0 writes
        except (OSError, RuntimeError) as exc:
            ok, error = False, f"rank {torch.distributed.get_rank()}: {exc}"
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


def load_model(args: argparse.Namespace, chunks: list) -> Loaded:
    """Load weights into this rank's unwrapped chunks (before DDP/optimizer exist, so the optimizer's fp32
    main params start from these weights). Decides whether the run resumes or starts a fine-tune."""
    from megatron.core import parallel_state as ps

    from mindspeed_llm.checkpoint import layout
    from mindspeed_llm.checkpoint.load import load_checkpoint

    if not args.load:
        _print0("no --load given: training starts from randomly initialised weights")
        return Loaded(None)
    load_dir = Path(args.load)
    if not (load_dir / layout.TRACKER).is_file():
        if args.exit_on_missing_checkpoint:
            raise UserError(f"--load {load_dir}: no {layout.TRACKER} there (--exit-on-missing-checkpoint)")
        if any(load_dir.glob("*.safetensors")):
            raise UserError(f"--load {load_dir} is a Hugging Face model directory; add --enable-hf2mg-convert "
                            f"or convert it first with convert_ckpt.py")
        _print0(f"WARNING: --load {load_dir} holds no {layout.TRACKER}; training starts from random weights")
        return Loaded(None)
    from mindspeed_llm.models.resolve import MODEL_ARG_KEYS

    # The resolved model (`resolve.record_model` wrote it into args) must be the one each rank file was saved with.
    expected = {key: getattr(args, key, None) for key in MODEL_ARG_KEYS}
    state = load_checkpoint(chunks, load_dir, expected=expected, strict=not args.load_checkpoint_loosely)
    release = str(layout.read_tracker(load_dir)) == "release"
    converted = "optimizer" not in state and "rng_state" not in state and not args.no_load_optim
    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    iteration = int(state.get("iteration", 0))
    if args.finetune or release or converted:
        if converted and not (args.finetune or release):
            _print0(f"{load_dir} holds weights only (no optimizer state): starting a fine-tune at iteration 0")
        loaded = Loaded(state, 0, 0, False, str(load_dir))
    else:
        saved = state.get("args")
        consumed = int(state.get("consumed_train_samples", getattr(saved, "consumed_train_samples", 0) or 0))
        for name in ("global_batch_size", "seed"):
            if saved is not None and getattr(saved, name, None) not in (None, getattr(args, name)):
                _print0(f"WARNING: --{name.replace('_', '-')} {getattr(args, name)} differs from the checkpoint's "
                        f"{getattr(saved, name)}; the data order will not continue exactly")
        loaded = Loaded(state, iteration, consumed, True, str(load_dir))
    _print0(f"  successfully loaded checkpoint from {load_dir} [ t {tp + 1}/{ps.get_tensor_model_parallel_world_size()}, "
            f"p {pp + 1}/{ps.get_pipeline_model_parallel_world_size()} ] at iteration {loaded.iteration}")
    return loaded


@torch.no_grad()   # fp32 runs: the optimizer's main params are the model's leaf params themselves
def load_training_state(args: argparse.Namespace, loaded: Loaded, optimizer, scheduler) -> None:
    """Optimizer, scheduler and RNG from a resumed checkpoint (collective with the distributed optimizer)."""
    from mindspeed_llm.checkpoint import layout

    if not loaded.resume or loaded.state is None:
        return
    state = loaded.state
    if not args.no_load_optim:
        if "optimizer" not in state:
            raise UserError(f"--load {loaded.load_dir}: the checkpoint has no optimizer state (saved with "
                            "--no-save-optim); pass --no-load-optim or --finetune")
        optimizer.load_state_dict(state["optimizer"])
        if args.use_distributed_optimizer:
            path = layout.iteration_dir(Path(loaded.load_dir)) / _rank_dir() / DISTRIB_OPTIM
            if not path.is_file():
                raise UserError(f"{path} is missing: the checkpoint was saved without --use-distributed-optimizer; "
                                "pass --no-load-optim or drop --use-distributed-optimizer")
            load_distributed_state(optimizer, str(path), state.get("optimizer_steps", []))
        if "opt_param_scheduler" in state:
            scheduler.load_state_dict(state["opt_param_scheduler"])
    if not args.no_load_rng and state.get("rng_state"):
        set_rng_state(state["rng_state"][0])
    loaded.state = None
