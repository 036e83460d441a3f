"""Build megatron-core `GPTModel` chunks for this pipeline rank from a `ModelConfig`."""
from __future__ import annotations

from typing import Any, Optional

import torch
from megatron.core.models import gpt as megatron_gpt
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import LayerNormImpl, TransformerBlockSubmodules

from mindspeed_llm.models.config import ModelConfig, transformer_config
from mindspeed_llm.models.cross_entropy import vocab_parallel_cross_entropy
from mindspeed_llm.models.placement import Placement, PlacementError, place_layers
from mindspeed_llm.models.spec import get_layer_spec


def _chunk_spec(cfg: ModelConfig, placement: Placement, p: int, v: int, grouped_experts: bool = False):
    """Our layer spec for chunk v of pipeline stage p: one spec for every layer, or with a MoE model whose
    config keeps some dense layers, the MoE or dense spec of each of the chunk's layers."""
    layers = placement.layers[p][v]
    if cfg.num_experts is None or not any(i in cfg.dense_layers for i in layers):
        return get_layer_spec(cfg.qk_layernorm, moe=cfg.num_experts is not None, grouped_experts=grouped_experts)
    specs = {moe: get_layer_spec(cfg.qk_layernorm, moe=moe, grouped_experts=grouped_experts) for moe in (False, True)}
    return TransformerBlockSubmodules(layer_specs=[specs[cfg.is_moe_layer(i)] for i in layers],
                                      layer_norm=LayerNormImpl)


class NoopTransformerLayer(MegatronModule):
    """MindSpeed's no-op layer (--noop-layers): holds no weights and passes the hidden states through, so a
    model keeps its layer numbering (and pipeline split) with fewer real layers."""

    def __init__(self, config, layer_number: int = 1, **_unused: Any):
        super().__init__(config)
        self.layer_number = layer_number

    def forward(self, hidden_states: torch.Tensor, context: Optional[torch.Tensor] = None, **_unused: Any):
        # a copy, as MindSpeed's: the schedule may free or reuse the tensor it passed in
        return hidden_states.clone(), context


def spec_with_noop_layers(spec, layers: tuple[int, ...], noop: frozenset[int]):
    """`spec` for the chunk holding global `layers`, with a `NoopTransformerLayer` wherever a layer is in `noop`."""
    if not noop & set(layers):
        return spec
    block = spec if isinstance(spec, TransformerBlockSubmodules) else None
    layer_specs = list(block.layer_specs) if block is not None else [spec] * len(layers)
    noop_spec = ModuleSpec(module=NoopTransformerLayer)
    return TransformerBlockSubmodules(
        layer_specs=[noop_spec if layer in noop else s for layer, s in zip(layers, layer_specs)],
        layer_norm=block.layer_norm if block is not None else LayerNormImpl)


class GPTModel(megatron_gpt.GPTModel):
    """megatron-core's `GPTModel` with the language-model loss of `cross_entropy.vocab_parallel_cross_entropy`
    (no fp32 copy of the logits); everything else is megatron-core's."""

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1), self.pg_collection.tp)
        return loss.transpose(0, 1).contiguous()          # [s, b] -> [b, s]


def _mark_expert_params(model: torch.nn.Module) -> None:
    """megatron-core's linears and GroupedMLP mark expert weights as expert-parallel (reduced over the expert
    data-parallel group) only when EP > 1, as if expert-TP were always TP. With expert-TP 1 under TP > 1 each TP
    rank holds whole experts fed by its own tokens, so their gradients must be summed over that group (which
    spans the TP ranks) at EP 1 too."""
    for name, param in model.named_parameters():
        if ".mlp.experts." in name:
            param.allreduce = False


def build_model(cfg: ModelConfig, *, params_dtype: torch.dtype = torch.float32,
                num_layer_list: Optional[list[int]] = None,
                num_layers_per_virtual_pipeline_stage: Optional[int] = None, sequence_parallel: bool = False,
                seq_length: Optional[int] = None, parallel_output: bool = True, layer_spec=None,
                **config_overrides: Any) -> list:
    """GPTModel chunks of this rank (one per virtual pipeline stage), on the current device, in eval mode.

    TP/PP sizes and ranks come from megatron's `parallel_state` (see `platform.init_distributed`); with
    `num_layers_per_virtual_pipeline_stage` the parallel state must have been initialised with the matching
    virtual pipeline size. Weights are initialised randomly; load a checkpoint afterwards.
    """
    from megatron.core import parallel_state as ps

    from mindspeed_llm.platform import adapt_megatron_moe, current_device, detect_platform

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    placement = place_layers(cfg.num_layers, pp, num_layer_list, num_layers_per_virtual_pipeline_stage,
                             frozenset(cfg.noop_layers))
    vpp = placement.vpp if placement.vpp > 1 else None
    if vpp != ps.get_virtual_pipeline_model_parallel_world_size():
        raise PlacementError(f"virtual pipeline size {vpp} (from --num-layers-per-virtual-pipeline-stage) does not match "
                         f"the parallel state's {ps.get_virtual_pipeline_model_parallel_world_size()}; pass it to "
                         f"init_distributed(virtual_pipeline_model_parallel_size=...)")
    config_overrides.setdefault("use_cpu_initialization", detect_platform().is_cpu)
    # megatron-core's RoPE reads it to cover the whole sequence, then slices this CP rank's chunks
    config_overrides.setdefault("context_parallel_size", ps.get_context_parallel_world_size())
    if cfg.num_experts is not None:
        adapt_megatron_moe()
        config_overrides.setdefault("expert_model_parallel_size", ps.get_expert_model_parallel_world_size())
        config_overrides.setdefault("expert_tensor_parallel_size", ps.get_expert_tensor_parallel_world_size())
    config = transformer_config(cfg, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                virtual_pipeline_model_parallel_size=vpp, num_layer_list=num_layer_list,
                                params_dtype=params_dtype, sequence_parallel=sequence_parallel, **config_overrides)
    p = ps.get_pipeline_model_parallel_rank()
    chunks = []
    for v in range(placement.vpp):
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec_with_noop_layers(
                layer_spec if layer_spec is not None else _chunk_spec(cfg, placement, p, v, config.moe_grouped_gemm),
                placement.layers[p][v], placement.noop),
            vocab_size=cfg.vocab_size,
            max_sequence_length=seq_length or cfg.max_position_embeddings,
            pre_process=placement.is_first(p, v),
            post_process=placement.is_last(p, v),
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=cfg.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(cfg.rotary_base),
            rotary_percent=1.0,
            rope_scaling=cfg.rope_scaling_factor is not None,
            rope_scaling_factor=cfg.rope_scaling_factor or 8.0,
            vp_stage=v if vpp else None,
        )
        if config.num_moe_experts and config.expert_tensor_parallel_size != tp:
            _mark_expert_params(model)
        n_built = len(model.decoder.layers)
        if n_built != len(placement.layers[p][v]):
            raise AssertionError(f"megatron built {n_built} layers on stage {p} chunk {v}, expected "
                                 f"{len(placement.layers[p][v])}")
        chunks.append(model.to(device=current_device()).eval())
    return chunks
