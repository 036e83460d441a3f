"""posttrain_gpt.py on the tiny Qwen3 model: parallel equivalence, exact resume, batch modes, packed attention,
checkpoint safety. Two torchrun launches (1 and 2 processes) run all training configurations."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import run_torchrun
from tests.train_fixtures import env, model_flags, train_flags, transformers_first_loss  # noqa: F401  (env)

REPO = Path(__file__).resolve().parents[1]
REL = 1e-5
# The recipes' kernel flags (in `model_flags`); without them the same model runs megatron-core's unfused path.
FUSED_FLAGS = ("--use-fused-rmsnorm", "--use-fused-swiglu", "--use-fused-rotary-pos-emb", "--use-flash-attn")
UNFUSED = ["--no-gradient-accumulation-fusion"]     # weight gradients formed on their own, then added by DDP


def unfused(argv: list[str]) -> list[str]:
    return [a for a in argv if a not in FUSED_FLAGS] + UNFUSED


def launch(env: dict, name: str, plan: list[dict], nproc: int) -> dict:
    plan_file = env["root"] / f"{name}_plan.json"
    out_file = env["root"] / f"{name}_out.json"
    plan_file.write_text(json.dumps(plan))
    run_torchrun("tests/dist_train_checks.py", str(plan_file), str(out_file), nproc=nproc)
    return json.loads(out_file.read_text())


def resume_plan(env: dict, tag: str, extra: list[str]) -> list[dict]:
    """4 iterations straight vs 2 (exit) + resume 2, with saves."""
    root = env["root"]
    base = model_flags(env["hf"]) + train_flags(4) + ["--data-path", env["plain"]] + extra
    first = ["--load", str(env["ckpt"][(1, 1)]), "--finetune"]
    return [
        {"name": f"{tag}_straight", "argv": base + first + ["--save", str(root / f"{tag}_a"), "--save-interval", "2"]},
        {"name": f"{tag}_half", "argv": base + first + ["--save", str(root / f"{tag}_b"), "--exit-interval", "2"]},
        {"name": f"{tag}_resumed", "argv": base + ["--load", str(root / f"{tag}_b"), "--save", str(root / f"{tag}_b")]},
    ]


@pytest.fixture(scope="module")
def single(env) -> dict:
    """One process: the TP1 PP1 DP1 reference (2 micro-batches of accumulation) and a plain-optimizer resume."""
    base = model_flags(env["hf"]) + train_flags(3) + ["--data-path", env["plain"], "--finetune"]
    load = ["--load", str(env["ckpt"][(1, 1)])]
    # Tied embeddings: the output layer and the embedding add into one main grad (from random weights).
    tied = [a for a in base if a not in ("--untie-embeddings-and-output-weights", "--finetune")]
    plan = [{"name": "ref", "argv": base + load}, {"name": "ref_unfused", "argv": unfused(base) + load},
            {"name": "tied", "argv": tied}, {"name": "tied_unfused", "argv": unfused(tied)}]
    plan += resume_plan(env, "plain", [])
    return launch(env, "single", plan, nproc=1)


@pytest.fixture(scope="module")
def double(env) -> dict:
    """Two processes: TP=2 (+SP), PP=2, DP=2 with the distributed optimizer, dynamic and packed batches,
    distributed-optimizer resume, packed-vs-unpacked losses, and a failing save."""
    root = env["root"]
    base = model_flags(env["hf"]) + train_flags(3) + ["--finetune"]
    plain = base + ["--data-path", env["plain"]]
    packed = model_flags(env["hf"]) + train_flags(3, seq=256) + ["--finetune", "--data-path", env["pack"],
                                                                 "--reset-attention-mask", "--neat-pack"]
    plan = [
        {"name": "tp2", "argv": plain + ["--load", str(env["ckpt"][(2, 1)]), "--tensor-model-parallel-size", "2",
                                         "--sequence-parallel"]},
        {"name": "pp2", "argv": plain + ["--load", str(env["ckpt"][(1, 2)]), "--pipeline-model-parallel-size", "2"]},
        {"name": "dp2", "argv": plain + ["--load", str(env["ckpt"][(1, 1)]), "--use-distributed-optimizer"]},
        {"name": "dynamic_pp2", "argv": plain + ["--load", str(env["ckpt"][(1, 2)]), "--pipeline-model-parallel-size",
                                                 "2", "--no-pad-to-seq-lengths"]},
        {"name": "packed_tp2", "argv": packed + ["--load", str(env["ckpt"][(2, 1)]), "--tensor-model-parallel-size",
                                                 "2", "--sequence-parallel"]},
        {"name": "packed_check", "kind": "packed_vs_unpacked", "hf_dir": str(env["hf"]),
         "mg_dir": str(env["ckpt"][(2, 1)]), "tp": 2, "data": env["pack"], "seq_length": 256, "rows": 2},
        {"name": "disk_full", "kind": "disk_full", "fail_at": 4, "save": str(root / "full"),
         "argv": plain + ["--load", str(env["ckpt"][(1, 1)]), "--train-iters", "4", "--save", str(root / "full"),
                          "--save-interval", "2"]},
    ]
    plan += resume_plan(env, "dist", ["--use-distributed-optimizer"])
    return launch(env, "double", plan, nproc=2)


def assert_close(got: list[float], want: list[float], rel: float = REL) -> None:
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want):
        assert math.isfinite(g) and abs(g - w) <= rel * abs(w), (got, want)


def final_weights(save: Path, iteration: int) -> dict[str, torch.Tensor]:
    files = sorted((save / f"iter_{iteration:07d}").glob("mp_rank_*/model_optim_rng.pt"))
    assert files, f"no checkpoint files under {save}"
    out = {}
    for f in files:
        state = torch.load(f, map_location="cpu", weights_only=True)   # our saves hold plain types only
        out.update({f"{f.parent.name}/{k}": v for k, v in state["model"].items() if torch.is_tensor(v)})
    return out


@pytest.mark.distributed
def test_reference_loss_matches_transformers(env, single):
    """First-iteration loss of our TP1 model equals the transformers model on the same micro-batches."""
    loss, _ = transformers_first_loss(env["hf"], env["plain"])
    assert_close(single["ref"]["losses"][:1], [loss], rel=1e-5)


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["ref", "tied"])
def test_fused_kernels_equal_unfused(single, name):
    """--use-fused-rmsnorm / -swiglu / -rotary-pos-emb and gradient-accumulation fusion (on unless
    --no-gradient-accumulation-fusion; 2 micro-batches per step) give the same losses and grad norms as the unfused
    path, with untied and tied embeddings."""
    assert_close(single[name]["losses"], single[f"{name}_unfused"]["losses"], rel=1e-6)
    assert_close(single[name]["grad_norms"], single[f"{name}_unfused"]["grad_norms"], rel=1e-6)


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["tp2", "pp2", "dp2"])
def test_parallel_losses_equal_single_process(single, double, name):
    assert_close(double[name]["losses"], single["ref"]["losses"])
    assert_close([g for g in double[name]["grad_norms"]], [g for g in single["ref"]["grad_norms"]], rel=1e-4)


@pytest.mark.distributed
def test_dynamic_batches_equal_fixed_and_packed_trains(single, double):
    # Right padding under causal attention: padding to the longest sample changes nothing for real tokens.
    assert_close(double["dynamic_pp2"]["losses"], single["ref"]["losses"])
    losses = double["packed_tp2"]["losses"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


@pytest.mark.distributed
def test_packed_segments_equal_unpacked_samples(double):
    check = double["packed_check"]
    assert check["segments"] >= 3
    assert check["max_rel_diff"] < 1e-5


@pytest.mark.distributed
@pytest.mark.parametrize("tag,results", [("plain", "single"), ("dist", "double")])
def test_resume_is_exact(env, request, tag, results):
    out = request.getfixturevalue(results)
    straight, half, resumed = (out[f"{tag}_{k}"] for k in ("straight", "half", "resumed"))
    assert half["iteration"] == 2 and resumed["iteration"] == 4
    assert half["losses"] + resumed["losses"] == straight["losses"]
    a, b = final_weights(env["root"] / f"{tag}_a", 4), final_weights(env["root"] / f"{tag}_b", 4)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.distributed
def test_failed_save_keeps_previous_checkpoint(double):
    out = double["disk_full"]
    assert "no space left on device" in out["message"].lower() and "iteration 2" in out["message"]
    assert out["tracker"] == "2"
    assert out["entries"] == ["iter_0000002", "latest_checkpointed_iteration.txt"]
