"""Load a Megatron checkpoint into this rank's GPTModel chunks (training / inference / verification)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional, Sequence

from mindspeed_llm.checkpoint import layout
from mindspeed_llm.checkpoint.errors import ConversionError

# Saved-args fields that must agree with the model being loaded (flag named in the error).
_CHECKED = {
    "tensor_model_parallel_size": "--tensor-model-parallel-size",
    "pipeline_model_parallel_size": "--pipeline-model-parallel-size",
    "num_layers": "--num-layers",
    "hidden_size": "--hidden-size",
    "num_attention_heads": "--num-attention-heads",
    "num_layers_per_virtual_pipeline_stage": "--num-layers-per-virtual-pipeline-stage",
    "num_layer_list": "--num-layer-list",
    "untie_embeddings_and_output_weights": "--untie-embeddings-and-output-weights",
}


def saved_args(load_dir: str | Path) -> tuple[argparse.Namespace, str]:
    """(saved args, the rank file they were read from) of the checkpoint root `load_dir`."""
    iter_dir = layout.iteration_dir(Path(load_dir))
    args = layout.read_args(iter_dir)
    return args, str(sorted(iter_dir.glob(f"mp_rank_*/{layout.FILE_NAME}"))[0])


def check_args(saved: argparse.Namespace, expected: dict[str, Any], source: str) -> None:
    """Raise one line naming the first flag whose value differs from the checkpoint's saved args. Model-shape
    keys (`models.resolve.MODEL_ARG_KEYS`) are compared where the checkpoint records them."""
    from mindspeed_llm.models.resolve import MODEL_ARG_KEYS, flag_name, same

    for key, value in expected.items():
        if value is None or key not in _CHECKED and not hasattr(saved, key):
            continue
        stored = getattr(saved, key, None)
        if key in MODEL_ARG_KEYS and key not in _CHECKED:
            if stored is not None and not same(value, stored):
                raise ConversionError(f"{flag_name(key)} {value} disagrees with {source}, which was saved with "
                                      f"{stored}; the model built does not match the checkpoint")
            continue
        if key == "num_layer_list":
            stored = str(stored) if stored else None
            value = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        if stored != value and not (stored is None and value in (False, "", 0)):
            flag = _CHECKED.get(key, "--" + key.replace("_", "-"))
            raise ConversionError(f"{flag} {value} disagrees with {source}, which was saved with {stored}; "
                                  f"use {flag} {stored} or convert the checkpoint to the new layout")


def read_rank_state(load_dir: str | Path, num_chunks: int, expected: Optional[dict[str, Any]] = None,
                    iteration: int | str | None = None) -> tuple[Path, dict[str, Any]]:
    """(path, dict) of this rank's `model_optim_rng.pt` under the checkpoint root `load_dir` (the tracker's
    iteration, or `iteration`); its saved args must agree with this run's TP and PP sizes and with `expected`
    (see `check_args`)."""
    from megatron.core import parallel_state as ps

    iter_dir = layout.iteration_dir(Path(load_dir)) if iteration is None else \
        Path(load_dir) / layout.iter_dir_name(iteration)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    ep_rank, ep = ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()
    sizes = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "expert_model_parallel_size": ep}
    path = iter_dir / layout.rank_dir_name(tp_rank, pp_rank, pp, ep_rank, ep) / layout.FILE_NAME
    if not path.is_file():
        check_args(layout.read_args(iter_dir), sizes, str(iter_dir))
    state = layout.load_rank_file(path, mmap=False)
    saved = state.get("args")
    if saved is not None:
        check_args(saved, {**sizes, **(expected or {})}, str(iter_dir))
    keys = layout.model_keys(num_chunks)
    missing = [k for k in keys if k not in state]
    if missing:
        have = sorted(k for k in state if k.startswith("model"))
        raise ConversionError(f"{path} holds {have} but the model has {len(keys)} virtual pipeline chunk(s); "
                              f"match --num-layers-per-virtual-pipeline-stage to the checkpoint")
    return path, state


def load_checkpoint(chunks: Sequence, load_dir: str | Path, *, expected: Optional[dict[str, Any]] = None,
                    strict: bool = True, iteration: int | str | None = None) -> dict[str, Any]:
    """Load this rank's `model_optim_rng.pt` into `chunks` (from `models.build_model`); returns the file's dict
    (with `args`, `iteration`, and optimizer/RNG entries when a training save wrote them).

    `expected` maps saved-args names (tensor_model_parallel_size, num_layers, ...) to the values of this run; TP and
    PP sizes and the VPP chunk count are always checked.
    """
    path, state = read_rank_state(load_dir, len(chunks), expected, iteration)
    for chunk, key in zip(chunks, layout.model_keys(len(chunks))):
        _load_into(chunk, state[key], strict, f"{path}[{key}]")
    return state


def _load_into(chunk, state: dict, strict: bool, where: str) -> None:
    from mindspeed_llm.models import lora

    if lora.has_adapters(state) and not lora.adapter_keys(chunk):
        raise ConversionError(f"{where} is a LoRA save (it holds adapters): pass the base model's checkpoint as "
                              f"--load and this one as --lora-load")
    try:
        chunk.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise ConversionError(f"{where} does not fit the model built from the flags: {detail}") from None


def load_adapters(chunks: Sequence, lora_dir: str | Path, *, expected: Optional[dict[str, Any]] = None,
                  merge_scale: Optional[float] = None) -> dict[str, Any]:
    """--lora-load: this rank's LoRA checkpoint on top of the base weights already in `chunks`. Into the adapter
    modules of a LoRA model (`models.lora.add_lora`), or, with `merge_scale`, merged into the base weights of a
    plain model (generation). Every adapter the model has must be in the file, and nothing else of it may be
    unknown to the model. Returns the file's dict (iteration, optimizer state, ... to resume from)."""
    from mindspeed_llm.models import lora

    path, state = read_rank_state(lora_dir, len(chunks), expected)
    for chunk, key in zip(chunks, layout.model_keys(len(chunks))):
        saved = state[key]
        where = f"--lora-load {path}[{key}]"
        if merge_scale is not None:
            if not lora.has_adapters(saved):
                raise ConversionError(f"{where} holds no LoRA adapters (no *{lora.A_SUFFIX} tensors)")
            base = chunk.state_dict()
            try:
                merged = lora.merge_adapters(base, saved, merge_scale)
            except KeyError as exc:
                raise ConversionError(f"{where}: {exc.args[0]} is missing; the adapters do not fit the model") from None
            _load_into(chunk, merged, True, where)
            continue
        known = set(chunk.state_dict())
        unknown = sorted(k for k in saved if k not in known)
        missing = sorted(lora.adapter_keys(chunk) - set(saved))
        if unknown or missing:
            what = f"has no {missing[0]}" if missing else f"holds {unknown[0]}, which the model lacks"
            raise ConversionError(f"{where} {what}: it was trained with other --lora-target-modules, "
                                  f"--lora-modules-to-save or model flags")
        _load_into(chunk, saved, False, where)
    return state
