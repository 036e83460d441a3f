"""--context-parallel-size 2 and 4 (Ulysses, ring, hybrid) on the tiny Qwen3 model, unpacked and packed, with TP,
the distributed optimizer and (tiny Qwen3-MoE) EP: the core-attention modules equal full causal attention, and 3
training iterations give the CP 1 losses and grad norms; bad CP set-ups are one error line."""
from __future__ import annotations

import json

import pytest

from mindspeed_llm.arguments import parse_train_args
from mindspeed_llm.errors import UserError
from mindspeed_llm.models.context_parallel import kv_repeats_for_ulysses
from tests.conftest import REPO, run_cli, run_torchrun
from tests.recipes import edit, recipe_argv, split_flags
from tests.test_dpo import METRICS as DPO_METRICS, dpo_env, dpo_flags  # noqa: F401  (dpo_env is a fixture)
from tests.test_moe_train import lb_losses, moe, single, train_argv  # noqa: F401  (moe, single are fixtures)
from tests.test_train import assert_close, unfused
from tests.train_fixtures import env, launch_plan, model_flags, train_flags  # noqa: F401  (env is a fixture)

TRAIN_MIN = ["--data-path", "/nonexistent/prefix", "--is-instruction-dataset", "--train-iters", "1", "--lr", "1e-4",
             "--seq-length", "64"]


@pytest.fixture(scope="module")
def cp_runs(env) -> dict:
    base = model_flags(env["hf"]) + train_flags(3) + ["--finetune", "--data-path", env["plain"],
                                                      "--load", str(env["ckpt"][(1, 1)])]
    cp2 = ["--context-parallel-size", "2", "--context-parallel-algo"]
    plan = [{"name": "cp1", "argv": base},       # DP 2: the CP 1 reference
            {"name": "ulysses", "argv": base + cp2 + ["ulysses_cp_algo"]},
            {"name": "ulysses_unfused", "argv": unfused(base) + cp2 + ["ulysses_cp_algo"]},
            {"name": "ring", "argv": base + cp2 + ["megatron_cp_algo"]}]
    packed = model_flags(env["hf"]) + train_flags(3, seq=256) + [
        "--finetune", "--data-path", env["pack"], "--load", str(env["ckpt"][(1, 1)]), "--reset-attention-mask",
        "--neat-pack", "--attention-mask-type", "general"]
    plan += [{"name": "packed_cp1", "argv": packed},
             {"name": "packed_ulysses", "argv": packed + cp2 + ["ulysses_cp_algo", "--cp-attention-mask-type",
                                                                 "general"]},
             {"name": "packed_ring", "argv": unfused(packed) + cp2 + ["megatron_cp_algo"]}]
    plan_file, out_file = env["root"] / "cp_plan.json", env["root"] / "cp_out.json"
    plan_file.write_text(json.dumps(plan))
    run_torchrun("tests/dist_cp_checks.py", str(plan_file), str(out_file), nproc=2)
    return json.loads(out_file.read_text())


@pytest.mark.distributed
def test_cp_attention_equals_full_attention(cp_runs):
    """Output and q/k/v gradients of each rank's chunks, fp64, incl. KV heads repeated for Ulysses (1 or 3 KV heads
    over 2 ranks)."""
    assert len(cp_runs["attention"]) == 9
    for case, err in cp_runs["attention"].items():
        assert err < 1e-10, (case, err)
    assert "3 attention heads" in cp_runs["errors"]["ulysses_3_heads"]


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["ulysses", "ulysses_unfused", "ring"])
def test_cp2_training_equals_cp1(cp_runs, name):
    """Fused RoPE (core attention, `RopeAngles`) and megatron-core's RoPE both take this rank's zig-zag angles."""
    assert_close(cp_runs[name]["losses"], cp_runs["cp1"]["losses"], rel=1e-5)
    assert_close(cp_runs[name]["grad_norms"], cp_runs["cp1"]["grad_norms"], rel=1e-5)


@pytest.fixture(scope="module")
def cp4_runs(env) -> dict:
    """One 4-process launch: attention cases at CP 4 (hybrid included), and training at CP 1 (DP 4) against
    CP 2 x TP 2 with the distributed optimizer (Ulysses, ring; a save and resume) and CP 4 hybrid (Ulysses
    degree 2), on packed and unpacked data."""
    one_sample = ["--micro-batch-size", "1"]      # GBS 4 over DP 4
    plain = model_flags(env["hf"]) + train_flags(3) + ["--finetune", "--data-path", env["plain"]] + one_sample
    packed = model_flags(env["hf"]) + train_flags(3, seq=256) + [
        "--finetune", "--data-path", env["pack"], "--reset-attention-mask", "--neat-pack"] + one_sample
    tp1, tp2 = ["--load", str(env["ckpt"][(1, 1)])], ["--load", str(env["ckpt"][(2, 1)])]
    cp2_tp2 = tp2 + ["--context-parallel-size", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel",
                     "--use-distributed-optimizer", "--context-parallel-algo"]
    hybrid = tp1 + ["--context-parallel-size", "4", "--context-parallel-algo", "hybrid_cp_algo",
                    "--ulysses-degree-in-cp", "2"]
    saved = str(env["root"] / "cp2_tp2_half")
    plan = [{"name": "packed_cp1", "argv": packed + tp1},
            {"name": "packed_cp2_tp2_ulysses", "argv": packed + cp2_tp2 + ["ulysses_cp_algo"]},
            {"name": "packed_cp2_tp2_ring", "argv": packed + cp2_tp2 + ["megatron_cp_algo"]},
            {"name": "packed_hybrid", "argv": packed + hybrid},
            {"name": "plain_cp1", "argv": plain + tp1},
            {"name": "plain_hybrid", "argv": plain + hybrid},
            {"name": "half", "argv": plain + cp2_tp2 + ["ulysses_cp_algo", "--save", saved, "--exit-interval", "2"]},
            {"name": "resumed", "argv": [a for a in plain if a != "--finetune"] + cp2_tp2[2:] + [
                "ulysses_cp_algo", "--load", saved]}]
    plan_file, out_file = env["root"] / "cp4_plan.json", env["root"] / "cp4_out.json"
    plan_file.write_text(json.dumps(plan))
    run_torchrun("tests/dist_cp_checks.py", str(plan_file), str(out_file), "4", nproc=4)
    return json.loads(out_file.read_text())


@pytest.mark.distributed
def test_cp4_attention_equals_full_attention(cp4_runs):
    """Ulysses, ring and hybrid (Ulysses degree 2 x ring 2) at CP 4, unpacked and packed."""
    assert len(cp4_runs["attention"]) == 12
    for case, err in cp4_runs["attention"].items():
        assert err < 1e-10, (case, err)


@pytest.mark.distributed
@pytest.mark.parametrize("name,ref", [("packed_cp2_tp2_ulysses", "packed_cp1"), ("packed_cp2_tp2_ring", "packed_cp1"),
                                      ("packed_hybrid", "packed_cp1"), ("plain_hybrid", "plain_cp1")])
def test_cp_with_tp_distributed_optimizer_and_hybrid_equal_cp1(cp4_runs, name, ref):
    assert_close(cp4_runs[name]["losses"], cp4_runs[ref]["losses"], rel=1e-5)
    assert_close(cp4_runs[name]["grad_norms"], cp4_runs[ref]["grad_norms"], rel=1e-5)


@pytest.mark.distributed
def test_cp2_distributed_optimizer_resumes(cp4_runs):
    """2 iterations, save (the optimizer state sharded over DP x CP), resume: the third equals CP 1's."""
    assert cp4_runs["half"]["iteration"] == 2 and cp4_runs["resumed"]["iteration"] == 3
    assert_close(cp4_runs["half"]["losses"] + cp4_runs["resumed"]["losses"][-1:], cp4_runs["plain_cp1"]["losses"],
                 rel=1e-5)


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["packed_ulysses", "packed_ring"])
def test_cp2_packed_training_equals_cp1(cp_runs, name):
    """Packed rows (--reset-attention-mask --neat-pack): every sample padded and split zig-zag over the CP ranks,
    attention inside each sample, positions restarting per sample."""
    assert_close(cp_runs[name]["losses"], cp_runs["packed_cp1"]["losses"], rel=1e-5)
    assert_close(cp_runs[name]["grad_norms"], cp_runs["packed_cp1"]["grad_norms"], rel=1e-5)


@pytest.fixture(scope="module")
def moe_cp_runs(moe) -> dict:
    """The tiny Qwen3-MoE at CP 2 on 2 processes: with EP 2 (megatron-core's expert groups span DP x CP, so the
    two CP ranks are the two expert ranks) for Ulysses and ring, and without EP."""
    run = train_argv(moe, 3, "--finetune", "--context-parallel-size", "2")
    ep2 = ["--expert-model-parallel-size", "2", "--load", str(moe["ckpt"]["ep2"])]
    plan = [{"name": "cp2_ep2_ulysses", "argv": run + ep2 + ["--context-parallel-algo", "ulysses_cp_algo"]},
            {"name": "cp2_ep2_ring", "argv": run + ep2 + ["--context-parallel-algo", "megatron_cp_algo"]},
            {"name": "cp2_ep1", "argv": run + ["--load", str(moe["ckpt"]["ep1"])]}]
    return launch_plan(moe["root"], "moe_cp", plan, nproc=2)


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["cp2_ep2_ulysses", "cp2_ep2_ring", "cp2_ep1"])
def test_moe_cp2_equals_single_process(single, moe_cp_runs, name):
    """Losses, grad norms and the logged load-balancing loss equal the one-process MoE run."""
    assert_close(moe_cp_runs[name]["losses"], single["ref"]["losses"], rel=1e-5)
    assert_close(moe_cp_runs[name]["grad_norms"], single["ref"]["grad_norms"], rel=1e-5)
    assert_close(lb_losses(moe_cp_runs[name]), lb_losses(single["ref"]), rel=1e-5)


@pytest.fixture(scope="module")
def dpo_cp_runs(dpo_env) -> dict:
    """DPO (sigmoid with --pref-ftx, and IPO's per-sequence means) at CP 1 (DP 2) and CP 2, padded and packed pairs."""
    base = dpo_flags(dpo_env, 3) + ["--pref-ftx", "0.3"]
    ipo = dpo_flags(dpo_env, 3) + ["--dpo-loss-type", "ipo", "--pref-ftx", "0.3", "--reset-attention-mask"]
    cp2 = ["--context-parallel-size", "2", "--context-parallel-algo"]
    plan = [{"name": "padded_cp1", "argv": base},
            {"name": "padded_ulysses", "argv": base + cp2 + ["ulysses_cp_algo"]},
            {"name": "padded_ring", "argv": base + cp2 + ["megatron_cp_algo"]},
            {"name": "packed_ipo_cp1", "argv": ipo},
            {"name": "packed_ipo_ring", "argv": ipo + cp2 + ["megatron_cp_algo"]}]
    return launch_plan(dpo_env["root"], "dpo_cp", plan, nproc=2)


@pytest.mark.distributed
@pytest.mark.parametrize("name,ref", [("padded_ulysses", "padded_cp1"), ("padded_ring", "padded_cp1"),
                                      ("packed_ipo_ring", "packed_ipo_cp1")])
def test_dpo_cp2_equals_cp1(dpo_cp_runs, name, ref):
    """Sequence log-probs summed over the CP ranks: losses, grad norms and the reward metrics equal CP 1's."""
    got, want = dpo_cp_runs[name], dpo_cp_runs[ref]
    assert_close(got["losses"], want["losses"], rel=1e-5)
    assert_close(got["grad_norms"], want["grad_norms"], rel=1e-5)
    for key in DPO_METRICS:
        assert_close([m[key] for m in got["metrics"]], [m[key] for m in want["metrics"]], rel=1e-4)


LONG_RECIPES = ("tune_qwen3_32b_32K_full_pack_A3_ptd", "tune_qwen3_32b_256K_full_pack_A3_ptd")


@pytest.fixture(scope="module")
def thinking_pack(env) -> str:
    """The demo data packed at 256 tokens with --enable-thinking true, as the long recipes' data recipe makes it."""
    prefix = env["root"] / "pack_thinking" / "alpaca"
    run_cli("preprocess_data.py", "--input", str(env["root"] / "raw" / "alpaca_train.jsonl"),
            "--tokenizer-name-or-path", str(env["hf"]), "--handler-name", "AlpacaStyleInstructionHandler",
            "--prompt-type", "qwen3", "--enable-thinking", "true", "--output-prefix", str(prefix),
            "--seq-length", "256", "--pack", "--neat-pack")
    return str(prefix)


@pytest.mark.distributed
@pytest.mark.parametrize("recipe", LONG_RECIPES)
def test_long_context_recipe_runs_at_cp2(recipe, env, thinking_pack, tmp_path):
    """Our 32K / 256K packed recipes (MindSpeed's flags: Ulysses CP, recompute, the distributed optimizer) on the
    tiny model: only paths, shapes and sizes edited (TP 1, PP 1, CP 2, 256-token rows), 2 iterations on 2
    processes, a checkpoint saved."""
    argv = recipe_argv(REPO / "examples" / "mcore" / "qwen3" / f"{recipe}.sh", tmp_path)
    flags = split_flags(argv)
    save = tmp_path / "save"
    argv = edit(flags, {}, {"--load": str(env["ckpt"][(1, 1)]), "--save": str(save), "--data-path": thinking_pack,
                            "--tokenizer-name-or-path": str(env["hf"]), "--context-parallel-size": "2",
                            "--seq-length": "256", "--recompute-num-layers": "1"})
    assert argv[argv.index("--context-parallel-algo") + 1] == "ulysses_cp_algo" and "--reset-attention-mask" in argv
    proc = run_torchrun("posttrain_gpt.py", *argv, nproc=2)
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert "--attention-mask-type: accepted, no effect" in proc.stderr, proc.stderr[-3000:]


def test_kv_repeats_for_ulysses():
    assert kv_repeats_for_ulysses(8, 2, 2) == 1
    assert kv_repeats_for_ulysses(32, 2, 16) == 8       # the 30B 256K recipe: 2 local KV heads over CP 16
    assert kv_repeats_for_ulysses(6, 3, 2) == 2


@pytest.mark.parametrize("extra,message", [
    (["--context-parallel-size", "3"], "--seq-length 64 must be divisible by 2 x --context-parallel-size = 6"),
    (["--context-parallel-size", "2", "--no-pad-to-seq-lengths", "--pad-to-multiple-of", "6"],
     "--pad-to-multiple-of 6 must be divisible by 2 x --context-parallel-size = 4"),
    (["--context-parallel-size", "2", "--context-parallel-algo", "hybrid_cp_algo"],
     "--context-parallel-algo hybrid_cp_algo needs --ulysses-degree-in-cp"),
    (["--context-parallel-size", "4", "--context-parallel-algo", "hybrid_cp_algo", "--ulysses-degree-in-cp", "4"],
     "with a ring of at least 2 (got 4)"),
    (["--context-parallel-size", "2", "--ulysses-degree-in-cp", "2"],
     "--ulysses-degree-in-cp 2 applies only to --context-parallel-algo hybrid_cp_algo (given: megatron_cp_algo)"),
])
def test_bad_cp_setups_are_named(extra, message):
    with pytest.raises(UserError) as err:
        parse_train_args(TRAIN_MIN + extra)
    assert message in str(err.value)


def test_cli_refuses_indivisible_sequence(tmp_path):
    proc = run_cli("posttrain_gpt.py", *TRAIN_MIN, "--context-parallel-size", "3", check=False)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "--context-parallel-size = 6" in lines[0]
