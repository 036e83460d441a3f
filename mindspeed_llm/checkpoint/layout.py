"""Megatron `torch`-format checkpoint layout: tracker file, iter dirs, per-rank `model_optim_rng.pt` files.

    SAVE/latest_checkpointed_iteration.txt            "1" (no newline), written last
    SAVE/iter_0000001/mp_rank_TT[_PPP]/model_optim_rng.pt
        {"args": {...}, "checkpoint_version": 3.0, "iteration": 1, "model": {...}}   ("model0".. under VPP)

Writes are atomic: a whole iteration directory is built under a temporary name and renamed into place, and the
tracker is replaced (temp file + rename) only after that, so an interrupted write never looks complete.

Reads never run code from the file: `torch.load(weights_only=True)` with a short allow-list for what
Megatron-LM / MindSpeed-LLM checkpoints hold besides tensors (an `argparse.Namespace` of args, numpy RNG arrays).
We save `args` as a plain dict; `load_rank_file` hands it back as a Namespace either way.
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
import re
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


def rank_pairs(tp: int, ep: int, etp: int) -> list[tuple[int, int]]:
    """The (TP rank, EP rank) files of one pipeline stage. With expert-TP 1 under TP > 1 only the pairs that
    coexist in a megatron-core replica (rank r is TP rank r % TP and EP rank r % EP) exist, as MindSpeed writes
    them: (t, t % EP) when EP divides TP, (e % TP, e) when TP divides EP."""
    if etp == tp:
        return [(t, e) for t in range(tp) for e in range(ep)]
    return sorted({(r % tp, r % ep) for r in range(math.lcm(tp, ep))})


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
    text = tracker.read_bytes()[:64].decode("utf-8", errors="replace").strip()
    if text == "release":
        return text
    if re.fullmatch(r"[0-9]{1,9}", text):
        return int(text)
    raise ConversionError(f"{tracker} holds {text[:32]!r}, not an iteration number (expected digits such as "
                          f"'1000' or 'release'); rewrite it with the iteration of a complete iter_* directory")


_FELL_BACK: set = set()


def iteration_dir(load_dir: Path) -> Path:
    """The iteration directory the tracker names. If a re-save of that iteration was interrupted between its
    renames, the previous copy set aside under `.iter_N.old-*` is used, else the newest complete iteration
    (with a one-line notice)."""
    load_dir = Path(load_dir)
    path = load_dir / iter_dir_name(read_tracker(load_dir))
    if path.is_dir():
        return path
    aside = sorted(load_dir.glob(f".{path.name}.old-*/{path.name}"))
    others = sorted(load_dir.glob("iter_[0-9]*"), key=lambda p: p.name)
    fallback = aside[-1] if aside else (others[-1] if others else None)
    if fallback is None or not fallback.is_dir():
        raise ConversionError(f"{load_dir / TRACKER} names {path.name}, which does not exist, and {load_dir} holds "
                              f"no other complete iteration directory")
    if str(load_dir) not in _FELL_BACK:
        from mindspeed_llm.platform import notice

        _FELL_BACK.add(str(load_dir))
        notice(f"{load_dir / TRACKER} names {path.name}, which does not exist (a save was interrupted); "
               f"loading {fallback.relative_to(load_dir)} instead")
    return fallback


def _allowed_globals() -> list:
    """What a Megatron-style checkpoint may hold besides tensors and plain types: the args Namespace, numpy RNG
    arrays (under their numpy 1 and numpy 2 module names) and megatron-core's ModelType enum."""
    import numpy as np

    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    allowed: list = [argparse.Namespace, np.ndarray, np.dtype,
                     (reconstruct, "numpy.core.multiarray._reconstruct"),
                     (reconstruct, "numpy._core.multiarray._reconstruct")]
    allowed += sorted({type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64)} - {np.dtype}, key=str)
    try:
        from megatron.core.enums import ModelType

        allowed.append(ModelType)
    except ImportError:
        pass
    return allowed


def load_pt(path: Path, what: str = "a torch.save checkpoint file", mmap: bool = False) -> Any:
    """torch.load with weights_only=True and the allow-list; a damaged or unsafe file is one ConversionError
    naming it. Nothing in the file is executed."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path} is missing; expected {what}")
    if path.stat().st_size == 0:
        raise ConversionError(f"{path} is empty; expected {what} (the save was interrupted or the file was "
                              f"truncated): re-save or re-convert the checkpoint")
    with torch.serialization.safe_globals(_allowed_globals()):
        try:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError:
                if not mmap:
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)   # legacy (non-zip) format
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
            found = re.search(r"GLOBAL ([\w.]+)", str(exc)) if isinstance(exc, pickle.UnpicklingError) else None
            if found:
                raise ConversionError(f"{path} refers to {found.group(1)}, which is not allowed in a checkpoint "
                                      f"(only tensors, plain values, argparse.Namespace and numpy arrays are); it "
                                      f"was not loaded, since unpickling it could run code") from None
            reason = ("not a torch.save archive" if isinstance(exc, pickle.UnpicklingError) else
                      str(exc).strip().splitlines()[0].split(". ")[0][:120] if str(exc).strip() else
                      type(exc).__name__)
            raise ConversionError(f"{path} is damaged or truncated ({reason}); expected {what}: re-save or "
                                  f"re-convert the checkpoint") from None


def load_rank_file(path: Path, mmap: bool = True) -> dict:
    """One rank's `model_optim_rng.pt`, its `args` as an argparse.Namespace (saved as a dict or a Namespace)."""
    if not path.is_file():
        raise ConversionError(f"checkpoint file {path} is missing; the checkpoint is incomplete or was saved with "
                              f"a different tensor/pipeline parallel layout")
    state = load_pt(path, f"a Megatron {FILE_NAME} (a dict with 'args' and 'model')", mmap=mmap)
    if not isinstance(state, dict):
        raise ConversionError(f"{path} holds a {type(state).__name__}, not the dict a Megatron {FILE_NAME} holds")
    if isinstance(state.get("args"), dict):
        state["args"] = argparse.Namespace(**state["args"])
    return state


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
    """Rename the finished temporary iteration dir into place, then atomically write the tracker.

    Re-saving an existing iteration moves the old copy aside first; a kill between the two renames leaves the
    tracker naming a missing directory, and `iteration_dir` then loads the copy set aside. Temporaries left by
    interrupted saves are removed once the new tracker is in place."""
    final = save_dir / iter_dir_name(iteration)
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=save_dir))
        os.replace(final, old / final.name)
        os.replace(tmp_iter_dir, final)
    else:
        os.replace(tmp_iter_dir, final)
    write_tracker(save_dir, iteration)
    remove_stale_temporaries(save_dir)
    return final


def remove_stale_temporaries(save_dir: Path) -> None:
    """`.iter_*.tmp-*` / `.iter_*.old-*` left by interrupted saves (call only with a valid tracker in place); an
    iteration set aside whose replacement never arrived is moved back to its name instead of being deleted."""
    for old in save_dir.glob(".iter_*.old-*"):
        for inner in old.glob("iter_*"):
            if inner.is_dir() and not (save_dir / inner.name).exists():
                os.replace(inner, save_dir / inner.name)
    for stale in list(save_dir.glob(".iter_*.tmp-*")) + list(save_dir.glob(".iter_*.old-*")):
        shutil.rmtree(stale, ignore_errors=True)


def write_tracker(save_dir: Path, iteration: int | str) -> None:
    tmp = save_dir / (TRACKER + ".tmp")
    tmp.write_text(str(iteration))
    os.replace(tmp, save_dir / TRACKER)


def checkpoint_state(args: argparse.Namespace | dict, models: dict[str, dict], iteration: int = 1) -> dict[str, Any]:
    return {"args": plain_args(args), "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration, **models}


def plain_args(args: argparse.Namespace | dict) -> dict[str, Any]:
    """The args as a dict of plain values (loadable with weights_only=True): str/int/float/bool/None, lists,
    dicts and torch dtypes kept; anything else (paths, callables, enums) stored as its string."""
    return {str(k): _plain(v) for k, v in (vars(args) if isinstance(args, argparse.Namespace) else args).items()}


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int, float, torch.dtype)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def get(args: argparse.Namespace | dict | None, name: str, default: Optional[Any] = None) -> Any:
    """One saved-args field, whether the args are a Namespace (Megatron-LM) or a dict (ours)."""
    if isinstance(args, dict):
        return args.get(name, default)
    return getattr(args, name, default)
