"""What a 2-process training run prints: notices once (rank 0), no backend notice the user did not ask for, and
Megatron's argument dump holding only real flags."""
from __future__ import annotations

import re

import pytest

from mindspeed_llm.arguments import build_train_parser
from tests.conftest import run_torchrun
from tests.train_fixtures import env, model_flags, train_flags  # noqa: F401  (env is a fixture)


@pytest.mark.distributed
def test_two_rank_run_logs_once(env, tmp_path):
    flags = [f for f in train_flags(2) if f not in ("--distributed-backend", "nccl")]     # backend not typed
    proc = run_torchrun("posttrain_gpt.py", *model_flags(env["hf"]), *flags, "--data-path", env["plain"],
                        "--load", str(env["ckpt"][(1, 1)]), "--finetune", "--use-mcore-models")
    notices = [ln for ln in proc.stderr.splitlines() if ln.startswith("[mindspeed_llm] ")]
    assert notices and len(notices) == len(set(notices)), notices              # each once, not once per rank
    assert sum("--use-flash-attn: accepted" in ln for ln in notices) == 1
    assert not any("--distributed-backend" in ln for ln in notices), notices
    assert "--use-mcore-models: accepted, no effect: models are always megatron-core" in proc.stderr
    # Megatron's log line: TFLOP/s only with --log-throughput (not given here)
    assert " iteration        2/       2 |" in proc.stdout and "TFLOP/s" not in proc.stdout

    dump = proc.stdout.split("MindSpeed-LLM Arguments ---", 1)[1].split("end of MindSpeed-LLM Arguments", 1)[0]
    keys = re.findall(r"^  (\w+) \.+ ", dump, re.M)
    flags_known = {a.dest for a in build_train_parser()._actions}
    assert keys and set(keys) <= flags_known, sorted(set(keys) - flags_known)
    assert "explicit" not in keys and "micro_batch_size" in keys
    assert proc.stdout.count("- MindSpeed-LLM Arguments ---") == 1           # rank 0 only
    assert proc.stdout.count("--handler-name AlpacaStyleInstructionHandler: taken from") == 1


def test_validation_line_gives_a_perplexity_to_losses_only():
    from mindspeed_llm.training.log import validation_line

    line = validation_line(40, 0.5, {"rewards/chosen": 1.25, "logps/chosen": -32.0, "rewards/accuracies": 0.75})
    assert "lm loss value: 5.000000E-01 | lm loss PPL: 1.648721E+00 |" in line
    assert "logps/chosen value: -3.200000E+01 |" in line and "PPL" not in line.split("lm loss PPL", 1)[1]
