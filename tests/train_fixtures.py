"""Shared by the fine-tuning tests: the tiny model's flags and a module fixture with preprocessed demo data
and converted checkpoints."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli


def model_flags(hf_dir: Path) -> list[str]:
    return ("--use-mcore-models --spec mindspeed_llm.tasks.models.spec.qwen3_spec layer_spec --num-layers 4 "
            "--hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4 --group-query-attention "
            "--num-query-groups 2 --kv-channels 16 --qk-layernorm --normalization RMSNorm --norm-epsilon 1e-6 "
            "--swiglu --disable-bias-linear --position-embedding-type rope --use-rotary-position-embeddings "
            "--rotary-base 1000000 --max-position-embeddings 512 --untie-embeddings-and-output-weights "
            "--make-vocab-size-divisible-by 1 --padded-vocab-size 448 --hidden-dropout 0 --attention-dropout 0 "
            "--attention-softmax-in-fp32 --no-masked-softmax-fusion --transformer-impl local "
            "--use-flash-attn --use-fused-rmsnorm --use-fused-swiglu --use-fused-rotary-pos-emb "
            "--tokenizer-type PretrainedFromHF").split() + \
        ["--tokenizer-name-or-path", str(hf_dir)]


def train_flags(iters: int = 3, seq: int = 128) -> list[str]:
    return (f"--micro-batch-size 2 --global-batch-size 4 --train-iters {iters} --lr 1e-3 --min-lr 1e-4 "
            f"--lr-warmup-iters 1 --weight-decay 0.1 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95 --seed 42 "
            f"--split 100,0,0 --is-instruction-dataset --stage sft --prompt-type qwen3 --seq-length {seq} "
            f"--ckpt-format torch --log-interval 1 --eval-iters 0 --distributed-backend nccl").split()


@pytest.fixture(scope="session")
def env(tmp_path_factory, tiny_qwen3) -> dict:
    """Demo data preprocessed plain (seq 128) and packed (seq 256, neat), and the tiny model converted to
    TP1PP1, TP2PP1, TP1PP2."""
    from mindspeed_llm.checkpoint.hf2mg import Hf2MgOptions, convert_hf_to_mg
    from mindspeed_llm.demo_data import write_demo_data

    root = tmp_path_factory.mktemp("train")
    files = write_demo_data(root / "raw", n_train=300, n_test=20)
    common = ["--input", str(files["alpaca_train"]), "--tokenizer-name-or-path", str(tiny_qwen3),
              "--handler-name", "AlpacaStyleInstructionHandler", "--prompt-type", "qwen3"]
    run_cli("preprocess_data.py", *common, "--output-prefix", str(root / "plain" / "alpaca"), "--seq-length", "128")
    run_cli("preprocess_data.py", *common, "--output-prefix", str(root / "pack" / "alpaca"), "--seq-length", "256",
            "--pack", "--neat-pack")
    ckpts = {}
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        ckpts[(tp, pp)] = root / f"mg_tp{tp}pp{pp}"
        convert_hf_to_mg(Hf2MgOptions(load_dir=tiny_qwen3, save_dir=ckpts[(tp, pp)], tp=tp, pp=pp), log=lambda m: None)
    return {"root": root, "hf": tiny_qwen3, "plain": str(root / "plain" / "alpaca"),
            "pack": str(root / "pack" / "alpaca"), "ckpt": ckpts}


def transformers_first_loss(hf_dir, data_prefix: str) -> tuple[float, str]:
    """(loss, model class name) of the first iteration as `transformers` computes it: token-mean cross entropy of
    each of the 2 micro-batches of 2 samples (GBS 4 at DP 1, the data's sample order for seed 42), averaged."""
    import torch
    from transformers import AutoModelForCausalLM

    from mindspeed_llm.training.sft_dataset import SFTDataOptions, build_sft_datasets

    ds = build_sft_datasets(data_prefix, "100,0,0", [12, 0, 0], SFTDataOptions(seq_length=128, seed=42))[0]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    means = []
    with torch.no_grad():
        for mb in range(2):
            total, count = 0.0, 0
            for i in range(2 * mb, 2 * mb + 2):
                ids, labels = torch.tensor(ds[i]["input_ids"])[None], torch.tensor(ds[i]["labels"])[None]
                logits = model(ids).logits[0, :-1]
                total += float(torch.nn.functional.cross_entropy(logits, labels[0, 1:], reduction="sum"))
                count += int((labels[0, 1:] != -100).sum())
            means.append(total / count)
    return sum(means) / 2, type(model).__name__


def launch_plan(root, name: str, plan: list[dict], nproc: int) -> dict:
    """Run the configurations of `plan` in one torchrun launch of tests/dist_train_checks.py (files under `root`);
    returns its results by name."""
    import json

    from tests.conftest import run_torchrun

    plan_file, out_file = root / f"{name}_plan.json", root / f"{name}_out.json"
    plan_file.write_text(json.dumps(plan))
    run_torchrun("tests/dist_train_checks.py", str(plan_file), str(out_file), nproc=nproc)
    return json.loads(out_file.read_text())
