"""Qwen3-MoE: config reading against transformers, conversion round trips at TP/PP/EP, the expert layout on disk,
logits parity with transformers' Qwen3MoeForCausalLM (one process and torchrun), and bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mindspeed_llm.checkpoint import layout
from mindspeed_llm.checkpoint.layout import load_rank_file
from mindspeed_llm.models import family_for_config
from tests.conftest import run_cli, run_torchrun
from tests.dist_logits import assert_cases_ok
from tests.test_convert import convert, hf_tensors

# "routed": every layer MoE, top-k renormalised (norm_topk_prob, as Qwen3-30B-A3B); "mixed": layer 2 keeps a
# dense MLP (mlp_only_layers) and the top-k weights are not renormalised (norm_topk_prob false).
SHAPES = {"routed": {}, "mixed": {"norm_topk_prob": False, "mlp_only_layers": (2,)}}
LAYOUTS = {
    "ep2pp2": ["--target-expert-parallel-size", "2", "--target-pipeline-parallel-size", "2"],
    "tp2": ["--target-tensor-parallel-size", "2"],
    "tp2ep4pp2": ["--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "4",
                  "--target-pipeline-parallel-size", "2"],
}


@pytest.fixture(scope="module")
def moe_models(tiny_model_factory) -> dict[str, Path]:
    return {name: tiny_model_factory("qwen3-moe", **shape) for name, shape in SHAPES.items()}


def hf2mg(hf: Path, mg: Path, *flags: str) -> Path:
    convert("--load-dir", hf, "--save-dir", mg, "--model-type-hf", "qwen3-moe", *flags)
    return mg


def _error(capsys, *args) -> str:
    from mindspeed_llm.checkpoint import cli

    rc = cli.main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("mlp_only, step", [((), 1), ((1,), 1), ((), 2), ((0, 3), 3)])
def test_moe_layers_and_expert_count_read_as_transformers_does(mlp_only, step):
    """Which layers are MoE, from mlp_only_layers / decoder_sparse_step, is what transformers builds; the expert
    count is read from `num_experts` (published configs) and from `num_local_experts` (transformers' own save)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    hf = Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=24, moe_intermediate_size=8,
                        num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=6,
                        num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=list(mlp_only),
                        decoder_sparse_step=step, architectures=["Qwen3MoeForCausalLM"])
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(hf)
    saved = json.loads(hf.to_json_string(use_diff=False))
    assert "num_local_experts" in saved and "num_experts" not in saved
    published = {("num_experts" if k == "num_local_experts" else k): v for k, v in saved.items()}
    for raw in (saved, published):
        fam = family_for_config(raw)
        cfg = fam.config(raw)
        assert fam.name == "qwen3-moe" and cfg.num_experts == 6 and cfg.moe_router_topk == 2
        assert cfg.moe_ffn_hidden_size == 8 and cfg.norm_topk_prob and cfg.moe_aux_loss_coeff == 0.001
        assert [cfg.is_moe_layer(i) for i in range(4)] == [isinstance(layer.mlp, Qwen3MoeSparseMoeBlock)
                                                           for layer in model.model.layers]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_round_trip_is_bit_exact(moe_models, shape, tmp_path):
    """hf -> mg -> hf through convert_ckpt.py gives back every published tensor bit for bit, at EP2 x PP2, TP2 and
    TP2 x EP4 x PP2."""
    src = moe_models[shape]
    original = hf_tensors(src)
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in original
    for name, flags in LAYOUTS.items():
        mg = hf2mg(src, tmp_path / f"mg_{name}", *flags)
        back = tmp_path / f"hf_{name}"
        convert("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg, "--save-dir", back,
                "--hf-cfg-dir", src)
        restored = hf_tensors(back)
        assert sorted(restored) == sorted(original), name
        for key, tensor in original.items():
            assert torch.equal(restored[key], tensor), (name, key)
        assert (back / "config.json").read_bytes() == (src / "config.json").read_bytes()


def test_expert_layout_on_disk(moe_models, tmp_path):
    """MindSpeed's layout: `mp_rank_TT_PPP_EEE` directories; expert e on EP rank e // E_loc as local expert
    e % E_loc; per TP rank fc1 = [gate rows of chunk t ; up rows of chunk t], fc2 = down columns of chunk t; the
    router whole on every rank; a dense layer keeps the dense MLP."""
    src = moe_models["mixed"]
    hf = hf_tensors(src)
    mg = hf2mg(src, tmp_path / "mg", "--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2",
               "--target-pipeline-parallel-size", "2")
    ranks = sorted(p.name for p in (mg / "iter_0000001").iterdir())
    assert ranks == [f"mp_rank_{t:02d}_{p:03d}_{e:03d}" for t in range(2) for p in range(2) for e in range(2)]
    state = load_rank_file(mg / "iter_0000001" / "mp_rank_01_000_001" / layout.FILE_NAME, mmap=False)
    args, sd = state["args"], state["model"]
    assert (args.expert_model_parallel_size, args.num_experts, args.moe_router_topk) == (2, 8, 2)
    assert args.moe_ffn_hidden_size == 32 and args.norm_topk_prob is False and args.moe_layer_freq == [1, 1, 0, 1]
    # TP rank 1, EP rank 1, layer 1: local expert 1 is HF expert 5 (E_loc = 4), rows/columns 16:32 of F = 32.
    hf_expert = "model.layers.1.mlp.experts.5."
    fc1 = sd["decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight"]
    assert torch.equal(fc1, torch.cat([hf[hf_expert + "gate_proj.weight"][16:], hf[hf_expert + "up_proj.weight"][16:]]))
    assert torch.equal(sd["decoder.layers.1.mlp.experts.local_experts.1.linear_fc2.weight"],
                       hf[hf_expert + "down_proj.weight"][:, 16:])
    assert torch.equal(sd["decoder.layers.1.mlp.router.weight"], hf["model.layers.1.mlp.gate.weight"])
    assert not any(".local_experts.4." in k for k in sd)
    # PP stage 1 holds layers 2 (dense, local 0) and 3 (MoE, local 1)
    last = load_rank_file(mg / "iter_0000001" / "mp_rank_00_001_000" / layout.FILE_NAME, mmap=False)["model"]
    assert "decoder.layers.0.mlp.linear_fc1.weight" in last and "decoder.layers.0.mlp.router.weight" not in last
    down = hf["model.layers.2.mlp.down_proj.weight"]
    assert torch.equal(last["decoder.layers.0.mlp.linear_fc2.weight"], down[:, :64])
    assert "decoder.layers.1.mlp.router.weight" in last and "decoder.layers.1.mlp.linear_fc1.weight" not in last


@pytest.mark.parametrize("shape", list(SHAPES))
def test_logits_match_transformers_in_one_process(moe_models, shape, tmp_path):
    """convert_ckpt.py --verify: our GPTModel with megatron-core's MoELayer (EP 1) against Qwen3MoeForCausalLM,
    fp32, within 1e-5 (renormalised and plain top-k routing)."""
    proc = run_cli("convert_ckpt.py", "--load-dir", str(moe_models[shape]), "--save-dir", str(tmp_path / "mg"),
                   *LAYOUTS["ep2pp2"], "--verify", "--verify-threshold", "1e-5")
    assert "[verify] logits max-abs diff" in proc.stdout and proc.stdout.rstrip().endswith("OK"), proc.stdout


@pytest.mark.distributed
def test_logits_match_transformers_at_ep2_and_tp2_under_torchrun(moe_models, tmp_path):
    cases = []
    for shape, name, flags, tp, ep in (("routed", "ep2", ["--target-expert-parallel-size", "2"], 1, 2),
                                       ("routed", "tp2", ["--target-tensor-parallel-size", "2"], 2, 1),
                                       ("mixed", "ep2", ["--target-expert-parallel-size", "2"], 1, 2)):
        mg = hf2mg(moe_models[shape], tmp_path / f"{shape}_{name}", *flags)
        cases.append({"name": f"{shape}-{name}", "hf_dir": str(moe_models[shape]), "mg_dir": str(mg), "tp": tp,
                      "pp": 1, "ep": ep, "tol": 1e-5})
    cases_file = tmp_path / "cases.json"
    cases_file.write_text(json.dumps(cases))
    proc = run_torchrun("tests/dist_logits.py", str(cases_file))
    assert_cases_ok(proc.stdout, cases, ranks=2)


def test_bad_input_errors(moe_models, tiny_qwen3, capsys, tmp_path):
    src, out = moe_models["routed"], tmp_path / "out"
    err = _error(capsys, "--load-dir", src, "--save-dir", out, "--target-expert-parallel-size", "3")
    assert "--target-expert-parallel-size 3 does not divide num_experts=8" in err and "[1, 2, 4, 8]" in err
    err = _error(capsys, "--load-dir", tiny_qwen3, "--save-dir", out, "--target-expert-parallel-size", "2")
    assert "--target-expert-parallel-size 2: qwen3 is a dense model" in err
    assert not out.exists() or not any(out.iterdir())
    mg = hf2mg(src, tmp_path / "mg", "--target-expert-parallel-size", "2")
    err = _error(capsys, "--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg, "--save-dir",
                 tmp_path / "hf", "--target-expert-parallel-size", "1")
    assert "--target-expert-parallel-size 1" in err and "saved with 2" in err
    assert not (tmp_path / "hf").exists()
    # the real script: one line on stderr, exit 2, nothing written
    proc = run_cli("convert_ckpt.py", "--load-dir", str(src), "--save-dir", str(out), "--target-expert-parallel-size",
                   "16", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --target-expert-parallel-size 16 does not divide num_experts=8; choose one of [1, 2, 4, 8]"]
    assert not out.exists() or not any(out.iterdir())
