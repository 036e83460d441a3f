"""LoRA through the CLIs: training at TP1 / TP2 (sequence parallel) / PP2, exact resume from an adapters-only
checkpoint, merge and PEFT export with convert_ckpt.py, generation with --lora-load. The reference is `peft` on
the Hugging Face model: our exported adapter must load there and give our logits and our greedy answers."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli, run_torchrun
from tests.train_fixtures import env, model_flags, train_flags  # noqa: F401  (env is a fixture)

pytest.importorskip("peft", reason="peft is the LoRA reference (pip install -e '.[test]')")

TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
LORA = ["--lora-r", "4", "--lora-alpha", "8", "--lora-target-modules", *TARGETS]
ITERS = 4
LOSS = re.compile(r"iteration\s+(\d+)/.*?lm loss: ([0-9.E+-]+)")


def _train(env, tp: int, pp: int, save: Path, *extra: str, load: Path | None = None) -> dict:
    argv = [*model_flags(env["hf"]), *train_flags(ITERS), "--lr", "1e-2", "--data-path", env["plain"],
            "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            "--load", str(load or env["ckpt"][(tp, pp)]), "--save", str(save), *LORA, *extra]
    proc = run_torchrun("posttrain_gpt.py", *argv, nproc=tp * pp)
    return {"losses": {int(i): float(v) for i, v in LOSS.findall(proc.stdout)}, "stdout": proc.stdout}


def _state(ckpt: Path, rank_dir: str = "mp_rank_00") -> dict:
    from mindspeed_llm.checkpoint import layout

    it = (ckpt / layout.TRACKER).read_text().strip()
    return layout.load_pt(ckpt / f"iter_{int(it):07d}" / rank_dir / layout.FILE_NAME)


def _convert(*args) -> None:
    run_cli("convert_ckpt.py", "--load-model-type", "mg", "--save-model-type", "hf", *map(str, args))


@pytest.fixture(scope="module")
def runs(env, tmp_path_factory) -> dict:
    """Four training launches and the conversions the checks share."""
    tmp = tmp_path_factory.mktemp("lora")
    out = {"tmp": tmp, "hf": env["hf"], "ckpt": env["ckpt"]}
    # The TP1 base is a full fine-tuning save (its layers carry _extra_state entries) with unchanged weights (lr 0).
    run_torchrun("posttrain_gpt.py", *model_flags(env["hf"]), *train_flags(1), "--lr", "0", "--min-lr", "0",
                 "--lr-warmup-iters", "0", "--data-path", env["plain"], "--load", str(env["ckpt"][(1, 1)]),
                 "--finetune", "--save", str(tmp / "sft"), nproc=1)
    out["tp1"] = _train(env, 1, 1, tmp / "tp1", "--finetune", load=tmp / "sft")     # full save: base + adapters
    first = _train(env, 2, 1, tmp / "tp2", "--finetune", "--sequence-parallel", "--lora-ckpt-filter",
                   "--exit-interval", "2")
    rest = _train(env, 2, 1, tmp / "tp2", "--sequence-parallel", "--lora-ckpt-filter", "--lora-load", str(tmp / "tp2"))
    out["tp2"] = {"losses": {**first["losses"], **rest["losses"]}, "stdout": rest["stdout"]}
    out["pp2"] = _train(env, 1, 2, tmp / "pp2", "--finetune", "--lora-ckpt-filter")
    # merge: an unfiltered save alone (adapters inside), and base + --lora-load; PEFT exports of both layouts
    _convert("--load-dir", tmp / "tp1", "--save-dir", tmp / "merged_tp1", "--hf-cfg-dir", env["hf"])
    _convert("--load-dir", env["ckpt"][(1, 2)], "--lora-load", tmp / "pp2", "--save-dir", tmp / "merged_pp2",
             "--hf-cfg-dir", env["hf"], *LORA)
    for name, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2)):
        _convert("--load-dir", env["ckpt"][(tp, pp)], "--lora-load", tmp / name, "--save-dir", tmp / f"peft_{name}",
                 "--save-lora-to-hf", "--hf-cfg-dir", env["hf"])
    return out


def _peft_model(hf: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter)).eval()


IDS = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.distributed
def test_layouts_train_alike_and_resume_exactly(runs):
    ref = runs["tp1"]["losses"]
    assert sorted(ref) == list(range(1, ITERS + 1)) and ref[ITERS] < ref[1]
    for name in ("tp2", "pp2"):      # tp2: iterations 3-4 come from the resumed run
        got = runs[name]["losses"]
        assert sorted(got) == sorted(ref), (name, got)
        for i in ref:
            assert got[i] == pytest.approx(ref[i], rel=1e-5), (name, i, got[i], ref[i])
    assert "at iteration 2" in runs["tp2"]["stdout"]
    assert re.search(r"LoRA r=4 alpha=8 on linear_qkv linear_proj linear_fc1 linear_fc2: [\d,]+ trainable",
                     runs["tp1"]["stdout"])


@pytest.mark.distributed
def test_only_adapters_change_and_filtered_saves_hold_only_them(runs):
    trained = _state(runs["tmp"] / "tp1")["model"]
    base = _state(runs["ckpt"][(1, 1)])["model"]
    for key, value in base.items():
        name = key.replace(".weight", ".base_layer.weight") if any(
            f".{t}.weight" in key for t in TARGETS) else key
        assert torch.equal(trained[name], value), f"{key} changed during LoRA training"
    b = [v for k, v in trained.items() if k.endswith("lora_B.default.weight")]
    assert len(b) == 4 * len(TARGETS) and all(v.abs().max() > 0 for v in b)
    filtered = _state(runs["tmp"] / "tp2", "mp_rank_01")
    assert set(filtered["model"]) == {k for k in trained if ".lora_" in k}
    assert "optimizer" in filtered and filtered["iteration"] == ITERS


@pytest.mark.distributed
def test_exports_match_peft_and_our_unmerged_logits(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    hf = runs["hf"]
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()(IDS).logits
        peft_tp2 = _peft_model(hf, runs["tmp"] / "peft_tp2")(IDS).logits
        peft_pp2 = _peft_model(hf, runs["tmp"] / "peft_pp2")(IDS).logits
        merged = {n: AutoModelForCausalLM.from_pretrained(str(runs["tmp"] / f"merged_{n}"), dtype=torch.float32)
                  .eval()(IDS).logits for n in ("tp1", "pp2")}
    assert (peft_pp2 - base).abs().max() > 1e-2                  # the adapters matter
    assert (merged["pp2"] - peft_pp2).abs().max() < 1e-5          # merged export == base + PEFT adapter
    assert (merged["tp1"] - peft_pp2).abs().max() < 1e-4          # layouts trained alike
    assert (peft_tp2 - peft_pp2).abs().max() < 1e-4
    config = json.loads((runs["tmp"] / "peft_tp2" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    lora = {"r": 4, "alpha": 8, "targets": TARGETS}
    cases = [{"name": f"lora-{n}", "hf_dir": str(hf), "mg_dir": str(runs["ckpt"][layout]), "tp": layout[0],
              "pp": layout[1], "tol": 1e-5,
              "lora": {**lora, "dir": str(runs["tmp"] / n), "peft_dir": str(runs["tmp"] / f"peft_{n}")}}
             for n, layout in (("tp2", (2, 1)), ("pp2", (1, 2)))]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    proc = run_torchrun("tests/dist_logits.py", str(tmp_path / "cases.json"))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CASE")]
    for case in cases:
        hits = [ln for ln in lines if ln.startswith(f"CASE {case['name']} ")]
        assert hits and all(ln.endswith("OK") for ln in hits), proc.stdout[-2000:]


@pytest.mark.distributed
def test_generation_with_lora_load_matches_peft(runs, tmp_path):
    from transformers import AutoTokenizer

    hf = runs["hf"]
    tok = AutoTokenizer.from_pretrained(str(hf))
    texts = ["the cat sat on", "one two three four five", "hello"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    run_torchrun("inference.py", "--load", str(runs["ckpt"][(2, 1)]), "--lora-load", str(runs["tmp"] / "tp2"),
                 "--tensor-model-parallel-size", "2", "--tokenizer-name-or-path", str(hf), "--max-new-tokens", "8",
                 "--input-file", str(tmp_path / "in.jsonl"), "--output-file", str(tmp_path / "out.jsonl"),
                 "--distributed-backend", "nccl")
    got = [json.loads(line)["response_token_ids"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    model = _peft_model(hf, runs["tmp"] / "peft_tp2")
    with torch.no_grad():
        for text, answer in zip(texts, got):
            ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
            ref = model.generate(input_ids=ids, do_sample=False, max_new_tokens=8)[0, ids.shape[1]:].tolist()
            assert answer == ref, text


@pytest.mark.distributed
def test_lora_mistakes_are_one_line_errors(runs, env, tmp_path):
    tmp = runs["tmp"]

    def error(script: str, *args) -> str:
        proc = run_cli(script, *map(str, args), check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        return proc.stderr.strip().splitlines()[-1]

    mg2hf = ["--load-model-type", "mg", "--save-model-type", "hf", "--save-dir", tmp_path / "out"]
    assert "holds LoRA adapters only" in error("convert_ckpt.py", *mg2hf, "--load-dir", tmp / "pp2")
    assert "no adapters to export" in error("convert_ckpt.py", *mg2hf, "--load-dir", env["ckpt"][(1, 1)],
                                            "--save-lora-to-hf")
    assert "saved with TP 2" in error("convert_ckpt.py", *mg2hf, "--load-dir", env["ckpt"][(1, 1)],
                                      "--lora-load", tmp / "tp2")
    assert not (tmp_path / "out").exists()
    train = [*model_flags(env["hf"]), *train_flags(1), "--data-path", env["plain"], "--load",
             str(env["ckpt"][(1, 1)])]
    assert "--lora-target-modules q_proj: unknown module" in error("posttrain_gpt.py", *train,
                                                                    "--lora-target-modules", "q_proj")
    assert "--lora-load" in error("posttrain_gpt.py", *train, *LORA, "--lora-load", tmp_path / "none")
    assert "--lora-r 8 --lora-alpha 8 (scale 1) disagrees" in error(
        "posttrain_gpt.py", *train, "--lora-target-modules", *TARGETS, "--lora-r", "8", "--lora-load", tmp / "tp1")
    generate = ["--tokenizer-name-or-path", str(env["hf"]), "--max-new-tokens", "2", "--prompt", "hi"]
    assert "is a LoRA save" in error("inference.py", "--load", tmp / "tp1", *generate)
