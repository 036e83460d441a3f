"""MindSpeed's --noop-layers: weightless identity layers counted in --num-layers. Placement keeps the local
numbering gap (reference checkpoint_conversion.md section 4.4), conversion hf -> mg -> hf is bit-identical, and
training the converted tiny Qwen3-MoE with noop layers (PP2, and noop layers inside a stage) gives the losses of
the model without them; its save converts back to the HF model that run saves."""
from __future__ import annotations

import math

import pytest
import torch

from mindspeed_llm.checkpoint import cli, layout
from mindspeed_llm.models.placement import PlacementError, parse_noop_layers, place_layers
from tests.conftest import run_cli
from tests.test_convert import convert, hf_tensors
from tests.test_moe_train import train_argv
from tests.train_fixtures import launch_plan

REL = 1e-5


def test_placement_keeps_the_gap():
    # the reference's example: N=6 = 4 HF layers + noop {1,5}, PP 2
    placement = place_layers(6, 2, noop=parse_noop_layers("1,5", 6))
    assert placement.layers == (((0, 1, 2),), ((3, 4, 5),))
    assert placement.hf_layers(0, 0) == (0, None, 1) and placement.hf_layers(1, 0) == (2, 3, None)
    assert parse_noop_layers("94,95", real_layers=94) == {94, 95}
    for bad in ("6", "1,1", "a"):
        with pytest.raises(PlacementError, match="--noop-layers"):
            parse_noop_layers(bad, 6)
    with pytest.raises(PlacementError, match="--num-layer-list cannot be combined with --noop-layers"):
        place_layers(6, 2, [3, 3], noop=frozenset({5}))


def _hf2mg(hf, mg, *flags: str):
    convert("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", hf, "--save-dir", mg,
            "--model-type-hf", "qwen3-moe", *flags)
    return mg


def _mg2hf(mg, out, cfg_dir, *flags: str):
    convert("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg, "--save-dir", out,
            "--hf-cfg-dir", cfg_dir, *flags)
    return hf_tensors(out)


@pytest.fixture(scope="module")
def noop(tiny_model_factory, tmp_path_factory) -> dict:
    """The tiny Qwen3-MoE (4 layers), demo data, and its conversions without and with noop layers."""
    from mindspeed_llm.demo_data import write_demo_data

    hf = tiny_model_factory("qwen3-moe")
    root = tmp_path_factory.mktemp("noop")
    files = write_demo_data(root / "raw", n_train=40, n_test=2)
    run_cli("preprocess_data.py", "--input", str(files["alpaca_train"]), "--tokenizer-name-or-path", str(hf),
            "--handler-name", "AlpacaStyleInstructionHandler", "--prompt-type", "qwen3",
            "--output-prefix", str(root / "data" / "alpaca"), "--seq-length", "128")
    ckpt = {"plain": _hf2mg(hf, root / "mg_plain"),
            "pp2_tail": _hf2mg(hf, root / "mg_pp2_tail", "--target-pipeline-parallel-size", "2",
                               "--noop-layers", "4,5"),
            "inner": _hf2mg(hf, root / "mg_inner", "--noop-layers", "1,5")}
    return {"root": root, "hf": hf, "data": str(root / "data" / "alpaca"), "ckpt": ckpt}


def test_conversion_round_trip_and_layout(noop, capsys):
    iter_dir = layout.iteration_dir(noop["ckpt"]["inner"])
    args = layout.read_args(iter_dir)
    assert args.num_layers == 6 and args.noop_layers == "1,5"
    state = layout.load_rank_file(iter_dir / layout.rank_dir_name(0, 0, 1) / layout.FILE_NAME)
    local = {int(k.split(".")[2]) for k in state["model"] if k.startswith("decoder.layers.")}
    assert local == {0, 2, 3, 4}          # HF layers 0..3 at global 0, 2, 3, 4; the noop slots hold nothing
    original = hf_tensors(noop["hf"])
    for name in ("inner", "pp2_tail"):
        back = _mg2hf(noop["ckpt"][name], noop["root"] / f"back_{name}", noop["hf"])
        assert back.keys() == original.keys()
        assert all(torch.equal(back[k], original[k]) for k in original), name
    wrong = noop["root"] / "wrong_noop"
    assert cli.main(["--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", str(noop["ckpt"]["inner"]),
                     "--save-dir", str(wrong), "--noop-layers", "4,5"]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "--noop-layers 4,5 disagrees with the checkpoint, which was saved with 1,5" in errors[0], errors
    assert not wrong.exists()


@pytest.mark.distributed
def test_training_with_noop_layers_matches_the_model_without(noop, tmp_path):
    """Two processes: DP2 without noop layers (the reference), PP2 with noop layers 4,5 (a stage holding a noop
    tail) and DP2 with noop layers 1,5 inside the stage; same losses and grad norms, and the saves convert back to
    the same HF tensors."""
    run = train_argv(noop, 3, "--finetune", "--manual-gc", "--manual-gc-interval", "1")
    saves = {name: tmp_path / name for name in ("ref", "pp2_tail", "inner")}
    plan = [
        {"name": "ref", "argv": run + ["--load", str(noop["ckpt"]["plain"]), "--save", str(saves["ref"])]},
        {"name": "pp2_tail", "argv": run + ["--load", str(noop["ckpt"]["pp2_tail"]), "--num-layers", "6",
                                            "--noop-layers", "4,5", "--pipeline-model-parallel-size", "2",
                                            "--save", str(saves["pp2_tail"])]},
        {"name": "inner", "argv": run + ["--load", str(noop["ckpt"]["inner"]), "--num-layers", "6",
                                         "--noop-layers", "1,5", "--save", str(saves["inner"])]},
    ]
    out = launch_plan(tmp_path, "noop", plan, nproc=2)
    ref = out["ref"]
    assert len(ref["losses"]) == 3 and all(math.isfinite(x) for x in ref["losses"])
    for name in ("pp2_tail", "inner"):
        for key in ("losses", "grad_norms"):
            assert out[name][key] == pytest.approx(ref[key], rel=REL), (name, key)
        assert out[name]["metrics"][0]["load_balancing_loss"] == pytest.approx(
            ref["metrics"][0]["load_balancing_loss"], rel=REL), name
    expected = _mg2hf(saves["ref"], tmp_path / "ref_hf", noop["hf"])
    for name in ("pp2_tail", "inner"):
        back = _mg2hf(saves[name], tmp_path / f"{name}_hf", noop["hf"])
        assert back.keys() == expected.keys()
        worst = max(float((back[k] - expected[k]).abs().max()) for k in expected)
        assert worst < 1e-5, (name, worst)


def test_generation_refuses_a_checkpoint_with_noop_layers(noop):
    """inference.py builds real layers only: one line saying how to load the model instead, exit 2."""
    proc = run_cli("inference.py", "--load", str(noop["ckpt"]["inner"]), "--tokenizer-name-or-path",
                   str(noop["hf"]), "--task", "greedy", "--prompt", "hi", "--max-new-tokens", "2", check=False)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "saved with --noop-layers 1,5" in errors[0] and "mg -> hf drops them" in errors[0]
