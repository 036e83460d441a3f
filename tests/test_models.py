"""Model families: the declarative tables, config reading, layer placement and the `--spec` module path."""
from __future__ import annotations

import importlib
import json

import pytest
import torch

from mindspeed_llm.models import ConfigError, PlacementError, get_family, load_model_config, place_layers
from mindspeed_llm.models.config import model_config_from_hf, pipeline_layout
from mindspeed_llm.models.family import DictSource, FusedQKV, GatedMLP
from mindspeed_llm.models.registry import family_for_config


def _cfg(heads=4, groups=2, d=3, hidden=5, ffn=8):
    return model_config_from_hf({"num_hidden_layers": 2, "hidden_size": hidden, "intermediate_size": ffn,
                                 "num_attention_heads": heads, "num_key_value_heads": groups, "head_dim": d,
                                 "vocab_size": 16}, "qwen3", qk_layernorm=True, add_qkv_bias=False)


def _labelled(rows_per_block: int, blocks: int, hidden: int, base: int) -> torch.Tensor:
    """Row r of block b is filled with base + b so the fused order can be read back."""
    return torch.cat([torch.full((rows_per_block, hidden), float(base + b)) for b in range(blocks)])


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fused_qkv_interleaves_per_kv_group(tp):
    cfg = _cfg()
    q, k, v = _labelled(3, 4, 5, 0), _labelled(3, 2, 5, 10), _labelled(3, 2, 5, 20)
    src = DictSource({"q": q, "k": k, "v": v})
    rule = FusedQKV("linear_qkv.weight", q="q", k="k", v="v")
    shards = [rule.shard(src, t, tp, cfg) for t in range(tp)]
    fused = torch.cat(shards)
    # [q0 q1 k0 v0 | q2 q3 k1 v1]
    assert fused[::3, 0].tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    back = rule.merge(shards, cfg)
    assert torch.equal(back["q"], q) and torch.equal(back["k"], k) and torch.equal(back["v"], v)
    bias = FusedQKV("b", q="qb", k="kb", v="vb")
    bsrc = DictSource({"qb": q[:, 0].clone(), "kb": k[:, 0].clone(), "vb": v[:, 0].clone()})
    bshards = [bias.shard(bsrc, t, tp, cfg) for t in range(tp)]
    assert torch.cat(bshards)[::3].tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert torch.equal(bias.merge(bshards, cfg)["qb"], q[:, 0])


def test_gated_mlp_pairs_gate_and_up_per_rank():
    cfg = _cfg()
    gate, up = torch.arange(8.0)[:, None].expand(8, 5), 100 + torch.arange(8.0)[:, None].expand(8, 5)
    rule = GatedMLP("fc1", gate="g", up="u")
    shards = [rule.shard(DictSource({"g": gate, "u": up}), t, 2, cfg) for t in range(2)]
    assert shards[0][:, 0].tolist() == [0, 1, 2, 3, 100, 101, 102, 103]
    assert shards[1][:, 0].tolist() == [4, 5, 6, 7, 104, 105, 106, 107]
    back = rule.merge(shards, cfg)
    assert torch.equal(back["g"], gate) and torch.equal(back["u"], up)


def test_layer_placement():
    assert place_layers(4, 2).layers == (((0, 1),), ((2, 3),))
    assert place_layers(28, 2, [7, 21]).layers[1][0] == tuple(range(7, 28))
    vpp = place_layers(8, 2, layers_per_vpp_stage=2)
    assert vpp.layers == (((0, 1), (4, 5)), ((2, 3), (6, 7)))
    assert [c[:2] for c in vpp.chunks()] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    with pytest.raises(PlacementError, match="--num-layer-list"):
        place_layers(6, 4)
    with pytest.raises(PlacementError, match="--num-layer-list 1,2"):
        place_layers(4, 2, [1, 2])
    with pytest.raises(PlacementError, match="--num-layers-per-virtual-pipeline-stage 4"):
        place_layers(12, 2, layers_per_vpp_stage=4)   # 6 layers per stage: 4 would drop two
    with pytest.raises(PlacementError, match="smaller"):
        place_layers(8, 2, layers_per_vpp_stage=4)
    assert pipeline_layout([1, 3]) == [["embedding", "decoder"], ["decoder"] * 3 + ["loss"]]


def test_config_reading(tiny_model_factory, tmp_path):
    fam, cfg = load_model_config(tiny_model_factory("qwen3"))
    assert fam.name == "qwen3" and cfg.qk_layernorm and cfg.kv_channels == 16 and cfg.rotary_base == 1e6
    raw = json.loads((tiny_model_factory("qwen3") / "config.json").read_text())
    del raw["rope_theta"]
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    assert family_for_config(raw).config(raw).rotary_base == 5e5
    assert get_family("qwen25").name == "qwen2" and get_family("llama2").name == "llama3"
    fam2, cfg2 = load_model_config(tiny_model_factory("qwen2"))
    assert cfg2.add_qkv_bias and not cfg2.qk_layernorm and cfg2.kv_channels == 16
    raw["architectures"] = ["GPT2LMHeadModel"]
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        family_for_config(raw)
    with pytest.raises(ConfigError, match="--model-type-hf bert"):
        get_family("bert")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="architectures"):
        load_model_config(tmp_path)


def test_spec_module_path_resolves():
    from megatron.core.transformer.spec_utils import ModuleSpec

    from mindspeed_llm.models.attention import SDPAttention
    from mindspeed_llm.models.spec import RMSNorm

    spec = getattr(importlib.import_module("mindspeed_llm.tasks.models.spec.qwen3_spec"), "layer_spec")
    assert isinstance(spec, ModuleSpec)
    attn = spec.submodules.self_attention.submodules
    assert attn.core_attention is SDPAttention and attn.q_layernorm is RMSNorm and attn.k_layernorm is RMSNorm
