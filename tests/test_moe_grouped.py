"""--moe-grouped-gemm: MindSpeed's grouped expert layout (megatron-core GroupedMLP's `weight1` / `weight2`) in
conversion, and training with GroupedMLP on our grouped GEMM (`platform.grouped_gemm`) without the grouped_gemm
package: round trips, the grouped <-> sequential relation on the files, logits against transformers, and 3
training iterations equal to SequentialMLP's. --expert-tensor-parallel-size 1: whole experts per TP rank in
conversion (MindSpeed's coexisting rank files) and training."""
from __future__ import annotations

import pytest
import torch

from mindspeed_llm.checkpoint import layout
from mindspeed_llm.checkpoint.hf2mg import Hf2MgOptions, convert_hf_to_mg
from mindspeed_llm.checkpoint.layout import load_rank_file
from tests.conftest import run_cli
from tests.test_convert import convert, hf_tensors
from tests.test_moe import _error, hf2mg
from tests.test_moe_train import assert_close, lb_losses, train_argv
from tests.train_fixtures import launch_plan

GROUPED = "--moe-grouped-gemm"
EP2PP2 = ["--target-expert-parallel-size", "2", "--target-pipeline-parallel-size", "2"]
TP2EP2PP2VPP = ["--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2",
                "--target-pipeline-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]


@pytest.fixture(scope="module")
def moe_hf(tiny_model_factory):
    """The tiny Qwen3-MoE (4 layers, hidden 64, 8 experts of width 32, top-2); layer 2 keeps a dense MLP."""
    return tiny_model_factory("qwen3-moe", mlp_only_layers=(2,))


def _rank_files(mg) -> dict[str, dict]:
    iter_dir = mg / "iter_0000001"
    return {d.name: load_rank_file(d / layout.FILE_NAME, mmap=False) for d in sorted(iter_dir.iterdir())}


@pytest.mark.parametrize("grouped", [False, True], ids=["sequential", "grouped"])
@pytest.mark.parametrize("flags", [EP2PP2, TP2EP2PP2VPP], ids=["ep2pp2", "tp2ep2pp2vpp"])
def test_round_trip_is_bit_exact(moe_hf, tmp_path, grouped, flags):
    """hf -> mg -> hf through convert_ckpt.py gives back every tensor bit for bit, with and without
    --moe-grouped-gemm; mg -> hf reads the layout from the checkpoint."""
    mg = hf2mg(moe_hf, tmp_path / "mg", *flags, *([GROUPED] if grouped else []))
    keys = [k for state in _rank_files(mg).values() for chunk in ("model", "model0", "model1")
            for k in state.get(chunk, {})]
    assert any(k.endswith("mlp.experts.weight1") for k in keys) == grouped
    assert any(".local_experts." in k for k in keys) != grouped
    back = tmp_path / "hf"
    convert("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg, "--save-dir", back,
            "--hf-cfg-dir", moe_hf, *([GROUPED] if grouped else []))
    original, restored = hf_tensors(moe_hf), hf_tensors(back)
    assert sorted(restored) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(restored[key], tensor), key


def test_grouped_files_are_the_sequential_experts_viewed(moe_hf, tmp_path):
    """Every rank file of a grouped conversion (TP2 x EP2 x PP2) holds the sequential conversion's tensors, the
    experts as MindSpeed's weight1 [H, E_loc*2F/T] and weight2 [E_loc*F/T, H] with
    `local_experts.j.linear_fc1.weight == weight1.view(E_loc, H, -1)[j].T` and
    `local_experts.j.linear_fc2.weight == weight2.view(E_loc, -1, H)[j].T` (a raw view: expert j's gate then up
    columns are adjacent, not all experts' gate columns first)."""
    flags = ["--target-tensor-parallel-size", "2", *EP2PP2]
    sequential = _rank_files(hf2mg(moe_hf, tmp_path / "seq", *flags))
    grouped = _rank_files(hf2mg(moe_hf, tmp_path / "grp", *flags, GROUPED))
    assert sorted(grouped) == sorted(sequential)
    hidden, e_loc, ffn_per_tp = 64, 4, 16
    checked = 0
    for rank_dir, state in grouped.items():
        assert state["args"].moe_grouped_gemm is True
        seq, grp = sequential[rank_dir]["model"], state["model"]
        experts = {k.split(".mlp.experts.")[0] for k in grp if ".mlp.experts.weight" in k}
        for prefix in experts:
            w1, w2 = grp.pop(f"{prefix}.mlp.experts.weight1"), grp.pop(f"{prefix}.mlp.experts.weight2")
            assert w1.shape == (hidden, e_loc * 2 * ffn_per_tp) and w2.shape == (e_loc * ffn_per_tp, hidden)
            for j in range(e_loc):
                fc1 = seq.pop(f"{prefix}.mlp.experts.local_experts.{j}.linear_fc1.weight")
                fc2 = seq.pop(f"{prefix}.mlp.experts.local_experts.{j}.linear_fc2.weight")
                assert torch.equal(w1.view(e_loc, hidden, -1)[j].T, fc1)
                assert torch.equal(w2.view(e_loc, -1, hidden)[j].T, fc2)
                # columns of expert j in the 2-D weight1: its gate rows then its up rows, transposed
                assert torch.equal(w1.reshape(-1)[j * hidden * 2 * ffn_per_tp:][:hidden * 2 * ffn_per_tp],
                                   fc1.T.reshape(-1))
                checked += 1
        assert sorted(grp) == sorted(seq), rank_dir
        for key in seq:
            assert torch.equal(grp[key], seq[key]), (rank_dir, key)
    assert checked == 4 * (2 + 1) * e_loc     # 4 files (TP x EP) per stage; stage 0: 2 MoE layers, stage 1: 1


def test_grouped_checkpoint_logits_match_transformers(moe_hf, tmp_path):
    """A grouped checkpoint loads into megatron-core's GroupedMLP (our grouped GEMM, fp32) and its logits equal
    Qwen3MoeForCausalLM's within 1e-5 (convert_ckpt.py --verify)."""
    proc = run_cli("convert_ckpt.py", "--load-dir", str(moe_hf), "--save-dir", str(tmp_path / "mg"), *EP2PP2,
                   GROUPED, "--verify", "--verify-threshold", "1e-5")
    assert "[verify] logits max-abs diff" in proc.stdout and proc.stdout.rstrip().endswith("OK"), proc.stdout


def test_grouped_gemm_equals_per_expert_matmuls():
    """`platform.grouped_gemm` (grouped_gemm.ops.gmm's contract) against one matmul per expert, an expert with no
    rows included, forward and backward; on CUDA also the torch._grouped_mm kernel in bf16."""
    from mindspeed_llm.platform import grouped_gemm

    g = torch.Generator().manual_seed(0)
    sizes = torch.tensor([3, 0, 5, 2])
    a = torch.randn(10, 8, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(4, 8, 6, generator=g, dtype=torch.float64).requires_grad_()
    out = grouped_gemm(a, b, sizes)
    want = torch.cat([x @ w for x, w in zip(a.split(sizes.tolist()), b.unbind(0))])
    assert torch.equal(out, want)
    (ga, gb), (wa, wb) = (torch.autograd.grad((y * y).sum(), (a, b)) for y in (out, want))
    assert torch.equal(ga, wa) and torch.equal(gb, wb) and gb[1].abs().sum() == 0
    torch.testing.assert_close(grouped_gemm(a, b.transpose(1, 2).contiguous(), sizes, trans_b=True), want)
    if torch.cuda.is_available():
        a16, b16 = a.detach().cuda().bfloat16(), b.detach().cuda().bfloat16()
        a16, b16 = torch.cat([a16, a16], 1), torch.cat([b16, b16], 1)[:, :, :8].contiguous()   # 16-byte rows
        got = grouped_gemm(a16, b16, sizes.cuda())
        ref = torch.cat([x.float() @ w.float() for x, w in zip(a16.split(sizes.tolist()), b16.unbind(0))])
        torch.testing.assert_close(got.float(), ref, rtol=1e-2, atol=1e-2)


def test_grouped_gemm_flag_errors(moe_hf, tiny_qwen3, capsys, tmp_path):
    err = _error(capsys, "--load-dir", tiny_qwen3, "--save-dir", tmp_path / "out", GROUPED)
    assert err == "error: --moe-grouped-gemm: qwen3 is a dense model (no experts to group); drop it"
    mg = hf2mg(moe_hf, tmp_path / "mg", "--target-expert-parallel-size", "2")
    err = _error(capsys, "--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg, "--save-dir",
                 tmp_path / "hf", GROUPED)
    assert "--moe-grouped-gemm" in err and "SequentialMLP (local_experts) layout" in err
    assert not (tmp_path / "hf").exists() and not (tmp_path / "out").exists()


# --- training ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def moe(tiny_model_factory, tmp_path_factory) -> dict:
    """The tiny Qwen3-MoE, demo data, and its conversions: EP1 (both layouts), EP2 grouped, and with expert-TP 1
    at TP2 (EP1) and TP2 x EP2 (grouped)."""
    from mindspeed_llm.demo_data import write_demo_data

    hf = tiny_model_factory("qwen3-moe")
    root = tmp_path_factory.mktemp("moe_grouped_train")
    files = write_demo_data(root / "raw", n_train=100, n_test=5)
    run_cli("preprocess_data.py", "--input", str(files["alpaca_train"]), "--tokenizer-name-or-path", str(hf),
            "--handler-name", "AlpacaStyleInstructionHandler", "--prompt-type", "qwen3",
            "--output-prefix", str(root / "data" / "alpaca"), "--seq-length", "128")
    ckpt = {}
    for name, tp, ep, etp, grouped in (("ep1", 1, 1, None, False), ("ep1_grouped", 1, 1, None, True),
                                       ("ep2_grouped", 1, 2, None, True), ("tp2_etp1", 2, 1, 1, False),
                                       ("tp2ep2_etp1_grouped", 2, 2, 1, True)):
        ckpt[name] = root / f"mg_{name}"
        convert_hf_to_mg(Hf2MgOptions(load_dir=hf, save_dir=ckpt[name], tp=tp, ep=ep, etp=etp, grouped_gemm=grouped),
                         log=lambda m: None)
    return {"root": root, "hf": hf, "data": str(root / "data" / "alpaca"), "ckpt": ckpt}


@pytest.fixture(scope="module")
def runs(moe) -> dict:
    """3 iterations: SequentialMLP at EP1 (the reference), GroupedMLP at EP1 (one process); GroupedMLP at EP2 with
    the alltoall dispatcher and a save, and expert-TP 1 at TP2 (+SP; sequential) and TP2 x EP2 (grouped, saved)
    (two processes)."""
    root, ckpt = moe["root"], moe["ckpt"]
    base = train_argv(moe, 3, "--finetune", "--save-interval", "3")
    single = launch_plan(root, "grouped_single", [
        {"name": "sequential", "argv": base + ["--load", str(ckpt["ep1"]), "--save", str(root / "save_seq")]},
        {"name": "grouped_ep1", "argv": base + [GROUPED, "--load", str(ckpt["ep1_grouped"])]},
    ], nproc=1)
    double = launch_plan(root, "grouped_double", [
        {"name": "grouped_ep2", "argv": base + [GROUPED, "--load", str(ckpt["ep2_grouped"]),
                                                "--expert-model-parallel-size", "2",
                                                "--moe-token-dispatcher-type", "alltoall",
                                                "--save", str(root / "save_grouped_ep2")]},
        {"name": "etp1_tp2", "argv": base + ["--load", str(ckpt["tp2_etp1"]), "--tensor-model-parallel-size", "2",
                                             "--sequence-parallel", "--expert-tensor-parallel-size", "1"]},
        {"name": "etp1_tp2ep2_grouped", "argv": base + [GROUPED, "--load", str(ckpt["tp2ep2_etp1_grouped"]),
                                                        "--tensor-model-parallel-size", "2", "--sequence-parallel",
                                                        "--expert-model-parallel-size", "2",
                                                        "--expert-tensor-parallel-size", "1",
                                                        "--save", str(root / "save_etp1")]},
    ], nproc=2)
    return {**single, **double}


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["grouped_ep1", "grouped_ep2", "etp1_tp2", "etp1_tp2ep2_grouped"])
def test_grouped_training_equals_sequential(runs, name):
    """Losses, grad norms and load-balancing losses of GroupedMLP runs, and of expert-TP 1 runs, equal the
    one-process SequentialMLP run's (fp32, 1e-5)."""
    ref = runs["sequential"]
    assert_close(runs[name]["losses"], ref["losses"])
    assert_close(runs[name]["grad_norms"], ref["grad_norms"])
    assert_close(lb_losses(runs[name]), lb_losses(ref))


@pytest.mark.distributed
def test_grouped_save_converts_back_to_hf(moe, runs, tmp_path):
    """The GroupedMLP saves (weight1/weight2 per EP rank; at EP2 and at TP2 x EP2 with expert-TP 1) convert back to
    HF: the trained weights of the SequentialMLP run, expert for expert."""
    root = moe["root"]
    state = torch.load(root / "save_grouped_ep2" / "iter_0000003" / "mp_rank_00_001" / layout.FILE_NAME,
                       map_location="cpu", weights_only=True)
    assert "decoder.layers.0.mlp.experts.weight1" in state["model"]
    assert not any(".local_experts." in k for k in state["model"])
    etp1 = sorted(p.name for p in (root / "save_etp1" / "iter_0000003").iterdir())
    assert etp1 == ["mp_rank_00_000", "mp_rank_01_001"]     # the coexisting (TP, EP) ranks only
    for name in ("save_grouped_ep2", "save_seq", "save_etp1"):
        convert("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", root / name,
                "--save-dir", tmp_path / name, "--hf-cfg-dir", moe["hf"])
    sequential, original = hf_tensors(tmp_path / "save_seq"), hf_tensors(moe["hf"])
    expert = "model.layers.1.mlp.experts.6.up_proj.weight"
    assert not torch.equal(sequential[expert], original[expert])
    for name in ("save_grouped_ep2", "save_etp1"):
        trained = hf_tensors(tmp_path / name)
        assert sorted(trained) == sorted(original)
        for key, tensor in sequential.items():
            torch.testing.assert_close(trained[key], tensor, rtol=1e-4, atol=1e-6, msg=f"{name} {key}")


@pytest.mark.parametrize("grouped", [False, True], ids=["sequential", "grouped"])
@pytest.mark.parametrize("ep, pairs", [(2, [(0, 0), (1, 1)]), (4, [(0, 0), (0, 2), (1, 1), (1, 3)])])
def test_expert_tp1_writes_whole_experts_on_coexisting_ranks(moe_hf, tmp_path, grouped, ep, pairs):
    """--expert-tensor-parallel-size 1 at TP2: only the (TP, EP) files that coexist in a replica are written
    (MindSpeed's `get_etp_valid_ckpts_list`), each with its TP shard of attention and its EP rank's whole experts;
    hf -> mg -> hf is bit-exact."""
    flags = ["--target-tensor-parallel-size", "2", "--target-expert-parallel-size", str(ep),
             "--expert-tensor-parallel-size", "1", *([GROUPED] if grouped else [])]
    mg = hf2mg(moe_hf, tmp_path / "mg", *flags)
    files = _rank_files(mg)
    assert sorted(files) == [f"mp_rank_{t:02d}_{e:03d}" for t, e in pairs]
    hf = hf_tensors(moe_hf)
    e_loc = 8 // ep
    for (t, e), state in zip(pairs, files.values()):
        sd = state["model"]
        assert state["args"].expert_tensor_parallel_size == 1
        gate, up = (hf[f"model.layers.1.mlp.experts.{e * e_loc + 1}.{n}_proj.weight"] for n in ("gate", "up"))
        fc1 = (sd["decoder.layers.1.mlp.experts.weight1"].view(e_loc, 64, -1)[1].T if grouped
               else sd["decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight"])
        assert torch.equal(fc1, torch.cat([gate, up]))             # whole expert: F = 32 rows of each
        qkv = sd["decoder.layers.1.self_attention.linear_qkv.weight"]
        assert qkv.shape[0] == (4 + 2 * 2) * 16 // 2               # attention still split over TP
    back = tmp_path / "hf"
    convert("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg, "--save-dir", back,
            "--hf-cfg-dir", moe_hf)
    restored = hf_tensors(back)
    assert sorted(restored) == sorted(hf)
    for key, tensor in hf.items():
        assert torch.equal(restored[key], tensor), key


def test_expert_tp_errors(moe_hf, capsys, tmp_path):
    out = tmp_path / "out"
    err = _error(capsys, "--load-dir", moe_hf, "--save-dir", out, "--target-tensor-parallel-size", "2",
                 "--expert-tensor-parallel-size", "4")
    assert err.startswith("error: --expert-tensor-parallel-size 4: only 1") and "MindSpeed" in err
    mg = hf2mg(moe_hf, tmp_path / "mg", "--target-tensor-parallel-size", "2")
    err = _error(capsys, "--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg, "--save-dir",
                 tmp_path / "hf", "--expert-tensor-parallel-size", "1")
    assert "--expert-tensor-parallel-size 1 disagrees with the checkpoint, which was saved with 2" in err
    assert not out.exists() and not (tmp_path / "hf").exists()


def test_training_flags_against_the_checkpoint_are_one_line(moe):
    """--moe-grouped-gemm on a SequentialMLP checkpoint, and an expert-TP size other than 1 or TP: one error line
    each, exit 2."""
    base = train_argv(moe, 1, "--finetune")
    proc = run_cli("posttrain_gpt.py", *base, GROUPED, "--load", str(moe["ckpt"]["ep1"]), check=False)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "SequentialMLP layout; pass --moe-grouped-gemm exactly when the checkpoint was" in lines[0]
    proc = run_cli("posttrain_gpt.py", *base, "--load", str(moe["ckpt"]["ep1"]), "--expert-tensor-parallel-size",
                   "2", check=False)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1 and "--expert-tensor-parallel-size 2: only 1" in lines[0]
