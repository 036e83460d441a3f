"""Faults through the entry points: NaN gradients never reach the weights or a checkpoint, data and sidecar (and
tokenizer) must belong together, and every fault is one `error:` line naming the file or flag."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from tests.train_fixtures import env, model_flags, train_flags  # noqa: F401  (env is a fixture)

# --lr 1e4 without warmup: iteration 4's loss is finite but its gradient is NaN (the weights saturated).
NAN_FLAGS = ["--lr", "1e4", "--lr-warmup-iters", "0", "--train-iters", "6"]
NAN_ITER = 4
PREPROCESS = ["--handler-name", "AlpacaStyleInstructionHandler", "--prompt-type", "qwen3", "--seq-length", "128"]


def _train(env: dict, *extra: str, data: str | None = None, load=None, finetune: bool = True,
           tokenizer: Path | None = None):
    argv = model_flags(tokenizer or env["hf"]) + train_flags(2) + ["--data-path", data or env["plain"]]
    if load is not False:
        argv += ["--load", str(load or env["ckpt"][(1, 1)])]
    if finetune:
        argv.append("--finetune")
    return run_cli("posttrain_gpt.py", *argv, *extra, check=False)


def _error_line(proc, *needles: str) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _log_lines(stdout: str) -> dict[int, str]:
    return {int(m.group(1)): line for line in stdout.splitlines()
            if (m := re.search(r"iteration\s+(\d+)/\s*\d+ \|", line))}


def _ckpt(save: Path, iteration: int) -> dict:
    path = save / f"iter_{iteration:07d}" / "mp_rank_00" / "model_optim_rng.pt"
    return torch.load(path, map_location="cpu", weights_only=False)   # our own test output


def _finite(state: dict) -> bool:
    return all(torch.isfinite(t).all() for t in state["model"].values() if isinstance(t, torch.Tensor)
               and t.is_floating_point())


# ---- 1. numerical faults ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nan_runs(env, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("nan")
    stop = _train(env, *NAN_FLAGS, "--save", str(tmp / "stop"), "--save-interval", "1")
    skip = _train(env, *NAN_FLAGS, "--save", str(tmp / "skip"), "--save-interval", "3", "--skip-nan")
    return {"dir": tmp, "stop": stop, "skip": skip}


def test_nan_gradient_stops_at_its_iteration_and_is_never_saved(nan_runs):
    proc, save = nan_runs["stop"], nan_runs["dir"] / "stop"
    _error_line(proc, f"iteration {NAN_ITER}", "--skip-nan")
    logs = _log_lines(proc.stdout)
    assert sorted(logs) == list(range(1, NAN_ITER))
    assert all("grad norm:" in line for line in logs.values())
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(NAN_ITER - 1)
    assert not (save / f"iter_{NAN_ITER:07d}").exists()
    for it in range(1, NAN_ITER):
        assert _finite(_ckpt(save, it)), f"checkpoint {it} holds non-finite weights"


def test_skip_nan_skips_the_update_and_says_so(nan_runs):
    proc, save = nan_runs["skip"], nan_runs["dir"] / "skip"
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = _log_lines(proc.stdout)
    assert sorted(logs) == list(range(1, 7))
    nan_iters = [it for it, line in logs.items() if "number of nan iterations:   1" in line]
    assert NAN_ITER in nan_iters
    for it in nan_iters:
        assert "number of skipped iterations:   1" in logs[it]
    final = _ckpt(save, 6)
    assert _finite(final)
    # the scheduler advanced only on the applied updates
    assert final["opt_param_scheduler"]["num_steps"] == (6 - len(nan_iters)) * 4
    lr = {it: re.search(r"learning rate: (\S+) ", line).group(1) for it, line in logs.items()}
    assert lr[NAN_ITER] == lr[NAN_ITER - 1]


def test_resume_with_another_schedule_names_the_scheduler_flags(env, nan_runs, tmp_path):
    load = nan_runs["dir"] / "skip"
    base = ["--lr", "1e4", "--lr-warmup-iters", "0", "--skip-nan", "--train-iters", "8"]
    line = _error_line(_train(env, *base, load=load, finetune=False))
    assert "--override-opt-param-scheduler" in line and "--use-checkpoint-opt-param-scheduler" in line
    proc = _train(env, *base, "--override-opt-param-scheduler", load=load, finetune=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(_log_lines(proc.stdout)) == [7, 8]


# ---- 2. --load must exist ---------------------------------------------------------------------------------------

def test_missing_load_directory_is_an_error(env, tmp_path):
    _error_line(_train(env, load=tmp_path / "no_such_ckpt"), str(tmp_path / "no_such_ckpt"), "--load")


# ---- 3./4. data, sidecar and tokenizer belong together ----------------------------------------------------------

def test_data_replaced_under_an_old_sidecar_is_refused(env, tmp_path):
    raw = env["root"] / "raw"
    for name, source in (("a", "alpaca_train.jsonl"), ("b", "alpaca_test.jsonl")):
        run_cli("preprocess_data.py", "--input", str(raw / source), "--tokenizer-name-or-path", str(env["hf"]),
                *PREPROCESS, "--output-prefix", str(tmp_path / name / "alpaca"))
    # a re-run into prefix a, stopped after the data renames and before the sidecar: b's data, a's sidecar
    for f in (tmp_path / "b").glob("alpaca_packed_*"):
        shutil.copy(f, tmp_path / "a" / f.name)
    _error_line(_train(env, data=str(tmp_path / "a" / "alpaca")), "alpaca_packed_", ".idx", "preprocess_data.py")


def test_tokenizer_with_same_name_but_other_content_is_refused(env, tmp_path):
    other = tmp_path / "other" / env["hf"].name
    shutil.copytree(env["hf"], other, ignore=shutil.ignore_patterns("*.safetensors*", "megatron_cache*"))
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = "a", "b"
    vocab[a], vocab[b] = vocab[b], vocab[a]        # same size and special ids, other token ids
    (other / "tokenizer.json").write_text(json.dumps(spec))
    _error_line(_train(env, tokenizer=other), "tokenizer", "preprocess_data.py")


# ---- 5. one line for each fault ---------------------------------------------------------------------------------

def test_invalid_utf8_input_names_file_and_line(env, tmp_path):
    lines = (env["root"] / "raw" / "alpaca_train.jsonl").read_bytes().splitlines()
    lines[2] = lines[2].replace(b'"output": "', b'"output": "\xff\xfe', 1)
    for suffix in (".jsonl", ".json"):
        bad = tmp_path / f"bad{suffix}"
        bad.write_bytes(b"\n".join(lines) + b"\n" if suffix == ".jsonl" else
                        b"[\n" + b",\n".join(lines) + b"\n]\n")
        proc = run_cli("preprocess_data.py", "--input", str(bad), "--tokenizer-name-or-path", str(env["hf"]),
                       *PREPROCESS, "--output-prefix", str(tmp_path / "out" / "x"), check=False)
        line = _error_line(proc, f"{bad}:{3 if suffix == '.jsonl' else 4}", "UTF-8")
        assert line
    assert not list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up (needs root): {proc.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_is_one_line(env, tiny_disk):
    proc = run_cli("preprocess_data.py", "--input", str(env["root"] / "raw" / "alpaca_train.jsonl"),
                   "--tokenizer-name-or-path", str(env["hf"]), *PREPROCESS, "--output-prefix",
                   str(tiny_disk / "data" / "alpaca"), check=False)
    _error_line(proc, "no space left on device", str(tiny_disk / "data" / "alpaca"))
    assert not list((tiny_disk / "data").iterdir())
    proc = _train(env, "--train-iters", "1", "--lr-warmup-iters", "0", "--save", str(tiny_disk / "ckpt"))
    _error_line(proc, "no space left on device", str(tiny_disk / "ckpt"), "iteration 1")
    assert not (tiny_disk / "ckpt" / "latest_checkpointed_iteration.txt").exists()


def test_seq_length_above_max_position_embeddings(env):
    # the data's --seq-length (128) against a typed position limit below it (a run setting, so it is taken)
    _error_line(_train(env, "--max-position-embeddings", "64"), "--seq-length 128", "--max-position-embeddings 64")


@pytest.fixture(scope="module")
def infer_results(env, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("infer_faults")
    base = ["--load", str(env["ckpt"][(1, 1)]), "--tokenizer-name-or-path", str(env["hf"]), "--max-new-tokens", "4",
            "--prompt-type", "qwen3"]
    long_text = "one two three four five six seven eight nine ten " * 4
    requests = tmp / "long.jsonl"
    requests.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": long_text}) + "\n")
    short = base + ["--seq-length", "32"]
    cases = [{"name": "seq_above_max", "argv": base + ["--seq-length", "1024", "--task", "greedy"]}]
    for task in ("greedy", "do_sample", "beam_search"):
        cases.append({"name": task, "argv": short + ["--task", task, "--prompt", long_text]})
    cases += [
        {"name": "default", "argv": short + ["--prompt", long_text], "stdin": "quit\n"},
        {"name": "chat", "argv": short + ["--task", "chat"], "stdin": long_text + "\nquit\n"},
        {"name": "batch", "argv": short + ["--input-file", str(requests), "--output-file", str(tmp / "out.jsonl")]},
        {"name": "batch_truncated", "argv": short + ["--input-file", str(requests), "--output-file",
                                                     str(tmp / "trunc.jsonl"), "--truncate-prompt"]},
    ]
    (tmp / "cases.json").write_text(json.dumps(cases))
    run_cli("tests/infer_cli_cases.py", str(tmp / "cases.json"), str(tmp / "results.json"))
    return {"dir": tmp, **json.loads((tmp / "results.json").read_text())}


def _infer_error(res: dict, *needles: str) -> None:
    errors = [ln for ln in res["stderr"].splitlines() if ln.startswith("error:")]
    assert res["rc"] == 2 and len(errors) == 1, res["stdout"][-1500:] + res["stderr"][-1500:]
    assert "Traceback" not in res["stderr"]
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_inference_seq_length_above_max_position_embeddings(infer_results):
    _infer_error(infer_results["seq_above_max"], "--seq-length 1024", "--max-position-embeddings 512")


@pytest.mark.parametrize("name", ["greedy", "do_sample", "beam_search", "default", "batch"])
def test_prompt_longer_than_seq_length_is_refused(infer_results, name):
    _infer_error(infer_results[name], "--seq-length 32", "--truncate-prompt")
    assert not (infer_results["dir"] / "out.jsonl").exists()


def test_chat_turn_longer_than_seq_length_is_said_and_the_chat_goes_on(infer_results):
    res = infer_results["chat"]
    assert res["rc"] == 0, res["stderr"][-2000:]
    said = [ln for ln in res["stdout"].splitlines() if ln.startswith("[chat input: the prompt has")]
    assert len(said) == 1 and "--seq-length 32" in said[0] and "--truncate-prompt" in said[0], res["stdout"][-2000:]


def test_truncate_prompt_keeps_the_last_tokens_within_seq_length(infer_results):
    res = infer_results["batch_truncated"]
    assert res["rc"] == 0, res["stderr"][-2000:]
    lines = [json.loads(ln) for ln in (infer_results["dir"] / "trunc.jsonl").read_text().splitlines()]
    assert len(lines[1]["prompt_token_ids"]) == 32 - 4
    assert len(lines[0]["prompt_token_ids"]) + len(lines[0]["response_token_ids"]) <= 32
