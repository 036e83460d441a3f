"""LoRA adapters on megatron-core's tensor-parallel linears, and merging them into the base weights.

y = W x + (alpha / r) * B A dropout(x), on the layers named by --lora-target-modules (megatron names: linear_qkv,
linear_proj, linear_fc1, linear_fc2). Each adapter is split over TP the way its base layer is:
  column-parallel (linear_qkv, linear_fc1): B takes W's output rows of this rank, A is whole on every rank;
  row-parallel (linear_proj, linear_fc2):   A takes W's input columns of this rank, B is whole on every rank.
So the merge W_rank + scale * B_rank @ A_rank is exact per shard, and an adapter's rows follow the same fused
layouts (interleaved QKV groups, [gate; up]) as W, which the family tables already know how to cut and join.
In a MoE layer (megatron-core SequentialMLP) linear_fc1/linear_fc2 of every local expert are targets, split over
the expert-TP group, and the router never is (MindSpeed-LLM's LoRA of sequential experts); each expert's adapter
starts from the seed of its global index, so every EP layout starts alike. With --moe-grouped-gemm (megatron-core
GroupedMLP) every local expert gets adapters on fc1 and fc2 whatever the targets, in MindSpeed-LLM's grouped layout
(`LoraGroupedExperts`): `weight1_lora_a` [H, r*E_loc], `weight1_lora_b` [r, E_loc*2F/T], `weight2_lora_a`
[E_loc*F/T, r], `weight2_lora_b` [r*E_loc, H], seen per expert as raw views [E_loc, ., .]; expert j's factors are
the transposes of its sequential adapters (A1[j] = A_fc1^T, B1[j] = B_fc1^T, ...), drawn from the same seeds.

State-dict names are PEFT's (as MindSpeed-LLM writes them): `X.base_layer.weight`, `X.lora_A.default.weight`,
`X.lora_B.default.weight`. A base checkpoint (`X.weight`) loads into a wrapped model unchanged.

A LoRA save records the base it trained on (`lora_base_load`) and a fingerprint of that base's weights
(`lora_base_fingerprint`, see `fingerprint_share`), so that merging onto another base can be refused.
"""
from __future__ import annotations

import argparse
import functools
import math
import re
import zlib
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mindspeed_llm.errors import UserError

COLUMN_PARALLEL = ("linear_qkv", "linear_fc1")
ROW_PARALLEL = ("linear_proj", "linear_fc2")
TARGETS = COLUMN_PARALLEL + ROW_PARALLEL
STAGE_MODULES = {"embedding", "word_embeddings", "output_layer", "final_layernorm", "decoder"}
A_SUFFIX, B_SUFFIX, BASE = ".lora_A.default.weight", ".lora_B.default.weight", ".base_layer."
# GroupedMLP adapters (MindSpeed-LLM's names): the A and B factor of each grouped expert weight.
GROUPED_ADAPTERS = {"weight1": ("weight1_lora_a", "weight1_lora_b"), "weight2": ("weight2_lora_a", "weight2_lora_b")}
GROUPED_NAMES = tuple(name for pair in GROUPED_ADAPTERS.values() for name in pair)
GROUPED_A_SUFFIXES = tuple("." + a for a, _ in GROUPED_ADAPTERS.values())
ADAPTER_SUFFIXES = (A_SUFFIX, B_SUFFIX) + tuple("." + name for name in GROUPED_NAMES)


@dataclass(frozen=True)
class LoraSpec:
    r: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0
    modules_to_save: tuple[str, ...] = ()

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def spec_from_args(args: argparse.Namespace, saved: Optional[argparse.Namespace] = None,
                   source: str = "") -> Optional[LoraSpec]:
    """The run's LoRA spec: --lora-target-modules switches LoRA on (MindSpeed-LLM's rule). r and alpha are those of
    `saved` (a LoRA checkpoint's args) when it has them -- flags may restate them, or give others with the same
    scale alpha/r (MindSpeed-LLM's own recipes train with 16/32 and merge with 8/16) -- else the flags', else
    MindSpeed-LLM's defaults 16 and 32."""
    targets = list(getattr(args, "lora_target_modules", None) or [])
    if not targets and saved is not None:
        targets = list(getattr(saved, "lora_target_modules", None) or [])
    if not targets:
        for flag in ("lora_r", "lora_alpha", "lora_load", "lora_modules_to_save"):
            if getattr(args, flag, None):
                raise UserError(f"--{flag.replace('_', '-')} needs --lora-target-modules (the layers that get "
                                f"adapters: {' '.join(TARGETS)})")
        return None
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise UserError(f"--lora-target-modules {' '.join(unknown)}: unknown module; choose from "
                        f"{' '.join(TARGETS)} (megatron-core names)")
    r, alpha = getattr(args, "lora_r", None), getattr(args, "lora_alpha", None)
    stored_r = getattr(saved, "lora_r", None) if saved is not None else None
    if stored_r is not None:
        stored_alpha = saved.lora_alpha
        r, alpha = r or stored_r, alpha or stored_alpha
        if (r, alpha) != (stored_r, stored_alpha):
            if alpha / r != stored_alpha / stored_r:
                raise UserError(f"--lora-r {r:g} --lora-alpha {alpha:g} (scale {alpha / r:g}) disagrees with "
                                f"{source}, which was trained with r {stored_r:g}, alpha {stored_alpha:g} (scale "
                                f"{stored_alpha / stored_r:g})")
            from mindspeed_llm.platform import notice

            notice(f"--lora-r {r:g} --lora-alpha {alpha:g}: {source} was trained with r {stored_r:g}, alpha "
                   f"{stored_alpha:g}; the scale alpha/r is the same, so its values are used")
        r, alpha = stored_r, stored_alpha
    r, alpha = r or 16, alpha or 32
    if r < 1:
        raise UserError(f"--lora-r {r}: expected a positive rank")
    dropout = float(getattr(args, "lora_dropout", 0.0) or 0.0)
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"--lora-dropout {dropout}: expected a probability in [0, 1)")
    return LoraSpec(int(r), float(alpha), tuple(dict.fromkeys(targets)), dropout,
                    tuple(getattr(args, "lora_modules_to_save", None) or ()))


def _mark(param: nn.Parameter, split_dim: Optional[int], sequence_parallel: bool, allreduce: bool = True) -> None:
    """megatron-core's parameter attributes: TP-split params (grad norm counts them on every rank) or replicated
    ones (counted once; with sequence parallelism their grads are all-reduced over TP by finalize_model_grads);
    `allreduce` False marks an expert-parallel param (DDP reduces it over the expert-data-parallel group)."""
    param.tensor_model_parallel = split_dim is not None
    param.partition_dim = split_dim if split_dim is not None else -1
    param.partition_stride = 1
    param.sequence_parallel = sequence_parallel and split_dim is None
    param.allreduce = allreduce


class LoraLinear(nn.Module):
    """A megatron ColumnParallelLinear / RowParallelLinear plus a low-rank adapter; returns (output, bias) as the
    base layer does."""

    def __init__(self, base: nn.Module, kind: str, spec: LoraSpec, seed: int) -> None:
        super().__init__()
        from megatron.core import parallel_state as ps

        self.base_layer = base
        self.kind = kind
        self.scale = spec.scale
        # An expert's linear splits over the expert-TP group, and under EP or expert TP it leaves the gathering
        # and summing of tokens to the token dispatcher (`explicit_expert_comm`): the adapter must do the same.
        self.tp_group = getattr(base, "tp_group", None) or ps.get_tensor_model_parallel_group()
        self.explicit_comm = bool(getattr(base, "explicit_expert_comm", False))
        self.sequence_parallel = bool(getattr(base, "sequence_parallel", False)) and not self.explicit_comm
        tp, rank = self.tp_group.size(), self.tp_group.rank()
        out_local, in_local = base.weight.shape
        dtype, device = base.weight.dtype, base.weight.device
        in_full = in_local * tp if kind == "row" else in_local
        self.lora_A = nn.ModuleDict({"default": nn.Linear(in_local, spec.r, bias=False, dtype=dtype, device=device)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(spec.r, out_local, bias=False, dtype=dtype, device=device)})
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        with torch.no_grad():
            self.lora_A["default"].weight.copy_(initial_a(seed, spec.r, in_full, rank * in_local if kind == "row"
                                                          else 0, in_local))
            self.lora_B["default"].weight.zero_()
        # Expert adapters reduce their grads over the expert-data-parallel group, as the expert weights do.
        expert_reduced = getattr(base.weight, "allreduce", True)
        _mark(self.lora_A["default"].weight, 1 if kind == "row" else None, self.sequence_parallel, expert_reduced)
        _mark(self.lora_B["default"].weight, 0 if kind == "column" else None, self.sequence_parallel, expert_reduced)
        self.register_load_state_dict_pre_hook(_accept_base_names)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        from megatron.core import tensor_parallel as tpl

        out, bias = self.base_layer(x, *args, **kwargs)
        a, b = self.lora_A["default"].weight, self.lora_B["default"].weight
        if self.explicit_comm:
            # The dispatcher sums this rank's partial input grads (column) or outputs (row) over expert TP, so h
            # stays local; the factor that is whole on every rank gets the sum of its partial grads.
            if self.kind == "column":
                a = tpl.copy_to_tensor_model_parallel_region(a, group=self.tp_group)
            else:
                b = tpl.copy_to_tensor_model_parallel_region(b, group=self.tp_group)
            return out + self.scale * F.linear(F.linear(self.dropout(x), a), b), bias
        h = F.linear(self.dropout(x), a)
        if self.kind == "column":
            # B_rank sees the full rank-r input; backward sums the partial grads of h over TP.
            h = (tpl.gather_from_sequence_parallel_region(h, group=self.tp_group) if self.sequence_parallel
                 else tpl.copy_to_tensor_model_parallel_region(h, group=self.tp_group))
        else:
            h = (tpl.reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group) if self.sequence_parallel
                 else tpl.reduce_from_tensor_model_parallel_region(h, group=self.tp_group))
        return out + self.scale * F.linear(h, b), bias


class LoraGroupedExperts(nn.Module):
    """Adapters of a megatron-core GroupedMLP (--moe-grouped-gemm), mixed into the instance's class by
    `add_grouped_lora` so that `weight1`/`weight2` keep their names and the adapters sit beside them under
    MindSpeed-LLM's keys. Per local expert j, with the grouped GEMM megatron-core runs (`gg.ops.gmm`):
        fc1(x) = x W1[j] + scale * (dropout(x) A1[j]) B1[j],   fc2(h) = h W2[j] + scale * (dropout(h) A2[j]) B2[j].
    Under expert TP, B1 and A2 are this rank's shards (as W1's columns and W2's rows) and A1, B2 are whole; the
    token dispatcher gathers and sums tokens over expert TP, so only the whole factors' partial grads are summed."""

    def _init_adapters(self, spec: LoraSpec, seeds: Sequence[tuple[int, int]]) -> None:
        """`seeds`: (fc1 seed, fc2 seed) of each local expert, those of its sequential adapters."""
        experts, hidden = self.num_local_experts, self.config.hidden_size
        tp, rank = self.tp_group.size(), self.tp_group.rank()
        fc1_local = self.weight1.shape[1] // experts            # 2F/T
        fc2_local = self.weight2.shape[0] // experts            # F/T
        dtype, device = self.weight1.dtype, self.weight1.device
        a1 = torch.stack([initial_a(s1, spec.r, hidden, 0, hidden).T for s1, _ in seeds])        # [E, H, r]
        a2 = torch.stack([initial_a(s2, spec.r, fc2_local * tp, rank * fc2_local, fc2_local).T
                          for _, s2 in seeds])                                                  # [E, F/T, r]
        factors = {"weight1_lora_a": (a1.reshape(hidden, -1), None),
                   "weight1_lora_b": (torch.zeros(spec.r, experts * fc1_local), 1),
                   "weight2_lora_a": (a2.reshape(-1, spec.r), 0),
                   "weight2_lora_b": (torch.zeros(spec.r * experts, hidden), None)}
        for name, (value, split_dim) in factors.items():
            param = nn.Parameter(value.to(device=device, dtype=dtype).contiguous())
            _mark(param, split_dim, False, getattr(self.weight1, "allreduce", True))
            self.register_parameter(name, param)
        self.lora_scale = spec.scale
        self.lora_dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.register_load_state_dict_pre_hook(_accept_grouped_base)

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        from megatron.core import tensor_parallel as tpl

        if permuted_local_hidden_states.nelement() == 0:
            # No token for these experts: megatron-core's path keeps its weights in the graph; so do the adapters.
            out, bias = super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
            return out + 0.0 * sum(getattr(self, name).sum() for name in GROUPED_NAMES), bias
        experts, hidden, r = self.num_local_experts, self.config.hidden_size, self.weight1_lora_b.shape[0]
        a1, b2 = self.weight1_lora_a, self.weight2_lora_b
        if self.tp_group.size() > 1:
            # the whole factors: sum their partial grads over expert TP (the dispatcher sums the tokens')
            a1 = tpl.copy_to_tensor_model_parallel_region(a1, group=self.tp_group)
            b2 = tpl.copy_to_tensor_model_parallel_region(b2, group=self.tp_group)
        fc1 = self._adapted_gmm(permuted_local_hidden_states, self.weight1.view(experts, hidden, -1),
                                a1.view(experts, hidden, r), self.weight1_lora_b.view(experts, r, -1),
                                tokens_per_expert)
        intermediate = self.activation_func_with_probs(fc1, permuted_probs.unsqueeze(-1))
        fc2 = self._adapted_gmm(intermediate, self.weight2.view(experts, -1, hidden),
                                self.weight2_lora_a.view(experts, -1, r), b2.view(experts, r, hidden),
                                tokens_per_expert)
        return fc2, None

    def _adapted_gmm(self, x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                     tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x W[j] + scale * (dropout(x) A[j]) B[j] for the rows of each expert j, as grouped GEMMs."""
        from megatron.core.transformer.moe import grouped_gemm_util as gg

        low_rank = gg.ops.gmm(self.lora_dropout(x), a, tokens_per_expert, trans_b=False)
        return (gg.ops.gmm(x, weight, tokens_per_expert, trans_b=False)
                + self.lora_scale * gg.ops.gmm(low_rank, b, tokens_per_expert, trans_b=False))


@functools.lru_cache(maxsize=None)
def _grouped_lora_class(base: type) -> type:
    return type(f"Lora{base.__name__}", (LoraGroupedExperts, base), {})


def add_grouped_lora(experts: nn.Module, spec: LoraSpec, seed: int, layer_number: int, path: str) -> None:
    """Give a GroupedMLP (at `path` in its layer) the grouped adapters, each expert's drawn from the seeds of
    its sequential adapters (`path`.local_experts.<global index>.linear_fc1/linear_fc2)."""
    config = experts.config
    if getattr(config, "moe_apply_probs_on_input", False) or getattr(experts, "activation_recompute", False):
        raise UserError("--moe-grouped-gemm: LoRA on grouped experts with --moe-apply-probs-on-input or "
                        "--recompute-modules moe_act is not implemented; drop that flag")
    offset = experts.ep_group.rank() * experts.num_local_experts
    seeds = [tuple(zlib.crc32(f"{seed}:{layer_number}:{path}.local_experts.{offset + j}.{fc}".encode())
                   for fc in ("linear_fc1", "linear_fc2")) for j in range(experts.num_local_experts)]
    experts.__class__ = _grouped_lora_class(type(experts))
    experts._init_adapters(spec, seeds)


def _accept_grouped_base(module, state_dict, prefix, *unused) -> None:
    """Load hook: a base checkpoint has `weight1`/`weight2` only; the adapters keep their initial values."""
    if prefix + "weight1" in state_dict:
        for name in GROUPED_NAMES:
            state_dict.setdefault(prefix + name, getattr(module, name).detach())


def initial_a(seed: int, r: int, in_full: int, start: int, width: int) -> torch.Tensor:
    """An adapter's initial A [r, width]: columns start..start+width of the whole A [r, in_full], drawn (PEFT's
    kaiming-uniform bound 1/sqrt(fan_in)) from a seed of the layer, so every TP/PP/EP layout and both expert
    layouts start from the same adapters. B starts at zero, so the model starts as the base."""
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(in_full)
    return torch.empty(r, in_full).uniform_(-bound, bound, generator=g)[:, start:start + width]


def _accept_base_names(module, state_dict, prefix, *unused) -> None:
    """Load hook: a base checkpoint names the wrapped layer's entries `X.weight` (`X.bias`, `X._extra_state`);
    adapters it lacks keep their initial values (a fresh LoRA run on a base model)."""
    for key in [k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):]]:
        own = prefix + "base_layer." + key[len(prefix):]        # weight, bias, _extra_state
        if own not in state_dict:
            state_dict[own] = state_dict.pop(key)
    if prefix + "base_layer.weight" in state_dict:
        for key, param in ((prefix + "lora_A.default.weight", module.lora_A["default"].weight),
                           (prefix + "lora_B.default.weight", module.lora_B["default"].weight)):
            state_dict.setdefault(key, param.detach())


def add_lora(chunk: nn.Module, spec: LoraSpec, seed: int) -> nn.Module:
    """Wrap the target linears of one GPTModel chunk, freeze everything but the adapters (and the
    --lora-modules-to-save modules), and make the embedding output require grad so recomputed layers still
    give adapter gradients. Returns the chunk."""
    from megatron.core.transformer.moe.experts import GroupedMLP

    layers = getattr(getattr(chunk, "decoder", None), "layers", [])
    for layer in layers:
        for path, module in list(layer.named_modules()):
            if isinstance(module, GroupedMLP) and not isinstance(module, LoraGroupedExperts):
                add_grouped_lora(module, spec, seed, layer.layer_number, path)
                continue
            name = path.rsplit(".", 1)[-1]
            if name not in spec.targets or isinstance(module, LoraLinear):
                continue
            parent = layer.get_submodule(path.rsplit(".", 1)[0]) if "." in path else layer
            kind = "column" if name in COLUMN_PARALLEL else "row"
            layer_seed = zlib.crc32(f"{seed}:{layer.layer_number}:{_global_expert_path(layer, path)}".encode())
            setattr(parent, name, LoraLinear(module, kind, spec, layer_seed))
    # Names of modules that live on the first or last pipeline stage only may be absent from this chunk.
    here = {part for name, _ in chunk.named_modules() for part in name.split(".")}
    unknown = [m for m in spec.modules_to_save if m not in here | STAGE_MODULES]
    if unknown:
        raise UserError(f"--lora-modules-to-save {' '.join(unknown)}: no such module in the model (e.g. "
                        f"word_embeddings, output_layer, final_layernorm)")
    to_save = saved_modules(spec.modules_to_save, getattr(chunk, "share_embeddings_and_output_weights", False))
    for name, param in chunk.named_parameters():
        parts = name.split(".")
        param.requires_grad = is_adapter(name) or any(m in parts for m in to_save)
    if getattr(chunk, "pre_process", False) and hasattr(chunk, "embedding"):
        chunk.embedding.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True)
                                              if torch.is_grad_enabled() and not out.requires_grad else out)
    return chunk


_LOCAL_EXPERT = re.compile(r"\.local_experts\.(\d+)")


def _global_expert_path(layer: nn.Module, path: str) -> str:
    """`path` with a SequentialMLP's local expert index replaced by the global one (EP rank * E_loc + j), so an
    expert's adapters start alike whatever the expert-parallel size."""
    match = _LOCAL_EXPERT.search(path)
    if match is None:
        return path
    experts = layer.get_submodule(path[:match.start()])
    offset = experts.ep_group.rank() * experts.num_local_experts
    return f"{path[:match.start()]}.local_experts.{offset + int(match.group(1))}{path[match.end():]}"


def saved_modules(modules_to_save: Iterable[str], tied: bool) -> set[str]:
    """The modules --lora-modules-to-save trains in full; with tied embeddings the last stage's copy of the
    embedding (output_layer) trains with the first's."""
    to_save = set(modules_to_save or ())
    if tied and to_save & {"word_embeddings", "output_layer"}:
        to_save |= {"word_embeddings", "output_layer"}
    return to_save


def is_adapter(key: str) -> bool:
    """Whether state-dict entry `key` is an adapter factor (of a linear, or of grouped experts)."""
    return key.endswith(ADAPTER_SUFFIXES)


def is_trained(key: str, to_save: set[str]) -> bool:
    """Whether state-dict entry `key` is trained by LoRA: an adapter, or part of a module of `to_save`."""
    return is_adapter(key) or bool(to_save.intersection(key.split(".")))


def trainable_state(chunk: nn.Module) -> dict[str, torch.Tensor]:
    """--lora-ckpt-filter: the chunk's state dict reduced to what training changes (adapters, modules to save)."""
    keep = {name for name, p in chunk.named_parameters() if p.requires_grad}
    return {k: v for k, v in chunk.state_dict().items() if k in keep}


def adapter_keys(chunk: nn.Module) -> set[str]:
    return {name for name, _ in chunk.named_parameters() if is_adapter(name)}


def has_adapters(state: dict) -> bool:
    return any(k.endswith((A_SUFFIX,) + GROUPED_A_SUFFIXES) for k in state)


def holds_base(state: dict) -> bool:
    """Whether a state dict with adapters also holds the weights they adapt (an unfiltered LoRA save)."""
    return any(BASE in k or k.endswith(tuple("." + w for w in GROUPED_ADAPTERS)) for k in state)


def merge_adapters(state: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], scale: float,
                   to_save: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """A base-named megatron state dict with the adapters merged in: W + scale * B @ A per shard, the delta in
    fp32, the sum cast back to W's dtype. Of the other tensors of `adapters` only those of the modules trained in
    full (`to_save`, see `saved_modules`) replace the base ones, cast to the base's dtype: the frozen weights an
    unfiltered LoRA save also holds are the training-dtype copy of the base, so `state` keeps its own. `state`
    may itself hold adapters (an unfiltered save merged alone): pass it as both. Raises KeyError naming a
    missing tensor and ValueError when an adapter's shape does not fit its weight."""
    out = {k.replace(BASE, "."): v for k, v in state.items() if not is_adapter(k)}
    for key, value in adapters.items():
        if is_trained(key, to_save) and not is_adapter(key):
            name = key.replace(BASE, ".")
            out[name] = value.to(out[name].dtype) if name in out else value
    for a_key in (k for k in adapters if k.endswith(A_SUFFIX)):
        module = a_key[:-len(A_SUFFIX)]
        b_key, w_key = module + B_SUFFIX, module + ".weight"
        if b_key not in adapters or w_key not in out:
            raise KeyError(b_key if b_key not in adapters else w_key)
        w, a, b = out[w_key], adapters[a_key], adapters[b_key]
        if a.dim() != 2 or b.dim() != 2 or (b.shape[0], a.shape[1]) != tuple(w.shape) or b.shape[1] != a.shape[0]:
            raise ValueError(f"{module}: adapters B {tuple(b.shape)} @ A {tuple(a.shape)} do not fit the weight "
                             f"{tuple(w.shape)}")
        out[w_key] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    for a_key in (k for k in adapters if k.endswith(GROUPED_A_SUFFIXES)):
        experts, weight = a_key.rsplit(".", 1)[0], a_key.rsplit(".", 1)[1][:-len("_lora_a")]
        b_key, w_key = f"{experts}.{GROUPED_ADAPTERS[weight][1]}", f"{experts}.{weight}"
        if b_key not in adapters or w_key not in out:
            raise KeyError(b_key if b_key not in adapters else w_key)
        out[w_key] = _merge_grouped(weight, out[w_key], adapters[a_key], adapters[b_key], scale, experts)
    return out


def _merge_grouped(weight: str, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                   module: str) -> torch.Tensor:
    """W[j] += scale * A[j] @ B[j] for each local expert j of a grouped weight (MindSpeed-LLM's merge), the
    factors seen per expert as raw views: weight1 [E, H, .] = A [E, H, r] @ B [E, r, .], weight2 [E, ., H] =
    A [E, ., r] @ B [E, r, H]."""
    if a.dim() != 2 or b.dim() != 2 or w.dim() != 2:
        raise ValueError(f"{module}: adapters {tuple(a.shape)}, {tuple(b.shape)} and {weight} {tuple(w.shape)} "
                         f"are not matrices")
    if weight == "weight1":        # w [H, E*c], a [H, r*E], b [r, E*c]
        hidden, r = w.shape[0], b.shape[0]
        experts = a.shape[1] // r if r else 0
        fits = a.shape[0] == hidden and experts * r == a.shape[1] and b.shape[1] == w.shape[1] > 0
        fits = fits and w.shape[1] % experts == 0 if experts else False
    else:                          # w [E*c, H], a [E*c, r], b [r*E, H]
        hidden, r = w.shape[1], a.shape[1]
        experts = b.shape[0] // r if r else 0
        fits = b.shape[1] == hidden and experts * r == b.shape[0] and a.shape[0] == w.shape[0] > 0
        fits = fits and w.shape[0] % experts == 0 if experts else False
    if not fits:
        raise ValueError(f"{module}: adapters {tuple(a.shape)} and {tuple(b.shape)} do not fit {weight} "
                         f"{tuple(w.shape)}")
    if weight == "weight1":
        delta = torch.bmm(a.float().view(experts, hidden, r), b.float().view(experts, r, -1))
    else:
        delta = torch.bmm(a.float().view(experts, -1, r), b.float().view(experts, r, hidden))
    return (w.float() + scale * delta.reshape(w.shape)).to(w.dtype)


# --- the base fingerprint ----------------------------------------------------------------------------------------
FINGERPRINT_MODULUS = 1 << 48
# Routed experts are left out: they are split over EP ranks, which do not all take part in the sum.
_FINGERPRINTED = re.compile(r"^decoder\.layers\.(\d+)\.(?:self_attention|mlp)\.(?:linear_qkv|linear_proj|linear_fc1|"
                            r"linear_fc2)(?:\.base_layer)?\.weight$")


def fingerprint_share(chunks: Iterable[tuple[dict[str, torch.Tensor], Sequence[int]]], num_layers: int) -> int:
    """This shard's share of the base fingerprint. `chunks`: (state dict of one model chunk, global index of each
    of its local decoder layers). The fingerprint covers the four linear weights of the first and the last
    decoder layer: the sum, as integers, of the bit patterns of their values rounded to bf16. Integer sums add up
    exactly in any order, and these weights are split over TP (and PP) ranks without overlap, so the shares of all
    ranks sum to the same value for every layout; bf16 makes an fp32 base and its bf16 copy agree. A MoE layer's
    share is its attention (every EP rank holds the same)."""
    wanted = {0, num_layers - 1}
    total = 0
    for state, global_layers in chunks:
        for key, value in state.items():
            match = _FINGERPRINTED.match(key)
            if match and global_layers[int(match.group(1))] in wanted and isinstance(value, torch.Tensor):
                bits = value.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16)
                total += int(bits.sum(dtype=torch.int64))
    return total % FINGERPRINT_MODULUS


def fingerprint_text(total: int) -> str:
    """The fingerprint of the summed shares of all ranks, as it is recorded and shown."""
    return f"{total % FINGERPRINT_MODULUS:012x}"
