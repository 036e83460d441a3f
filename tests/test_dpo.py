"""posttrain_gpt.py --stage dpo on the tiny Qwen3 model.

* One step's loss, rewards, log-probs and gradients equal the published DPO / IPO / hinge formulas evaluated on
  the transformers model over the same pairs (fp32). Gradients are read from a plain SGD step (lr 1000, no
  momentum, decay or clipping): (w0 - w1) / lr, compared with the transformers gradients carried through the
  project's HF -> Megatron converter.
* TP2 (+SP), PP2 (fixed and dynamic padding, and interleaved) and DP2 losses and metrics equal TP1 for 3 steps.
* Packed pairs (--reset-attention-mask: one THD row per micro-batch) give the losses, metrics and grad norms of
  dynamic padding for 3 steps, sigmoid and IPO (+ pref-ftx), at TP1, TP2 (+SP), PP2 and DP2.
* A resumed run (reference recorded in its checkpoint) continues exactly.
Data: pairwise records written here, preprocessed with preprocess_data.py (AlpacaStylePairwiseHandler).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import REPO, run_cli, run_torchrun
from tests.train_fixtures import launch_plan, model_flags, train_flags

SEQ = 64
BETA = 0.1
LR = 1000.0
# (name, loss type, label smoothing, pref-ftx): together they cover every term of the loss.
LOSS_CASES = [("sigmoid", "sigmoid", 0.1, 0.5), ("hinge", "hinge", 0.0, 0.0), ("ipo", "ipo", 0.0, 0.3)]
LORA = ["--lora-target-modules", "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "--lora-r", "8",
        "--lora-alpha", "16"]
PACKED, DYNAMIC = ["--reset-attention-mask"], ["--no-pad-to-seq-lengths"]
IPO = ["--dpo-loss-type", "ipo", "--pref-ftx", "0.3"]       # IPO's means use the per-segment token counts
TP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dpo_env(tmp_path_factory, tiny_qwen3) -> dict:
    """Pairwise data; the tiny model (policy start) and a perturbed copy (reference), both converted to
    TP1PP1, TP2PP1, TP1PP2 and TP1PP2 with 2 virtual stages per rank."""
    from transformers import AutoModelForCausalLM

    from mindspeed_llm.checkpoint.hf2mg import Hf2MgOptions, convert_hf_to_mg
    from mindspeed_llm.demo_data import generate_examples

    root = tmp_path_factory.mktemp("dpo")
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(root / "hf_ref")
    examples = list(generate_examples(80, seed=3))
    with open(root / "pairs.jsonl", "w") as f:
        for i, ex in enumerate(examples):
            f.write(json.dumps({"instruction": ex["instruction"], "input": ex["input"], "chosen": ex["output"],
                                "rejected": examples[(i + 7) % len(examples)]["output"]}) + "\n")
    run_cli("preprocess_data.py", "--input", str(root / "pairs.jsonl"), "--tokenizer-name-or-path", str(tiny_qwen3),
            "--output-prefix", str(root / "data" / "pairs"), "--handler-name", "AlpacaStylePairwiseHandler",
            "--prompt-type", "qwen3")
    ckpt = {}
    for name, src in (("base", tiny_qwen3), ("ref", root / "hf_ref")):
        for tp, pp, vpp in ((1, 1, None), (2, 1, None), (1, 2, None), (1, 2, 1)):
            key = (name, tp, pp) if vpp is None else (name, "vpp")
            ckpt[key] = root / f"mg_{name}_tp{tp}pp{pp}{'_vpp' if vpp else ''}"
            convert_hf_to_mg(Hf2MgOptions(load_dir=Path(src), save_dir=ckpt[key], tp=tp, pp=pp,
                                          layers_per_vpp_stage=vpp), log=lambda m: None)
    return {"root": root, "hf": tiny_qwen3, "hf_ref": root / "hf_ref", "data": str(root / "data" / "pairs"),
            "ckpt": ckpt}


def dpo_flags(env: dict, iters: int, tp: int = 1, pp: int = 1, ref: bool = True) -> list[str]:
    flags = model_flags(env["hf"]) + train_flags(iters, SEQ)
    flags[flags.index("sft")] = "dpo"
    flags += ["--is-pairwise-dataset", "--data-path", env["data"], "--dpo-beta", str(BETA),
              "--load", str(env["ckpt"][("base", tp, pp)]), "--finetune"]
    if ref:
        flags += ["--ref-model", str(env["ckpt"][("ref", tp, pp)])]
    return flags


def sgd_step(env: dict, loss_type: str, smoothing: float, ftx: float, save: Path) -> list[str]:
    argv = dpo_flags(env, 1) + ["--dpo-loss-type", loss_type, "--dpo-label-smoothing", str(smoothing),
                                "--pref-ftx", str(ftx), "--optimizer", "sgd", "--sgd-momentum", "0",
                                "--weight-decay", "0", "--clip-grad", "0", "--lr", str(LR), "--min-lr", str(LR),
                                "--lr-warmup-iters", "0", "--lr-decay-style", "constant", "--save", str(save)]
    return argv


def launch(env: dict, name: str, plan: list[dict], nproc: int) -> dict:
    return launch_plan(env["root"], name, plan, nproc)


@pytest.fixture(scope="module")
def single(dpo_env) -> dict:
    """One process: an SGD step per loss case, the 3-step TP1 reference, and a resume (default reference)."""
    env, root = dpo_env, dpo_env["root"]
    plan = [{"name": name, "argv": sgd_step(env, kind, ls, ftx, root / f"sgd_{name}")}
            for name, kind, ls, ftx in LOSS_CASES]
    plan.append({"name": "tp1", "argv": dpo_flags(env, 3)})
    plan += [{"name": "dynamic", "argv": dpo_flags(env, 3) + DYNAMIC},
             {"name": "packed", "argv": dpo_flags(env, 3) + PACKED},
             {"name": "ipo_dynamic", "argv": dpo_flags(env, 3) + DYNAMIC + IPO},
             {"name": "ipo_packed", "argv": dpo_flags(env, 3) + PACKED + IPO}]
    # The converted reference's iteration named explicitly: the same reference as the tracker's.
    plan.append({"name": "refer_iter",
                 "argv": dpo_flags(env, 1) + ["--refer-model-iter", "1", "--lr-warmup-iters", "0"]})
    plan.append({"name": "lora_tp1", "argv": dpo_flags(env, 3) + LORA + ["--save", str(root / "lora_tp1")]})
    # Evaluation on a held-out split runs the reference and the DPO loss forward-only.
    evaluated = dpo_flags(env, 2) + ["--split", "90,10,0", "--eval-interval", "1", "--eval-iters", "1"]
    plan.append({"name": "eval", "argv": evaluated})
    base = dpo_flags(env, 4, ref=False)
    first = base
    again = [a for a in base if a != "--finetune"]
    again[again.index("--load") + 1] = str(root / "resume_b")
    plan += [
        {"name": "straight", "argv": first + ["--save", str(root / "resume_a"), "--save-interval", "2"]},
        {"name": "half", "argv": first + ["--save", str(root / "resume_b"), "--exit-interval", "2"]},
        {"name": "resumed", "argv": again + ["--save", str(root / "resume_b")]},
    ]
    return launch(env, "dpo_single", plan, nproc=1)


@pytest.fixture(scope="module")
def double(dpo_env) -> dict:
    """Two processes: TP2 with sequence parallelism, PP2 with fixed and dynamic padding, DP2 (distributed
    optimizer), interleaved PP2, packed pairs at TP2, PP2 and DP2, and MindSpeed-LLM's recipe."""
    env = dpo_env
    plan = [
        {"name": "tp2", "argv": dpo_flags(env, 3, tp=2) + TP2},
        {"name": "tp2_packed", "argv": dpo_flags(env, 3, tp=2) + TP2 + PACKED},
        {"name": "tp2_ipo_packed", "argv": dpo_flags(env, 3, tp=2) + TP2 + PACKED + IPO},
        {"name": "pp2_packed", "argv": dpo_flags(env, 3, pp=2) + ["--pipeline-model-parallel-size", "2"] + PACKED},
        {"name": "dp2_packed", "argv": dpo_flags(env, 3) + PACKED},
        {"name": "pp2", "argv": dpo_flags(env, 3, pp=2) + ["--pipeline-model-parallel-size", "2"]},
        {"name": "pp2_dynamic", "argv": dpo_flags(env, 3, pp=2) + ["--pipeline-model-parallel-size", "2",
                                                                   "--no-pad-to-seq-lengths"]},
        {"name": "dp2", "argv": dpo_flags(env, 3) + ["--use-distributed-optimizer"]},
        {"name": "vpp2", "argv": vpp_flags(env)},
        {"name": "lora_tp2", "argv": dpo_flags(env, 3, tp=2) + LORA + TP2},
    ]
    recipe = mindspeed_recipe(env)
    if recipe is not None:
        plan.append({"name": "recipe", "argv": recipe})
    return launch(env, "dpo_double", plan, nproc=2)


def vpp_flags(env: dict) -> list[str]:
    """PP2 with the interleaved schedule (one layer per virtual stage), policy and reference."""
    argv = dpo_flags(env, 3, pp=2) + ["--pipeline-model-parallel-size", "2",
                                      "--num-layers-per-virtual-pipeline-stage", "1"]
    argv[argv.index("--load") + 1] = str(env["ckpt"][("base", "vpp")])
    argv[argv.index("--ref-model") + 1] = str(env["ckpt"][("ref", "vpp")])
    return argv


MOE_FLAGS = re.compile(r"^--(moe-.*|num-experts|first-k-dense-replace|norm-topk-prob)$")


def mindspeed_recipe(env: dict) -> list[str] | None:
    """MindSpeed-LLM's published DPO recipe (qwen3_moe/dpo_*) without its MoE flags, shapes and sizes edited for
    the tiny model (2 iterations at DP2); None when the reference list is absent."""
    from tests.recipes import REFERENCE, edit, split_flags

    if not REFERENCE.is_file():
        return None
    found = re.search(r"^## qwen3_moe/dpo_\S+\n`torchrun posttrain_gpt.py` \(\d+ flags\)\n```\n(.*?)```",
                      REFERENCE.read_text(), re.M | re.S)
    if found is None:
        return None
    flags = split_flags(found.group(1).split())
    flags = [f for f in flags if not MOE_FLAGS.match(f[0])]
    paths = {"--tokenizer-name-or-path": str(env["hf"]), "--data-path": env["data"],
             "--load": str(env["ckpt"][("base", 1, 1)]), "--save": str(env["root"] / "recipe_save")}
    return edit(flags, paths, {"--seq-length": str(SEQ)})


# ---------------------------------------------------------------------------------------------------------------
# The independent implementation: published formulas over transformers logits
# ---------------------------------------------------------------------------------------------------------------

def sequence_logp(model, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of log p(token) over the answer tokens, and their number (labels != -100, next-token aligned)."""
    logits = model(ids[None]).logits[0, :-1].float()
    target = labels[1:]
    mask = target != -100
    token_logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[:, None])[:, 0]
    return (token_logp * mask).sum(), int(mask.sum())


def reference_step(env: dict, loss_type: str, smoothing: float, ftx: float) -> dict:
    """Loss, metrics and gradients of the first global batch (2 micro-batches x 2 pairs) on transformers."""
    from transformers import AutoModelForCausalLM

    from mindspeed_llm.training.sft_dataset import SFTDataOptions, build_sft_datasets

    opts = SFTDataOptions(seq_length=SEQ, seed=42, pairwise=True)
    ds = build_sft_datasets(env["data"], "100,0,0", [4, 0, 0], opts)[0]
    policy = AutoModelForCausalLM.from_pretrained(env["hf"], dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(env["hf_ref"], dtype=torch.float32)
    losses, rows = [], []
    for i in range(4):
        s = ds[i]
        out = {}
        for side in ("chosen", "rejected"):
            ids, labels = torch.tensor(s[f"{side}_input_ids"]), torch.tensor(s[f"{side}_labels"])
            logp, n = sequence_logp(policy, ids, labels)
            with torch.no_grad():
                ref_logp, _ = sequence_logp(ref, ids, labels)
            out[side] = (logp, ref_logp, n)
        (pc, rc, nc), (pr, rr, nr) = out["chosen"], out["rejected"]
        sft_nll = -pc / nc
        if loss_type == "ipo":                      # IPO compares length-averaged log-probs
            pc, rc, pr, rr = pc / nc, rc / nc, pr / nr, rr / nr
        z = (pc - pr) - (rc - rr)
        if loss_type == "sigmoid":                  # DPO (Rafailov et al.), robust cDPO smoothing
            loss = -(1 - smoothing) * F.logsigmoid(BETA * z) - smoothing * F.logsigmoid(-BETA * z)
        elif loss_type == "hinge":                  # SLiC hinge
            loss = torch.relu(1 - BETA * z)
        else:                                       # IPO (Azar et al.)
            loss = (z - 1 / (2 * BETA)) ** 2
        losses.append(loss + ftx * sft_nll)
        cr, rj = BETA * (pc - rc).detach(), BETA * (pr - rr).detach()
        rows.append([float(cr), float(rj), float(cr > rj), float(cr - rj), float(pc.detach()), float(pr.detach())])
    total = (sum(losses[:2]) / 2 + sum(losses[2:]) / 2) / 2      # mean of the micro-batch means
    total.backward()
    metrics = {name: sum(r[k] for r in rows) / 4 for k, name in enumerate(METRICS)}
    grads = {name: p.grad.detach().clone() for name, p in policy.named_parameters()}
    return {"loss": float(total), "metrics": metrics, "grads": grads, "model": policy}


def grads_in_megatron_layout(env: dict, result: dict, name: str) -> dict[str, torch.Tensor]:
    """The transformers gradients written as a model and converted with the project's HF -> Megatron converter
    (a linear re-layout), so they line up with the Megatron weights."""
    from mindspeed_llm.checkpoint.hf2mg import Hf2MgOptions, convert_hf_to_mg

    model = result["model"]
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(result["grads"][pname])
    hf_dir, mg_dir = env["root"] / f"grads_{name}_hf", env["root"] / f"grads_{name}_mg"
    model.save_pretrained(hf_dir)
    convert_hf_to_mg(Hf2MgOptions(load_dir=hf_dir, save_dir=mg_dir, tp=1, pp=1), log=lambda m: None)
    return megatron_weights(mg_dir, 1)


def megatron_weights(save: Path, iteration: int) -> dict[str, torch.Tensor]:
    path = save / f"iter_{iteration:07d}" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float() for k, v in state["model"].items() if torch.is_tensor(v) and v.is_floating_point()}


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.distributed
@pytest.mark.parametrize("name,loss_type,smoothing,ftx", LOSS_CASES, ids=[c[0] for c in LOSS_CASES])
def test_step_equals_published_formulas(dpo_env, single, name, loss_type, smoothing, ftx):
    want = reference_step(dpo_env, loss_type, smoothing, ftx)
    got = single[name]
    assert math.isfinite(got["losses"][0]) and rel(got["losses"][0], want["loss"]) < 1e-5, (got["losses"], want["loss"])
    for key in METRICS:
        g, w = got["metrics"][0][key], want["metrics"][key]
        assert abs(g - w) <= 1e-5 * max(abs(w), 1e-3), (key, g, w)
    total = math.sqrt(sum(float((g ** 2).sum()) for g in want["grads"].values()))
    assert total > 0 and rel(got["grad_norms"][0], total) < 1e-5
    w0 = megatron_weights(dpo_env["ckpt"][("base", 1, 1)], 1)
    w1 = megatron_weights(dpo_env["root"] / f"sgd_{name}", 1)
    grads = grads_in_megatron_layout(dpo_env, want, name)
    assert grads.keys() == w0.keys() == w1.keys()
    for key, g in grads.items():
        ours = (w0[key].double() - w1[key].double()) / LR
        err = float((ours - g.double()).norm() / g.double().norm().clamp(min=1e-30))
        assert err < 1e-5 or float((ours - g.double()).abs().max()) < 1e-9, (key, err)


@pytest.mark.distributed
def test_rewards_are_not_trivial(single):
    """The reference differs from the policy start, so the first step already has non-zero rewards."""
    m = single["tp1"]["metrics"][0]
    assert abs(m["rewards/chosen"]) > 1e-3 and abs(m["rewards/margins"]) > 1e-4
    assert m["logps/chosen"] < 0 and m["logps/rejected"] < 0


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["tp2", "pp2", "pp2_dynamic", "dp2", "vpp2"])
def test_parallel_equals_single_process(single, double, name):
    assert_same_run(double[name], single["tp1"], name)


def assert_same_run(got: dict, want: dict, name: str, grad_norms: bool = False) -> None:
    """3 steps of equal losses and DPO metrics (and grad norms), within 1e-5 relative."""
    assert len(got["losses"]) == len(want["losses"]) == 3
    for g, w in zip(got["losses"], want["losses"]):
        assert rel(g, w) < 1e-5, (name, got["losses"], want["losses"])
    if grad_norms:
        for g, w in zip(got["grad_norms"], want["grad_norms"]):
            assert rel(g, w) < 1e-5, (name, got["grad_norms"], want["grad_norms"])
    assert len(got["metrics"]) == 3
    for gm, wm in zip(got["metrics"], want["metrics"]):
        for key in METRICS:
            # A reward is beta x a difference of log-probs of tens of nats: its fp32 rounding is ~1e-7 x those tens
            # whatever its own size, hence the 0.1 floor (1e-6 absolute).
            assert abs(gm[key] - wm[key]) <= 1e-5 * max(abs(wm[key]), 1e-1), (name, key, gm[key], wm[key])


@pytest.mark.distributed
@pytest.mark.parametrize("name,want", [("packed", "dynamic"), ("ipo_packed", "ipo_dynamic"), ("tp2_packed", "dynamic"),
                                       ("tp2_ipo_packed", "ipo_dynamic"), ("pp2_packed", "dynamic"),
                                       ("dp2_packed", "dynamic")])
def test_packed_pairs_equal_padded(single, double, name, want):
    """One THD row of the micro-batch's 2b sequences scores each pair as its padded rows do."""
    assert_same_run({**single, **double}[name], single[want], name, grad_norms=True)


@pytest.mark.distributed
def test_lora(dpo_env, single, double):
    """LoRA DPO: adapters start at B = 0, so the first step equals full-parameter DPO; the base stays frozen
    (the reference is the base without adapters); TP2 with sequence parallelism trains alike."""
    lora, full = single["lora_tp1"], single["tp1"]
    assert rel(lora["losses"][0], full["losses"][0]) < 1e-6 and lora["losses"][1:] != full["losses"][1:]
    for key in METRICS:
        assert abs(lora["metrics"][0][key] - full["metrics"][0][key]) <= 1e-6 * max(abs(full["metrics"][0][key]), 1e-2)
    for g, w in zip(double["lora_tp2"]["losses"], lora["losses"]):
        assert rel(g, w) < 1e-5, (double["lora_tp2"]["losses"], lora["losses"])
    base = megatron_weights(dpo_env["ckpt"][("base", 1, 1)], 1)
    saved = megatron_weights(dpo_env["root"] / "lora_tp1", 3)
    frozen = {k.replace(".base_layer", ""): v for k, v in saved.items() if "lora_" not in k}
    assert frozen.keys() == base.keys() and any("lora_B" in k for k in saved)
    for k, v in base.items():
        assert torch.equal(frozen[k], v), k


@pytest.mark.distributed
def test_evaluation_runs(single):
    assert single["eval"]["iteration"] == 2 and all(math.isfinite(x) for x in single["eval"]["losses"])


@pytest.mark.distributed
def test_refer_model_iter_selects_the_reference(single):
    assert single["refer_iter"]["losses"] == single["tp1"]["losses"][:1]
    assert single["refer_iter"]["metrics"][:1] == single["tp1"]["metrics"][:1]


@pytest.mark.distributed
def test_mindspeed_recipe_trains(dpo_env, double):
    """The published DPO recipe's flags (bf16, distributed optimizer, full recompute, dynamic padding) train."""
    if "recipe" not in double:
        pytest.skip("the MindSpeed-LLM recipe list (shared/reference/mindspeed_qwen3_recipes.md) is absent")
    out = double["recipe"]
    assert out["iteration"] == 2 and all(math.isfinite(x) for x in out["losses"])
    assert set(out["metrics"][0]) == set(METRICS)
    assert (dpo_env["root"] / "recipe_save" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


@pytest.mark.distributed
def test_resume_is_exact(dpo_env, single):
    """The resumed run loads its trained weights from --load but the reference from the start checkpoint
    recorded in the save: losses and final weights equal an uninterrupted run."""
    straight, half, resumed = single["straight"], single["half"], single["resumed"]
    assert half["iteration"] == 2 and resumed["iteration"] == 4
    assert half["losses"] + resumed["losses"] == straight["losses"]
    assert half["metrics"] + resumed["metrics"] == straight["metrics"]
    a, b = megatron_weights(dpo_env["root"] / "resume_a", 4), megatron_weights(dpo_env["root"] / "resume_b", 4)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.distributed
def test_reference_source(dpo_env, single):
    """Where the reference comes from: the recorded start of a DPO save, --load for anything else, and
    --ref-model / --refer-model-iter when given."""
    from mindspeed_llm.training.objectives.dpo import reference_source
    from mindspeed_llm.training.run_config import DPOSettings

    base = str(dpo_env["ckpt"][("base", 1, 1)])
    dpo_save = str(dpo_env["root"] / "resume_b")
    assert reference_source(DPOSettings(), dpo_save, resume=True)[:2] == (base, 1)
    assert reference_source(DPOSettings(), dpo_save, resume=False)[:2] == (dpo_save, None)
    # a converted checkpoint records no DPO reference
    assert reference_source(DPOSettings(), base, resume=True)[:2] == (base, None)
    given = DPOSettings(ref_model="/elsewhere", refer_model_iter=3)
    assert reference_source(given, base, resume=True) == ("/elsewhere", 3, "--ref-model")


@pytest.mark.distributed
def test_cli_log_line(dpo_env, single):
    """posttrain_gpt.py itself: Megatron's log line with the DPO loss and metrics of the same run as `tp1`."""
    proc = run_torchrun("posttrain_gpt.py", *dpo_flags(dpo_env, 3), "--train-iters", "1", "--lr-warmup-iters", "0",
                        nproc=1)
    line = next(ln for ln in proc.stdout.splitlines() if "iteration        1/" in ln)
    want = single["tp1"]
    assert f"| lm loss: {want['losses'][0]:.6E} |" in line, line
    fields = re.findall(r" ([a-z/ ]+): ([-0-9.E+]+) \|", line)
    names = [name.strip() for name, _ in fields]
    start = names.index("lm loss")
    assert names[start:start + 8] == ["lm loss", *METRICS, "loss scale"], names
    for name, value in fields[start + 1:start + 7]:
        assert f"{want['metrics'][0][name.strip()]:.6E}" == value, (name, value)


@pytest.mark.distributed
@pytest.mark.shared_data
def test_shared_dpo_pairs_train(dpo_env, shared_datasets):
    """dpo_en_demo.json (ShareGPT pairs, answers longer than --seq-length): preprocessed by the CLI, cut with the
    prompt shared, trained 2 iterations with dynamic padding."""
    prefix = dpo_env["root"] / "shared" / "dpo_en"
    run_cli("preprocess_data.py", "--input", str(shared_datasets / "dpo_en_demo.json"), "--tokenizer-name-or-path",
            str(dpo_env["hf"]), "--output-prefix", str(prefix), "--handler-name", "SharegptStylePairwiseHandler",
            "--prompt-type", "qwen3")
    argv = dpo_flags(dpo_env, 2) + ["--no-pad-to-seq-lengths", "--seq-length", "256"]
    argv[argv.index("--data-path") + 1] = str(prefix)
    out = launch(dpo_env, "dpo_shared", [{"name": "shared", "argv": argv}], nproc=1)["shared"]
    assert out["iteration"] == 2 and all(math.isfinite(x) and x > 0 for x in out["losses"])
    assert all(m["logps/chosen"] < 0 and m["logps/rejected"] < 0 for m in out["metrics"])


def test_cli_error_is_one_line(dpo_env):
    argv = [a for a in dpo_flags(dpo_env, 1) if a != "--is-pairwise-dataset"]
    proc = run_cli("posttrain_gpt.py", *argv, check=False)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1 and "--is-pairwise-dataset" in lines[0], proc.stderr[-2000:]


def test_example_recipe_parses(tmp_path):
    from mindspeed_llm.arguments import parse_train_args
    from tests.test_train_cli import recipe_argv

    argv = recipe_argv(REPO / "examples" / "mcore" / "qwen3" / "dpo_qwen3_8b_4K_full_ptd.sh", tmp_path)
    load = argv.index("--load") + 1
    argv[load] = str(tmp_path / argv[load])
    Path(argv[load]).mkdir(parents=True, exist_ok=True)
    args = parse_train_args(argv)
    assert (args.stage, args.is_pairwise_dataset, args.dpo_loss_type, args.dpo_beta) == ("dpo", True, "sigmoid", 0.1)
    assert args.ref_model is None and args.bf16 and args.use_distributed_optimizer


def test_flag_errors(dpo_env):
    from mindspeed_llm.arguments import parse_train_args
    from mindspeed_llm.errors import UserError

    argv = dpo_flags(dpo_env, 1)
    with pytest.raises(UserError, match="--is-pairwise-dataset"):
        parse_train_args([a for a in argv if a != "--is-pairwise-dataset"])
    sft = list(argv)
    sft[sft.index("dpo")] = "sft"
    with pytest.raises(UserError, match="--stage dpo"):
        parse_train_args(sft)
    with pytest.raises(UserError, match="--dpo-label-smoothing"):
        parse_train_args(argv + ["--dpo-loss-type", "hinge", "--dpo-label-smoothing", "0.1"])
    with pytest.raises(UserError, match="--ref-model"):
        parse_train_args(argv + ["--ref-model", str(dpo_env["root"] / "missing")])
    with pytest.raises(UserError, match="--pack"):
        parse_train_args(argv + ["--pack"])
    args = parse_train_args(argv + ["--dpo-loss-type", "ipo", "--pref-ftx", "0.2"])
    assert (args.stage, args.dpo_loss_type, args.pref_ftx, args.dpo_beta) == ("dpo", "ipo", 0.2, BETA)
