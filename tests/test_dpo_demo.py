"""The DPO demo end to end through the CLIs: the demo's preference pairs (`demo_data.write_demo_data`), preprocessed
with preprocess_data.py, the tiny Qwen3 model converted with convert_ckpt.py, then posttrain_gpt.py --stage dpo
with validation on held-out pairs (arguments absent from training). The held-out reward accuracy, read from
Megatron's validation lines, rises from 0 (policy = reference: every pair ties) to well above chance."""
from __future__ import annotations

import json
import math
import re

import pytest

from tests.conftest import run_cli, run_torchrun
from tests.test_dpo import dpo_flags

TRAIN_PAIRS, HELD_OUT, BATCH, EVAL_ITERS = 400, 64, 16, 4      # HELD_OUT = EVAL_ITERS x BATCH: each eval sees all
ITERS, EVAL_INTERVAL = 80, 40
# Measured at iteration 80 (64 held-out pairs): 0.98.
MIN_ACCURACY = 0.7
VALIDATION = re.compile(r"validation loss at iteration (\d+) \| (.*)")


def validation_results(stdout: str) -> dict[int, dict[str, float]]:
    """{iteration: {key: value}} from Megatron's validation lines (`KEY value: V | KEY PPL: P |`)."""
    out = {}
    for line in stdout.splitlines():
        found = VALIDATION.search(line)
        if found:
            out[int(found.group(1))] = {k.strip(): float(v) for k, v in re.findall(r"([a-z/ ]+) value: ([-0-9.E+]+)",
                                                                             found.group(2))}
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_qwen3) -> dict:
    from mindspeed_llm.demo_data import write_demo_data

    root = tmp_path_factory.mktemp("dpo_demo")
    files = write_demo_data(root / "raw", n_train=TRAIN_PAIRS, n_test=200)
    held_out = files["pairwise_test"].read_text().splitlines()[:HELD_OUT]
    # One file, training pairs first: --split TRAIN_PAIRS,HELD_OUT,0 makes the held-out pairs the valid range.
    (root / "pairs.jsonl").write_text(files["pairwise_train"].read_text() + "\n".join(held_out) + "\n")
    run_cli("preprocess_data.py", "--input", str(root / "pairs.jsonl"), "--tokenizer-name-or-path", str(tiny_qwen3),
            "--output-prefix", str(root / "data" / "pairs"), "--handler-name", "AlpacaStylePairwiseHandler",
            "--prompt-type", "qwen3")
    run_cli("convert_ckpt.py", "--load-model-type", "hf", "--save-model-type", "mg", "--model-type-hf", "qwen3",
            "--load-dir", str(tiny_qwen3), "--save-dir", str(root / "mg"), "--target-tensor-parallel-size", "1",
            "--target-pipeline-parallel-size", "1")
    env = {"hf": tiny_qwen3, "data": str(root / "data" / "pairs"), "ckpt": {("base", 1, 1): root / "mg"}}
    # Later flags win: the demo's batch, schedule and held-out validation over the shared test flags.
    argv = dpo_flags(env, ITERS, ref=False) + [
        "--micro-batch-size", str(BATCH), "--global-batch-size", str(BATCH), "--lr", "1e-3", "--min-lr", "1e-3",
        "--lr-decay-style", "constant", "--lr-warmup-iters", "0", "--weight-decay", "0", "--dpo-beta", "0.5",
        "--no-pad-to-seq-lengths", "--split", f"{TRAIN_PAIRS},{HELD_OUT},0", "--eval-iters", str(EVAL_ITERS),
        "--eval-interval", str(EVAL_INTERVAL), "--log-interval", "10"]
    before = run_torchrun("posttrain_gpt.py", *argv, "--skip-train", nproc=1).stdout
    after = run_torchrun("posttrain_gpt.py", *argv, nproc=1).stdout
    return {"files": files, "before": validation_results(before), "after": validation_results(after)}


def test_pairwise_demo_data(tmp_path):
    from mindspeed_llm.demo_data import TASKS, write_demo_data

    files = write_demo_data(tmp_path, n_train=200, n_test=60)
    train, test = ([json.loads(ln) for ln in files[f"pairwise_{s}"].read_text().splitlines()] for s in ("train", "test"))
    solvers = {instruction: solve for instruction, solve in TASKS.values()}
    assert len(train) == 200 and 0 < len(test) <= 60
    for row in train + test:
        assert row["chosen"] == solvers[row["instruction"]](row["input"]) != row["rejected"], row
    assert not {r["input"] for r in test} & {r["input"] for r in train}
    again = write_demo_data(tmp_path / "again", n_train=200, n_test=60)
    assert again["pairwise_test"].read_text() == files["pairwise_test"].read_text()


@pytest.mark.distributed
def test_held_out_reward_accuracy_rises(demo):
    before, after = demo["before"], demo["after"]
    assert list(before) == [0] and list(after) == [EVAL_INTERVAL, ITERS], (before, after)
    start, end = before[0], after[ITERS]
    print(f"held-out reward accuracy: {start['rewards/accuracies']:.3f} before, "
          f"{after[EVAL_INTERVAL]['rewards/accuracies']:.3f} at {EVAL_INTERVAL}, {end['rewards/accuracies']:.3f} at {ITERS}")
    # --skip-train evaluates the loaded weights: policy = reference, so every reward is 0 and the loss is ln 2.
    assert start["rewards/accuracies"] == 0.0 and start["rewards/margins"] == 0.0
    assert abs(start["lm loss"] - math.log(2)) < 1e-6
    assert end["rewards/accuracies"] >= MIN_ACCURACY, after
    assert end["rewards/margins"] > 0.5 and end["rewards/chosen"] > end["rewards/rejected"], after
    assert end["lm loss"] < math.log(2) - 0.2, after
    assert set(end) == {"lm loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                        "logps/chosen", "logps/rejected"}
