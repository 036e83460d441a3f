"""Load a Megatron checkpoint into this rank's GPTModel chunks (training / inference / verification)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

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


def expert_tensor_parallel_size(args: argparse.Namespace) -> int:
    """Expert-TP size of a checkpoint from its saved args (unset: the TP size, megatron-core's default)."""
    return int(getattr(args, "expert_tensor_parallel_size", None) or getattr(args, "tensor_model_parallel_size", 1))


def saved_args(load_dir: str | Path) -> tuple[argparse.Namespace, str]:
    """(saved args, the rank file they were read from) of the checkpoint root `load_dir`."""
    iter_dir = layout.iteration_dir(Path(load_dir))
    args = layout.read_args(iter_dir)
    return args, str(sorted(iter_dir.glob(f"mp_rank_*/{layout.FILE_NAME}"))[0])


def check_args(saved: argparse.Namespace, expected: dict[str, Any], source: str,
               adapters_for: Optional[str] = None) -> None:
    """Raise one line naming the first flag whose value differs from the checkpoint's saved args. Model-shape
    keys (`models.resolve.MODEL_ARG_KEYS`) are compared where the checkpoint records them. `adapters_for`: the
    base model `expected` describes, when `source` is a LoRA checkpoint whose adapters go onto it."""
    from mindspeed_llm.models.resolve import MODEL_ARG_KEYS, flag_name, same

    for key, value in expected.items():
        if value is None or key not in _CHECKED and not hasattr(saved, key):
            continue
        stored = getattr(saved, key, None)
        flag = _CHECKED.get(key, flag_name(key))
        if key in MODEL_ARG_KEYS and key not in _CHECKED:
            differs = stored is not None and not same(value, stored)
            advice = "the model built does not match the checkpoint"
        else:
            if key == "num_layer_list":
                stored = str(stored) if stored else None
                value = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            differs = stored != value and not (stored is None and value in (False, "", 0))
            advice = f"use {flag} {stored} or convert the checkpoint to the new layout"
        if not differs:
            continue
        if adapters_for is not None:
            raise ConversionError(f"{source} was trained on a model with {flag} {stored}, but {adapters_for} has "
                                  f"{value}: its adapters do not fit that model")
        raise ConversionError(f"{flag} {value} disagrees with {source}, which was saved with {stored}; {advice}")


def base_fingerprint(chunks: Sequence, state: dict[str, Any]) -> str:
    """Collective over the model-parallel group: the fingerprint (`models.lora.fingerprint_share`) of the base
    checkpoint `state` (this rank's file dict, as `load_checkpoint` returns it) loaded into `chunks`."""
    import torch
    from megatron.core import parallel_state as ps

    from mindspeed_llm.models import lora
    from mindspeed_llm.platform import device_tensor

    shares = [(state[key], [layer.layer_number - 1 for layer in chunk.decoder.layers])
              for chunk, key in zip(chunks, layout.model_keys(len(chunks)))]
    group = ps.get_model_parallel_group()
    total = device_tensor([lora.fingerprint_share(shares, chunks[0].config.num_layers)], torch.int64, group)
    torch.distributed.all_reduce(total, group=group)
    return lora.fingerprint_text(int(total.item()))


def check_lora_base(lora_args: Optional[argparse.Namespace], fingerprint: str, base: str, lora_dir: str,
                    mismatch_ok: bool, notice: Callable[[str], None]) -> None:
    """Refuse to put adapters onto a base other than the one they were trained on: `fingerprint` is that of
    `base` (e.g. "--load-dir DIR"), the LoRA checkpoint's args record its own base's. --lora-ignore-base-mismatch
    turns the error into a warning; a LoRA save that records no fingerprint gets a notice."""
    recorded = getattr(lora_args, "lora_base_fingerprint", None)
    if recorded is None:
        notice(f"--lora-load {lora_dir} records no fingerprint of the base it was trained on (an older save): "
               f"cannot check that {base} is that base")
        return
    if recorded == fingerprint:
        return
    trained_on = getattr(lora_args, "lora_base_load", None) or getattr(lora_args, "load", None)
    what = (f"--lora-load {lora_dir} was trained on the base {trained_on} (fingerprint {recorded}), but {base} "
            f"holds other weights (fingerprint {fingerprint})")
    if mismatch_ok:
        notice(f"warning: {what}; merging anyway (--lora-ignore-base-mismatch)")
        return
    error = ConversionError(f"{what}: pass the base the adapters were trained on, or --lora-ignore-base-mismatch "
                            f"to merge them anyway")
    error.shared = True      # every rank reached the same verdict
    raise error


def read_rank_state(load_dir: str | Path, num_chunks: int, expected: Optional[dict[str, Any]] = None,
                    iteration: int | str | None = None,
                    adapters_for: Optional[str] = None) -> tuple[Path, dict[str, Any]]:
    """(path, dict) of this rank's `model_optim_rng.pt` under the checkpoint root `load_dir` (the tracker's
    iteration, or `iteration`); its saved args must agree with this run's TP and PP sizes and with `expected`
    (see `check_args`, also for `adapters_for`)."""
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
        check_args(saved, {**sizes, **(expected or {})}, str(iter_dir), adapters_for)
        saved_etp = expert_tensor_parallel_size(saved)
        if getattr(saved, "num_experts", None) and saved_etp != ps.get_expert_tensor_parallel_world_size():
            raise ConversionError(f"--expert-tensor-parallel-size {ps.get_expert_tensor_parallel_world_size()} "
                                  f"disagrees with {iter_dir}, which was saved with {saved_etp}; use "
                                  f"--expert-tensor-parallel-size {saved_etp} or convert the checkpoint")
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
        if ".mlp.experts.weight1" in str(exc) or ".mlp.experts.local_experts." in str(exc):
            grouped = any(k.endswith(".mlp.experts.weight1") for k in state)
            detail = (f"its experts are in the {'GroupedMLP' if grouped else 'SequentialMLP'} layout; pass "
                      f"--moe-grouped-gemm exactly when the checkpoint was converted or saved with it")
        raise ConversionError(f"{where} does not fit the model built from the flags: {detail}") from None


def load_adapters(chunks: Sequence, lora_dir: str | Path, *, expected: Optional[dict[str, Any]] = None,
                  merge_scale: Optional[float] = None, base: Optional[str] = None) -> dict[str, Any]:
    """--lora-load: this rank's LoRA checkpoint on top of the base weights already in `chunks`. Into the adapter
    modules of a LoRA model (`models.lora.add_lora`), or, with `merge_scale`, merged into the base weights of a
    plain model (generation). Every adapter the model has must be in the file, and nothing else of it may be
    unknown to the model. `base` names the base in errors (e.g. "--load DIR"). Returns the file's dict
    (iteration, optimizer state, ... to resume from)."""
    from mindspeed_llm.models import lora

    path, state = read_rank_state(lora_dir, len(chunks), expected, adapters_for=base)
    for chunk, key in zip(chunks, layout.model_keys(len(chunks))):
        saved = state[key]
        where = f"--lora-load {path}[{key}]"
        if merge_scale is not None:
            if not lora.has_adapters(saved):
                raise ConversionError(f"{where} holds no LoRA adapters (no *{lora.A_SUFFIX} tensors)")
            to_save = lora.saved_modules(getattr(state.get("args"), "lora_modules_to_save", None),
                                         getattr(chunk, "share_embeddings_and_output_weights", False))
            try:
                merged = lora.merge_adapters(chunk.state_dict(), saved, merge_scale, to_save)
            except KeyError as exc:
                raise ConversionError(f"{where}: {exc.args[0]} is missing; the adapters do not fit the model") from None
            except ValueError as exc:
                raise ConversionError(f"{where}: {exc}; the adapters do not fit the model") from None
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
