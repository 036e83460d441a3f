"""Megatron `torch`-format checkpoint layout: tracker file, iter dirs, per-rank `model_optim_rng.pt` files.

    SAVE/latest_checkpointed_iteration.txt            "1" (no newline), written last
    SAVE/iter_0000001/mp_rank_TT[_PPP]/model_optim_rng.pt
        {"args": Namespace, "checkpoint_version": 3.0, "iteration": 1, "model": {...}}   ("model0".. under VPP)

Writes are atomic: a whole iteration directory is built under a temporary name and renamed into place, and the
tracker is replaced (temp file + rename) only after that, so an interrupted write never looks complete.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from mindspeed_llm.checkpoint.errors import ConversionError

TRACKER = "latest_checkpointed_iteration.txt"
FILE_NAME = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0


def iter_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def rank_dir_name(tp_rank: int, pp_rank: int, pp_size: int, ep_rank: int = 0, ep_size: int = 1) -> str:
    name = f"mp_rank_{tp_rank:02d}"
    if pp_size > 1:
        name += f"_{pp_rank:03d}"
    if ep_size > 1:
        name += f"_{ep_rank:03d}"
    return name


def model_keys(vpp: int) -> list[str]:
    return ["model"] if vpp <= 1 else [f"model{v}" for v in range(vpp)]


def read_tracker(load_dir: Path) -> int | str:
    """The iteration the tracker names; errors say which file is missing or malformed."""
    load_dir = Path(load_dir)
    if not load_dir.is_dir():
        raise ConversionError(f"--load-dir {load_dir} is not a directory; point it at the Megatron checkpoint root "
                              f"(the folder holding {TRACKER})")
    tracker = load_dir / TRACKER
    if not tracker.is_file():
        raise ConversionError(f"{tracker} does not exist: --load-dir must be a Megatron checkpoint root (a complete "
                              f"conversion or save writes this file last)")
    text = tracker.read_text().strip()
    if text == "release":
        return text
    try:
        return int(text)
    except ValueError:
        raise ConversionError(f"{tracker} holds {text!r}, not an iteration number") from None


def iteration_dir(load_dir: Path) -> Path:
    path = Path(load_dir) / iter_dir_name(read_tracker(load_dir))
    if not path.is_dir():
        raise ConversionError(f"{Path(load_dir) / TRACKER} names {path.name}, which does not exist")
    return path


def load_rank_file(path: Path, mmap: bool = True) -> dict:
    if not path.is_file():
        raise ConversionError(f"checkpoint file {path} is missing; the checkpoint is incomplete or was saved with "
                              f"a different tensor/pipeline parallel layout")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except RuntimeError:
        return torch.load(path, map_location="cpu", weights_only=False)


def read_args(iter_dir: Path) -> argparse.Namespace:
    """`args` of a checkpoint (from rank 0's file; every rank file carries the same namespace)."""
    candidates = sorted(p for p in iter_dir.glob(f"mp_rank_*/{FILE_NAME}"))
    if not candidates:
        raise ConversionError(f"{iter_dir} holds no mp_rank_*/{FILE_NAME} files")
    state = load_rank_file(candidates[0])
    args = state.get("args")
    if args is None:
        raise ConversionError(f"{candidates[0]} has no 'args' entry; it was not written by a Megatron-style saver")
    return args


def new_iteration_dir(save_dir: Path, iteration: int) -> Path:
    """A fresh temporary directory next to the final `iter_XXXXXXX` one (same filesystem, so rename is atomic)."""
    save_dir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{iter_dir_name(iteration)}.tmp-", dir=save_dir))


def save_rank_file(tmp_iter_dir: Path, rank_dir: str, state: dict[str, Any]) -> Path:
    """torch.save one rank's dict (tensors made contiguous copies, so no parent storage is serialised)."""
    out = tmp_iter_dir / rank_dir
    out.mkdir(parents=True, exist_ok=True)
    path = out / FILE_NAME
    tmp = out / (FILE_NAME + ".tmp")
    torch.save(_own_storage(state), tmp)
    os.replace(tmp, path)
    return path


def release_freed_memory() -> None:
    """Return freed heap memory to the OS (glibc keeps freed tensor buffers < 32 MB in its heap otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _own_storage(obj):
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
            t = t.contiguous().clone()
        return t
    if isinstance(obj, dict):
        return {k: _own_storage(v) for k, v in obj.items()}
    return obj


def publish_iteration(tmp_iter_dir: Path, save_dir: Path, iteration: int) -> Path:
    """Rename the finished temporary iteration dir into place, then atomically write the tracker."""
    final = save_dir / iter_dir_name(iteration)
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=save_dir))
        os.replace(final, old / final.name)
        os.replace(tmp_iter_dir, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_iter_dir, final)
    write_tracker(save_dir, iteration)
    return final


def write_tracker(save_dir: Path, iteration: int | str) -> None:
    tmp = save_dir / (TRACKER + ".tmp")
    tmp.write_text(str(iteration))
    os.replace(tmp, save_dir / TRACKER)


def checkpoint_state(args: argparse.Namespace, models: dict[str, dict], iteration: int = 1) -> dict[str, Any]:
    return {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration, **models}


def get(args: argparse.Namespace, name: str, default: Optional[Any] = None) -> Any:
    return getattr(args, name, default)
