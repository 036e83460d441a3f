"""Loading never runs code from a checkpoint or tokenizer directory, and damaged checkpoints are one-line errors,
through posttrain_gpt.py, inference.py and convert_ckpt.py."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mindspeed_llm.checkpoint import layout
from tests.conftest import run_cli
from tests.train_fixtures import env, model_flags, train_flags  # noqa: F401  (env is a fixture)

RANK0 = "iter_0000001/mp_rank_00/model_optim_rng.pt"


class Payload:
    """Unpickling this runs `touch MARKER` (what a crafted checkpoint would do with the full unpickler)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def plant_payload(rank_file: Path, marker: Path) -> None:
    state = layout.load_rank_file(rank_file, mmap=False)
    torch.save({**state, "args": Payload(marker)}, rank_file)


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def error_line(result: dict) -> str:
    lines = [ln for ln in result["stderr"].splitlines() if "error: " in ln]
    assert result["rc"] != 0 and len(lines) == 1, result["stderr"][-3000:]
    assert "Traceback" not in result["stderr"], result["stderr"][-3000:]
    return lines[0]


def run_cases(cases: list[dict], tmp: Path) -> dict:
    (tmp / "cases.json").write_text(json.dumps(cases))
    run_cli("tests/cli_cases.py", str(tmp / "cases.json"), str(tmp / "results.json"))
    return json.loads((tmp / "results.json").read_text())


@pytest.fixture(scope="module")
def trained(env, tmp_path_factory) -> Path:
    """A training checkpoint of a 2-iteration run stopped after 1, with the distributed optimizer (model_optim_rng.pt + distrib_optim.pt)."""
    root = tmp_path_factory.mktemp("safe_train")
    argv = model_flags(env["hf"]) + train_flags(2) + ["--lr-warmup-iters", "0", "--exit-interval", "1",
        "--finetune", "--data-path", env["plain"], "--load", str(env["ckpt"][(1, 1)]), "--save", str(root / "ckpt"),
        "--use-distributed-optimizer"]
    run_cli("posttrain_gpt.py", *argv)
    assert (root / "ckpt" / "iter_0000001" / "mp_rank_00" / "distrib_optim.pt").is_file()
    return root / "ckpt"


@pytest.mark.distributed
def test_damaged_and_crafted_checkpoints_through_the_clis(env, trained, tmp_path):
    converted = env["ckpt"][(1, 1)]
    marker = tmp_path / "PWNED"
    cases, expect = [], {}

    def case(name: str, script: str, argv: list[str], *needles: str, absent: tuple = ()) -> None:
        cases.append({"name": name, "script": script, "argv": argv})
        expect[name] = (needles, absent)

    # posttrain_gpt.py resuming the training checkpoint (no --finetune: optimizer + distrib_optim.pt are read)
    def train_argv(load: Path, *extra: str) -> list[str]:
        return model_flags(env["hf"]) + train_flags(2) + ["--lr-warmup-iters", "0", "--data-path", env["plain"],
                                                           "--load", str(load),
                                                           "--use-distributed-optimizer", *extra]

    ck = copy_ckpt(trained, tmp_path / "t_payload")
    plant_payload(ck / RANK0, marker)
    case("train_payload", "posttrain_gpt.py", train_argv(ck), str(ck / RANK0), "posix.system", "not allowed")
    ck = copy_ckpt(trained, tmp_path / "t_trunc")
    truncate(ck / RANK0)
    case("train_trunc", "posttrain_gpt.py", train_argv(ck), str(ck / RANK0), "truncated")
    distrib = "iter_0000001/mp_rank_00/distrib_optim.pt"
    ck = copy_ckpt(trained, tmp_path / "t_dtrunc")
    truncate(ck / distrib)
    case("train_distrib_trunc", "posttrain_gpt.py", train_argv(ck), str(ck / distrib), "truncated")
    ck = copy_ckpt(trained, tmp_path / "t_dempty")
    (ck / distrib).write_bytes(b"")
    case("train_distrib_empty", "posttrain_gpt.py", train_argv(ck), str(ck / distrib), "is empty")
    ck = copy_ckpt(trained, tmp_path / "t_dgone")
    (ck / distrib).unlink()
    case("train_distrib_deleted", "posttrain_gpt.py", train_argv(ck), str(ck / distrib), "incomplete",
         absent=("--no-load-optim",))
    ck = copy_ckpt(trained, tmp_path / "t_tracker")
    (ck / layout.TRACKER).write_bytes(b"\x00\xffgarbage")
    case("train_tracker", "posttrain_gpt.py", train_argv(ck), str(ck / layout.TRACKER), "not an iteration number")

    # an interrupted re-save of iteration 1 (old copy set aside, new one never renamed in): resuming loads the
    # copy set aside with a notice, and the next save publishes iteration 2 and tidies up
    ck = copy_ckpt(trained, tmp_path / "t_resave")
    (ck / ".iter_0000001.old-x").mkdir()
    os.replace(ck / "iter_0000001", ck / ".iter_0000001.old-x" / "iter_0000001")
    (ck / ".iter_0000001.tmp-y" / "mp_rank_00").mkdir(parents=True)
    case("train_resave", "posttrain_gpt.py", train_argv(ck, "--save", str(ck)))

    # inference.py on the converted checkpoint
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello"}) + "\n")

    def infer_argv(load: Path) -> list[str]:
        return ["--load", str(load), "--tokenizer-name-or-path", str(env["hf"]), "--max-new-tokens", "2",
                "--input-file", str(prompts), "--output-file", str(load / "out.jsonl")]

    ck = copy_ckpt(converted, tmp_path / "i_payload")
    plant_payload(ck / RANK0, marker)
    case("infer_payload", "inference.py", infer_argv(ck), str(ck / RANK0), "posix.system")
    ck = copy_ckpt(converted, tmp_path / "i_trunc")
    truncate(ck / RANK0, 0.3)
    case("infer_trunc", "inference.py", infer_argv(ck), str(ck / RANK0), "truncated")
    ck = copy_ckpt(converted, tmp_path / "i_tracker")
    (ck / layout.TRACKER).write_text("latest")
    case("infer_tracker", "inference.py", infer_argv(ck), str(ck / layout.TRACKER), "not an iteration number")

    # convert_ckpt.py mg -> hf
    def mg2hf_argv(load: Path, out: Path) -> list[str]:
        return ["--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", str(load), "--save-dir", str(out)]

    ck = copy_ckpt(converted, tmp_path / "c_payload")
    plant_payload(ck / RANK0, marker)
    case("convert_payload", "convert_ckpt.py", mg2hf_argv(ck, tmp_path / "c_out1"), str(ck / RANK0), "posix.system")
    ck = copy_ckpt(converted, tmp_path / "c_empty")
    (ck / RANK0).write_bytes(b"")
    case("convert_empty", "convert_ckpt.py", mg2hf_argv(ck, tmp_path / "c_out2"), str(ck / RANK0), "is empty")
    ck = copy_ckpt(converted, tmp_path / "c_trunc")
    truncate(ck / RANK0, 0.7)
    case("convert_trunc", "convert_ckpt.py", mg2hf_argv(ck, tmp_path / "c_out3"), str(ck / RANK0), "truncated")
    ck = copy_ckpt(converted, tmp_path / "c_tracker")
    (ck / layout.TRACKER).write_text("12abc")
    case("convert_tracker", "convert_ckpt.py", mg2hf_argv(ck, tmp_path / "c_out4"), str(ck / layout.TRACKER),
         "not an iteration number")
    # the training checkpoint converts too (its args and RNG state are plain values)
    case("convert_trained", "convert_ckpt.py", mg2hf_argv(trained, tmp_path / "c_trained"))

    results = run_cases(cases, tmp_path)
    assert not marker.exists(), "a planted payload ran"
    for name, (needles, absent) in expect.items():
        if not needles:
            assert results[name]["rc"] == 0, results[name]["stderr"][-3000:]
            continue
        line = error_line(results[name])
        assert all(n in line for n in needles), (name, line)
        assert not any(a in line for a in absent), (name, line)
    assert (tmp_path / "c_trained" / "model.safetensors.index.json").is_file()
    assert "loading .iter_0000001.old-x/iter_0000001 instead" in results["train_resave"]["stderr"]
    assert "at iteration 1" in results["train_resave"]["stdout"]
    assert sorted(p.name for p in (tmp_path / "t_resave").iterdir()) == ["iter_0000001", "iter_0000002",
                                                                        layout.TRACKER]
    assert not any((tmp_path / f"c_out{i}").exists() for i in range(1, 5))
    # the payload is live: the full unpickler would have run it
    torch.load(tmp_path / "c_payload" / RANK0, weights_only=False)
    assert marker.exists()


def megatron_style(src: Path, dst: Path) -> Path:
    """`src` rewritten as Megatron-LM saves it: args an argparse.Namespace, numpy arrays in rng_state."""
    from megatron.core.enums import ModelType

    shutil.copytree(src, dst)
    path = dst / RANK0
    state = layout.load_rank_file(path, mmap=False)
    state["args"].model_type = ModelType.encoder_or_decoder
    state["args"].params_dtype = torch.bfloat16
    state["rng_state"] = [{"random_rng_state": __import__("random").getstate(), "np_rng_state": np.random.get_state(),
                           "torch_rng_state": torch.get_rng_state(), "rng_tracker_states": {}}]
    torch.save(state, path)
    assert isinstance(torch.load(path, weights_only=False)["args"], argparse.Namespace)
    return dst


def test_megatron_namespace_checkpoint_converts(env, tmp_path):
    from safetensors.torch import load_file

    mg = megatron_style(env["ckpt"][(1, 1)], tmp_path / "mg")
    out = tmp_path / "hf"
    proc = run_cli("convert_ckpt.py", "--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", str(mg),
                   "--save-dir", str(out), "--hf-cfg-dir", str(env["hf"]))
    assert proc.returncode == 0
    ours = {}
    for f in out.glob("*.safetensors"):
        ours.update(load_file(f))
    ref = {}
    for f in Path(env["hf"]).glob("*.safetensors"):
        ref.update(load_file(f))
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)


def test_save_dir_inside_hf_cfg_dir_is_refused(env, tmp_path):
    cfg = tmp_path / "cfg"
    shutil.copytree(env["hf"], cfg)
    before = {p.name: p.read_bytes() for p in cfg.iterdir() if p.is_file()}
    (tmp_path / "link").symlink_to(cfg)
    for save in (cfg, cfg / "sub", tmp_path / "link", cfg / ".." / "cfg"):
        proc = run_cli("convert_ckpt.py", "--load-model-type", "mg", "--save-model-type", "hf", "--load-dir",
                       str(env["ckpt"][(1, 1)]), "--save-dir", str(save), "--hf-cfg-dir", str(cfg), check=False)
        lines = [ln for ln in proc.stderr.splitlines() if "error: " in ln]
        assert proc.returncode != 0 and len(lines) == 1 and "--hf-cfg-dir" in lines[0], proc.stderr
    assert {p.name: p.read_bytes() for p in cfg.iterdir() if p.is_file()} == before
    assert not (cfg / "sub").exists()


def test_resave_killed_between_renames_keeps_a_loadable_checkpoint(tmp_path, monkeypatch, capsys):
    """publish_iteration of an existing iteration, killed after moving the old copy aside: the tracker names a
    missing directory, loading falls back to the copy set aside, and the next save cleans the temporaries."""
    save = tmp_path / "ckpt"

    def save_iteration(iteration: int, value: float) -> None:
        tmp = layout.new_iteration_dir(save, iteration)
        layout.save_rank_file(tmp, "mp_rank_00", layout.checkpoint_state(
            argparse.Namespace(v=value), {"model": {"w": torch.full((2,), value)}}, iteration))
        layout.publish_iteration(tmp, save, iteration)

    save_iteration(1, 1.0)
    real_replace = os.replace

    def killed_before_second_rename(src, dst):
        if Path(dst) == save / "iter_0000001" and ".tmp-" in str(src):
            raise KeyboardInterrupt   # the old copy is aside; the process dies before the new one is renamed in
        return real_replace(src, dst)

    monkeypatch.setattr(layout.os, "replace", killed_before_second_rename)
    with pytest.raises(KeyboardInterrupt):
        save_iteration(1, 2.0)
    monkeypatch.setattr(layout.os, "replace", real_replace)
    assert layout.read_tracker(save) == 1 and not (save / "iter_0000001").exists()
    state = layout.load_rank_file(layout.iteration_dir(save) / "mp_rank_00" / layout.FILE_NAME)
    assert float(state["model"]["w"][0]) == 1.0 and state["args"].v == 1.0
    assert "loading .iter_0000001.old-" in capsys.readouterr().err
    save_iteration(2, 3.0)
    assert sorted(p.name for p in save.iterdir()) == ["iter_0000001", "iter_0000002", layout.TRACKER]
    state = layout.load_rank_file(save / "iter_0000001" / "mp_rank_00" / layout.FILE_NAME)
    assert float(state["model"]["w"][0]) == 1.0


def tokenizer_with_code(src: Path, dst: Path, marker: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "marker_tok.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).touch()\n"
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class MarkerTokenizerFast(PreTrainedTokenizerFast):\n    pass\n")
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "MarkerTokenizerFast"
    cfg["auto_map"] = {"AutoTokenizer": [None, "marker_tok.MarkerTokenizerFast"]}
    cfg_path.write_text(json.dumps(cfg))
    return dst


def test_tokenizer_code_runs_only_with_trust_remote_code(env, tmp_path):
    marker = tmp_path / "TOKENIZER_CODE_RAN"
    tok = tokenizer_with_code(env["hf"], tmp_path / "tok", marker)
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps({"instruction": "hi", "input": "", "output": "hello"}) + "\n")
    argv = ["preprocess_data.py", "--input", str(raw), "--tokenizer-name-or-path", str(tok), "--handler-name",
            "AlpacaStyleInstructionHandler", "--prompt-type", "qwen3", "--output-prefix", str(tmp_path / "out" / "a")]
    env_vars = {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    proc = run_cli(*argv, check=False, env=env_vars)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1 and "--trust-remote-code" in lines[0], proc.stderr[-2000:]
    assert not marker.exists()
    run_cli(*argv, "--trust-remote-code", env=env_vars)
    assert marker.exists()


@pytest.mark.parametrize("script", ["posttrain_gpt.py", "inference.py", "preprocess_data.py"])
def test_trust_remote_code_flag_is_known(script):
    proc = run_cli(script, "--help")
    assert "--trust-remote-code" in proc.stdout
