"""LoRA and DPO on the tiny Qwen3-MoE model (8 experts, top-2, 4 MoE layers) through posttrain_gpt.py and
convert_ckpt.py.

* LoRA: every local expert's linear_fc1/linear_fc2 gets adapters, the router none; EP2 and TP2 (+SP) train as
  EP1 (losses, grad norms, load-balancing loss, 3 iterations); the mg -> hf merge of an EP2 run, loaded in
  transformers' Qwen3MoeForCausalLM, gives our unmerged logits; the PEFT export writes each expert's adapters under
  MindSpeed's HF names (fc1's A for gate and up, B split in halves), and an attention-only export loaded by
  `peft` gives our unmerged logits (LoRA with --moe-grouped-gemm: tests/test_moe_grouped_lora.py).
* DPO: the first step's loss, metrics and (without the aux loss) gradients equal the DPO formula over
  transformers' Qwen3-MoE log-probs; with the aux loss the reported loss is still the DPO loss alone and the
  load-balancing loss is logged; EP2 trains as EP1.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli, run_torchrun
from tests.dist_logits import assert_cases_ok
from tests.test_dpo import METRICS, SEQ, grads_in_megatron_layout, megatron_weights, reference_step, rel
from tests.test_moe_train import assert_close, lb_losses, train_argv
from tests.train_fixtures import launch_plan

pytest.importorskip("peft", reason="peft is the LoRA reference (pip install -e '.[test]')")

TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
LORA = ["--lora-r", "4", "--lora-alpha", "8", "--lora-ckpt-filter", "--lr", "1e-2"]
EP2 = ["--expert-model-parallel-size", "2"]
NUM_EXPERTS, FFN = 8, 32
DPO_LR = 1000.0


def moe_argv(env: dict, iters: int, *extra: str) -> list[str]:
    """test_moe_train's recipe flags without --moe-grouped-gemm (sequential experts: the layout LoRA adapts)."""
    return [a for a in train_argv(env, iters, *extra) if a != "--moe-grouped-gemm"]


def dpo_argv(env: dict, iters: int, load: str, ref: str, *extra: str) -> list[str]:
    argv = moe_argv(env, iters, "--finetune", "--load", str(env["ckpt"][load]), "--ref-model",
                    str(env["ckpt"][ref]), "--dpo-beta", "0.1", *extra)
    argv[argv.index("--stage") + 1] = "dpo"
    argv[argv.index("--is-instruction-dataset")] = "--is-pairwise-dataset"
    argv[argv.index("--data-path") + 1] = env["pairs"]
    argv[argv.index("--seq-length") + 1] = str(SEQ)
    return argv


def _perturbed_copy(src: Path, out: Path, scale: float = 0.05) -> Path:
    """The HF model in `src` with noise added to every weight, file by file (a DPO reference unlike the policy)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    gen = torch.Generator().manual_seed(7)
    for path in sorted(out.glob("*.safetensors")):
        tensors = load_file(str(path))
        save_file({k: v + scale * torch.randn(v.shape, generator=gen) for k, v in tensors.items()}, str(path),
                  metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def env(tiny_model_factory, tmp_path_factory) -> dict:
    """The tiny Qwen3-MoE and a perturbed copy (DPO reference), instruction and pairwise demo data, EP1/EP2
    conversions of both and a TP2 one of the model."""
    from mindspeed_llm.checkpoint.hf2mg import Hf2MgOptions, convert_hf_to_mg
    from mindspeed_llm.demo_data import write_demo_data

    hf = tiny_model_factory("qwen3-moe")
    root = tmp_path_factory.mktemp("moe_lora_dpo")
    hf_ref = _perturbed_copy(hf, root / "hf_ref")
    files = write_demo_data(root / "raw", n_train=60, n_test=5)
    common = ["--tokenizer-name-or-path", str(hf), "--prompt-type", "qwen3"]
    run_cli("preprocess_data.py", *common, "--input", str(files["alpaca_train"]), "--handler-name",
            "AlpacaStyleInstructionHandler", "--output-prefix", str(root / "data" / "alpaca"), "--seq-length", "128")
    run_cli("preprocess_data.py", *common, "--input", str(files["pairwise_train"]), "--handler-name",
            "AlpacaStylePairwiseHandler", "--output-prefix", str(root / "pairs" / "pairs"))
    ckpt = {}
    for name, src in (("base", hf), ("ref", hf_ref)):
        for ep in (1, 2):
            ckpt[f"{name}_ep{ep}"] = root / f"mg_{name}_ep{ep}"
            convert_hf_to_mg(Hf2MgOptions(load_dir=src, save_dir=ckpt[f"{name}_ep{ep}"], ep=ep), log=lambda m: None)
    ckpt["base_tp2"] = root / "mg_base_tp2"
    convert_hf_to_mg(Hf2MgOptions(load_dir=hf, save_dir=ckpt["base_tp2"], tp=2), log=lambda m: None)
    return {"root": root, "hf": hf, "hf_ref": hf_ref, "data": str(root / "data" / "alpaca"),
            "pairs": str(root / "pairs" / "pairs"), "ckpt": ckpt}


def lora_argv(env: dict, load: str, save: str, targets: list[str], *extra: str) -> list[str]:
    return moe_argv(env, 3, "--finetune", "--load", str(env["ckpt"][load]), "--save", str(env["root"] / save),
                    *LORA, "--lora-target-modules", *targets, *extra)


def sgd(*extra: str) -> list[str]:
    return ["--optimizer", "sgd", "--sgd-momentum", "0", "--weight-decay", "0", "--clip-grad", "0", "--lr",
            str(DPO_LR), "--min-lr", str(DPO_LR), "--lr-warmup-iters", "0", "--lr-decay-style", "constant", *extra]


@pytest.fixture(scope="module")
def single(env) -> dict:
    root = env["root"]
    plan = [
        {"name": "lora", "argv": lora_argv(env, "base_ep1", "lora_ep1", TARGETS)},
        {"name": "lora_attn", "argv": lora_argv(env, "base_ep1", "lora_attn", ["linear_qkv", "linear_proj"])},
        # no aux loss: the gradients are DPO's alone
        {"name": "dpo_sgd", "argv": dpo_argv(env, 1, "base_ep1", "ref_ep1", *sgd(
            "--moe-router-load-balancing-type", "none", "--save", str(root / "dpo_sgd")))},
        {"name": "dpo", "argv": dpo_argv(env, 3, "base_ep1", "ref_ep1")},
    ]
    return launch_plan(root, "moe_lora_dpo_single", plan, nproc=1)


@pytest.fixture(scope="module")
def double(env) -> dict:
    plan = [
        {"name": "lora_ep2", "argv": lora_argv(env, "base_ep2", "lora_ep2", TARGETS, *EP2)},
        # expert TP: the adapters leave the token sums to the dispatcher, as the experts' linears do
        {"name": "lora_tp2", "argv": lora_argv(env, "base_tp2", "lora_tp2", TARGETS, "--tensor-model-parallel-size",
                                               "2", "--sequence-parallel")},
        {"name": "dpo_ep2", "argv": dpo_argv(env, 3, "base_ep2", "ref_ep2", *EP2)},
    ]
    return launch_plan(env["root"], "moe_lora_dpo_double", plan, nproc=2)


def _rank_state(save: Path, rank_dir: str) -> dict:
    from mindspeed_llm.checkpoint import layout

    iteration = int((save / layout.TRACKER).read_text().strip())
    return layout.load_pt(save / layout.iter_dir_name(iteration) / rank_dir / layout.FILE_NAME)["model"]


def _convert(*args) -> str:
    proc = run_cli("convert_ckpt.py", "--load-model-type", "mg", "--save-model-type", "hf", *map(str, args))
    return proc.stdout + proc.stderr


# --- LoRA --------------------------------------------------------------------------------------------------------

@pytest.mark.distributed
def test_lora_adapts_every_expert_and_ep2_tp2_train_as_ep1(env, single, double):
    ref = single["lora"]
    for name in ("lora_ep2", "lora_tp2"):
        assert_close(double[name]["losses"], ref["losses"])
        assert_close(double[name]["grad_norms"], ref["grad_norms"])
        assert_close(lb_losses(double[name]), lb_losses(ref))
    assert ref["losses"][-1] < ref["losses"][0]
    for rank_dir in ("mp_rank_00_000", "mp_rank_00_001"):
        state = _rank_state(env["root"] / "lora_ep2", rank_dir)
        assert all(".lora_" in k for k in state)                       # --lora-ckpt-filter: adapters only
        assert not any(".router." in k for k in state)                 # the router is never adapted
        for layer in range(4):
            for fc in ("linear_fc1", "linear_fc2"):
                # every local expert has adapters; those of experts that were routed tokens have trained
                b = [state[f"decoder.layers.{layer}.mlp.experts.local_experts.{j}.{fc}.lora_B.default.weight"]
                     for j in range(NUM_EXPERTS // 2)]
                assert sum(bool(x.abs().max() > 0) for x in b) >= 2, (rank_dir, layer, fc)


@pytest.fixture(scope="module")
def exports(env, single, double) -> dict:
    """The EP2 run merged into HF weights and exported as a PEFT adapter, the attention-only run exported as a
    PEFT adapter, and one dist_logits launch comparing our unmerged models with them."""
    root = env["root"]
    _convert("--load-dir", env["ckpt"]["base_ep2"], "--lora-load", root / "lora_ep2", "--save-dir",
             root / "merged_ep2", "--hf-cfg-dir", env["hf"])
    peft_log = _convert("--load-dir", env["ckpt"]["base_ep2"], "--lora-load", root / "lora_ep2", "--save-dir",
                        root / "peft_ep2", "--save-lora-to-hf", "--hf-cfg-dir", env["hf"])
    _convert("--load-dir", env["ckpt"]["base_ep1"], "--lora-load", root / "lora_attn", "--save-dir",
             root / "peft_attn", "--save-lora-to-hf", "--hf-cfg-dir", env["hf"])
    merged = {"name": "moe-lora-ep2", "hf_dir": str(env["hf"]), "mg_dir": str(env["ckpt"]["base_ep2"]), "tp": 1,
              "pp": 1, "ep": 2, "tol": 1e-5, "lora": {"r": 4, "alpha": 8, "targets": TARGETS,
                                                      "dir": str(root / "lora_ep2"),
                                                      "merged_dir": str(root / "merged_ep2")}}
    cases = [merged,
             # the adapters matter: the base model's logits are not those of the LoRA model
             {**merged, "name": "base-differs", "tol": -1.0, "lora": {**merged["lora"], "merged_dir": str(env["hf"])}},
             {"name": "moe-peft-attn", "hf_dir": str(env["hf"]), "mg_dir": str(env["ckpt"]["base_ep1"]), "tp": 1,
              "pp": 1, "tol": 1e-5, "lora": {"r": 4, "alpha": 8, "targets": ["linear_qkv", "linear_proj"],
                                             "dir": str(root / "lora_attn"), "peft_dir": str(root / "peft_attn")}}]
    (root / "cases.json").write_text(json.dumps(cases))
    proc = run_torchrun("tests/dist_logits.py", str(root / "cases.json"), check=False)
    return {"cases": {c["name"]: c for c in cases}, "stdout": proc.stdout, "peft_log": peft_log}


@pytest.mark.distributed
def test_merged_export_equals_unmerged_lora_model(env, exports):
    """The mg -> hf merge of the EP2 run loads in transformers' Qwen3MoeForCausalLM with the logits of our
    unmerged EP2 model."""
    config = json.loads((env["root"] / "merged_ep2" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert_cases_ok(exports["stdout"], [exports["cases"]["moe-lora-ep2"]], ranks=2)
    base_diff = re.search(r"CASE base-differs rank 0: max-abs (\S+)", exports["stdout"])
    assert base_diff and float(base_diff.group(1)) > 1e-2, exports["stdout"][-2000:]


@pytest.mark.distributed
def test_peft_export_of_expert_and_attention_adapters(env, exports):
    from safetensors.torch import load_file

    root = env["root"]
    assert "MindSpeed's per-expert names" in exports["peft_log"]
    peft = load_file(str(root / "peft_ep2" / "adapter_model.safetensors"))
    ours = _rank_state(root / "lora_ep2", "mp_rank_00_001")     # experts 4..7
    for layer, expert in ((0, 5), (3, 7)):
        local = f"decoder.layers.{layer}.mlp.experts.local_experts.{expert - 4}"
        hf = f"base_model.model.model.layers.{layer}.mlp.experts.{expert}"
        a1, b1 = ours[f"{local}.linear_fc1.lora_A.default.weight"], ours[f"{local}.linear_fc1.lora_B.default.weight"]
        assert torch.equal(peft[f"{hf}.gate_proj.lora_A.weight"], a1)
        assert torch.equal(peft[f"{hf}.up_proj.lora_A.weight"], a1)
        assert torch.equal(peft[f"{hf}.gate_proj.lora_B.weight"], b1[:FFN])     # fc1 rows: [gate; up]
        assert torch.equal(peft[f"{hf}.up_proj.lora_B.weight"], b1[FFN:])
        assert torch.equal(peft[f"{hf}.down_proj.lora_A.weight"], ours[f"{local}.linear_fc2.lora_A.default.weight"])
        assert torch.equal(peft[f"{hf}.down_proj.lora_B.weight"], ours[f"{local}.linear_fc2.lora_B.default.weight"])
    assert not any(".gate.lora" in k for k in peft)                  # no router adapters
    # Attention adapters alone: peft holds them on the HF model, which then gives our unmerged logits.
    assert_cases_ok(exports["stdout"], [exports["cases"]["moe-peft-attn"]], ranks=2)


# --- DPO ---------------------------------------------------------------------------------------------------------

@pytest.mark.distributed
def test_dpo_first_step_equals_formula_over_transformers(env, single):
    want = reference_step({**env, "data": env["pairs"]}, "sigmoid", 0.0, 0.0)
    got = single["dpo_sgd"]
    assert rel(got["losses"][0], want["loss"]) < 1e-5, (got["losses"], want["loss"])
    for key in METRICS:
        g, w = got["metrics"][0][key], want["metrics"][key]
        assert abs(g - w) <= 1e-5 * max(abs(w), 1e-1), (key, g, w)
    total = math.sqrt(sum(float((g ** 2).sum()) for g in want["grads"].values()))
    assert total > 0 and rel(got["grad_norms"][0], total) < 1e-5
    w0 = megatron_weights(env["ckpt"]["base_ep1"], 1)
    w1 = megatron_weights(env["root"] / "dpo_sgd", 1)
    grads = grads_in_megatron_layout(env, want, "moe")
    assert grads.keys() == w0.keys() == w1.keys()
    for key, g in grads.items():
        ours = (w0[key].double() - w1[key].double()) / DPO_LR
        err = float((ours - g.double()).norm() / g.double().norm().clamp(min=1e-30))
        assert err < 1e-5 or float((ours - g.double()).abs().max()) < 1e-9, (key, err)
    # With the aux loss in the objective the reported loss is still the DPO loss (the reference adds none).
    aux = single["dpo"]
    assert rel(aux["losses"][0], want["loss"]) < 1e-5
    for key in METRICS:                                              # logged beside the load-balancing loss
        assert abs(aux["metrics"][0][key] - want["metrics"][key]) <= 1e-5 * max(abs(want["metrics"][key]), 1e-1)
    lb = lb_losses(aux)
    assert len(lb) == 3 and all(1.0 <= x <= 4.0 for x in lb), lb


@pytest.mark.distributed
def test_dpo_ep2_trains_as_ep1(single, double):
    ref, ep2 = single["dpo"], double["dpo_ep2"]
    assert_close(ep2["losses"], ref["losses"])
    assert_close(ep2["grad_norms"], ref["grad_norms"])
    assert_close(lb_losses(ep2), lb_losses(ref))
    for gm, wm in zip(ep2["metrics"], ref["metrics"]):
        for key in METRICS:
            assert abs(gm[key] - wm[key]) <= 1e-5 * max(abs(wm[key]), 1e-1), (key, gm[key], wm[key])
