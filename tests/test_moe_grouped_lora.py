"""LoRA on grouped experts (--moe-grouped-gemm: megatron-core GroupedMLP) on the tiny Qwen3-MoE, through
posttrain_gpt.py and convert_ckpt.py, in MindSpeed-LLM's grouped adapter layout (`weight1_lora_a` [H, r*E_loc],
`weight1_lora_b` [r, E_loc*2F], `weight2_lora_a` [E_loc*F, r], `weight2_lora_b` [r*E_loc, H]).

* 3 iterations equal LoRA on sequential experts (losses, grad norms, load-balancing losses): both layouts start
  from the same adapters (expert j's grouped factors are its sequential ones transposed), so any error in the
  grouped forward, its gradients or the mapping shows from the first grad norm on; EP2 and TP2 (+SP,
  expert TP 2) train as EP1.
* --lora-ckpt-filter saves the four grouped factors of every local expert and nothing else but the attention
  adapters; the mg -> hf merge of the EP2 run loaded in transformers' Qwen3MoeForCausalLM gives our unmerged
  logits (1e-5); a PEFT export of grouped adapters is one error line.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from tests.conftest import run_cli, run_torchrun
from tests.dist_logits import assert_cases_ok
from tests.test_moe_lora_dpo import LORA, TARGETS, _convert, _rank_state, moe_argv
from tests.test_moe_train import assert_close, lb_losses
from tests.train_fixtures import launch_plan

R, HIDDEN, NUM_EXPERTS, FFN = 4, 64, 8, 32
EP2 = ["--expert-model-parallel-size", "2"]


@pytest.fixture(scope="module")
def env(tiny_model_factory, tmp_path_factory) -> dict:
    """The tiny Qwen3-MoE, instruction demo data, and its conversions: sequential EP1, grouped EP1 and EP2."""
    from mindspeed_llm.checkpoint.hf2mg import Hf2MgOptions, convert_hf_to_mg
    from mindspeed_llm.demo_data import write_demo_data

    hf = tiny_model_factory("qwen3-moe")
    root = tmp_path_factory.mktemp("moe_grouped_lora")
    files = write_demo_data(root / "raw", n_train=60, n_test=5)
    run_cli("preprocess_data.py", "--tokenizer-name-or-path", str(hf), "--prompt-type", "qwen3", "--input",
            str(files["alpaca_train"]), "--handler-name", "AlpacaStyleInstructionHandler", "--output-prefix",
            str(root / "data" / "alpaca"), "--seq-length", "128")
    ckpt = {}
    for name, tp, ep, grouped in (("seq_ep1", 1, 1, False), ("grouped_ep1", 1, 1, True), ("grouped_ep2", 1, 2, True),
                                  ("grouped_tp2", 2, 1, True)):
        ckpt[name] = root / f"mg_{name}"
        convert_hf_to_mg(Hf2MgOptions(load_dir=hf, save_dir=ckpt[name], tp=tp, ep=ep, grouped_gemm=grouped),
                         log=lambda m: None)
    return {"root": root, "hf": hf, "data": str(root / "data" / "alpaca"), "ckpt": ckpt}


def _lora(env: dict, load: str, save: str, grouped: bool, *extra: str) -> list[str]:
    argv = moe_argv(env, 3, "--finetune", "--load", str(env["ckpt"][load]), "--save", str(env["root"] / save),
                    *LORA, "--lora-target-modules", *TARGETS, *extra)
    return argv + ["--moe-grouped-gemm"] if grouped else argv


@pytest.fixture(scope="module")
def runs(env) -> dict:
    single = launch_plan(env["root"], "grouped_lora_single", [
        {"name": "sequential", "argv": _lora(env, "seq_ep1", "lora_seq", False)},
        {"name": "grouped", "argv": _lora(env, "grouped_ep1", "lora_grouped", True)},
    ], nproc=1)
    double = launch_plan(env["root"], "grouped_lora_double", [
        {"name": "grouped_ep2", "argv": _lora(env, "grouped_ep2", "lora_grouped_ep2", True, *EP2)},
        # expert TP: B1 and A2 are split like weight1's columns and weight2's rows, A1 and B2 whole
        {"name": "grouped_tp2", "argv": _lora(env, "grouped_tp2", "lora_grouped_tp2", True,
                                              "--tensor-model-parallel-size", "2", "--sequence-parallel")},
    ], nproc=2)
    return {**single, **double}


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["grouped", "grouped_ep2", "grouped_tp2"])
def test_grouped_lora_trains_as_sequential_lora(runs, name):
    ref = runs["sequential"]
    assert_close(runs[name]["losses"], ref["losses"])
    assert_close(runs[name]["grad_norms"], ref["grad_norms"])
    assert_close(lb_losses(runs[name]), lb_losses(ref))
    assert ref["losses"][-1] < ref["losses"][0]


@pytest.mark.distributed
def test_filtered_save_holds_the_grouped_adapters(env, runs):
    """MindSpeed's keys and shapes, per EP rank; the base weights are not saved; the adapters of routed experts
    have trained (B left zero), and expert j's factors are those of the sequential run's expert j."""
    root, local = env["root"], NUM_EXPERTS // 2
    seq = _rank_state(root / "lora_seq", "mp_rank_00")
    for rank, rank_dir in enumerate(("mp_rank_00_000", "mp_rank_00_001")):
        state = _rank_state(root / "lora_grouped_ep2", rank_dir)
        assert all(".lora_" in k or k.endswith(("_lora_a", "_lora_b")) for k in state), sorted(state)
        for layer in range(4):
            experts = f"decoder.layers.{layer}.mlp.experts"
            assert f"{experts}.weight1" not in state
            shapes = {name: tuple(state[f"{experts}.{name}"].shape) for name in
                      ("weight1_lora_a", "weight1_lora_b", "weight2_lora_a", "weight2_lora_b")}
            assert shapes == {"weight1_lora_a": (HIDDEN, R * local), "weight1_lora_b": (R, local * 2 * FFN),
                              "weight2_lora_a": (local * FFN, R), "weight2_lora_b": (R * local, HIDDEN)}
            assert state[f"{experts}.weight1_lora_b"].abs().max() > 0
            a1 = state[f"{experts}.weight1_lora_a"].view(local, HIDDEN, R)
            b2 = state[f"{experts}.weight2_lora_b"].view(local, R, HIDDEN)
            for j in range(local):
                ours = f"{experts}.local_experts.{rank * local + j}"
                # A1 is trained too: equal to the sequential run's within the training tolerance
                torch.testing.assert_close(a1[j].T, seq[f"{ours}.linear_fc1.lora_A.default.weight"],
                                           rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(b2[j].T, seq[f"{ours}.linear_fc2.lora_B.default.weight"],
                                           rtol=1e-4, atol=1e-5)


@pytest.mark.distributed
def test_merged_export_equals_unmerged_grouped_lora_model(env, runs):
    root = env["root"]
    _convert("--load-dir", env["ckpt"]["grouped_ep2"], "--lora-load", root / "lora_grouped_ep2", "--save-dir",
             root / "merged_ep2", "--hf-cfg-dir", env["hf"])
    config = json.loads((root / "merged_ep2" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    merged = {"name": "grouped-lora-ep2", "hf_dir": str(env["hf"]), "mg_dir": str(env["ckpt"]["grouped_ep2"]),
              "tp": 1, "pp": 1, "ep": 2, "grouped": True, "tol": 1e-5,
              "lora": {"r": R, "alpha": 2 * R, "targets": TARGETS, "dir": str(root / "lora_grouped_ep2"),
                       "merged_dir": str(root / "merged_ep2")}}
    # the adapters matter: the base model's logits are not those of the LoRA model
    base = {**merged, "name": "grouped-base-differs", "tol": -1.0, "lora": {**merged["lora"], "merged_dir": str(
        env["hf"])}}
    (root / "cases.json").write_text(json.dumps([merged, base]))
    proc = run_torchrun("tests/dist_logits.py", str(root / "cases.json"), check=False)
    assert_cases_ok(proc.stdout, [merged], ranks=2)
    base_diff = re.search(r"CASE grouped-base-differs rank 0: max-abs (\S+)", proc.stdout)
    assert base_diff and float(base_diff.group(1)) > 1e-2, proc.stdout[-2000:]


@pytest.mark.distributed
def test_peft_export_of_grouped_adapters_is_one_error_line(env, runs):
    proc = run_cli("convert_ckpt.py", "--load-model-type", "mg", "--save-model-type", "hf", "--load-dir",
                   str(env["ckpt"]["grouped_ep2"]), "--lora-load", str(env["root"] / "lora_grouped_ep2"),
                   "--save-dir", str(env["root"] / "peft"), "--save-lora-to-hf", "--hf-cfg-dir", str(env["hf"]),
                   check=False)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "--save-lora-to-hf" in errors[0] and "--moe-grouped-gemm" in errors[0], errors
    assert not (env["root"] / "peft").exists()
