"""LoRA through the CLIs: training at TP1 / TP2 (sequence parallel) / PP2, exact resume from an adapters-only
checkpoint, merge and PEFT export with convert_ckpt.py, generation with --lora-load. The reference is `peft` on
the Hugging Face model: our exported adapter must load there and give our logits and our greedy answers."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli, run_torchrun
from tests.dist_logits import assert_cases_ok
from tests.test_safe_load import error_line, run_cases
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
    assert_cases_ok(proc.stdout, cases)


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
    mg2hf = ["--load-model-type", "mg", "--save-model-type", "hf", "--save-dir", tmp_path / "out"]
    train = [*model_flags(env["hf"]), *train_flags(1), "--data-path", env["plain"], "--load",
             str(env["ckpt"][(1, 1)])]
    generate = ["--tokenizer-name-or-path", str(env["hf"]), "--max-new-tokens", "2", "--prompt", "hi"]
    cases = [  # one process runs them all (tests/cli_cases.py)
        ("convert_ckpt.py", [*mg2hf, "--load-dir", tmp / "pp2"], "holds LoRA adapters only"),
        ("convert_ckpt.py", [*mg2hf, "--load-dir", env["ckpt"][(1, 1)], "--save-lora-to-hf"],
         "no adapters to export"),
        ("convert_ckpt.py", [*mg2hf, "--load-dir", env["ckpt"][(1, 1)], "--lora-load", tmp / "tp2"], "saved with TP 2"),
        ("posttrain_gpt.py", [*train, "--lora-target-modules", "q_proj"],
         "--lora-target-modules q_proj: unknown module"),
        ("posttrain_gpt.py", [*train, *LORA, "--lora-load", tmp_path / "none"], "--lora-load"),
        ("posttrain_gpt.py", [*train, "--lora-target-modules", *TARGETS, "--lora-r", "8", "--lora-load", tmp / "tp1"],
         "--lora-r 8 --lora-alpha 8 (scale 1) disagrees"),
        ("inference.py", ["--load", tmp / "tp1", *generate], "is a LoRA save"),
    ]
    results = run_cases([{"name": str(i), "script": script, "argv": list(map(str, argv))}
                         for i, (script, argv, _) in enumerate(cases)], tmp_path)
    for i, (script, _, needle) in enumerate(cases):
        assert results[str(i)]["rc"] == 2, (script, results[str(i)]["stderr"][-2000:])
        assert needle in error_line(results[str(i)]), (script, results[str(i)]["stderr"][-2000:])
    assert not (tmp_path / "out").exists()


# --- the base a LoRA run is merged onto -----------------------------------------------------------------------
# MindSpeed's LoRA recipes save without --lora-ckpt-filter: the run holds the frozen base too, in the training
# dtype. Merging must take the frozen weights from the base named on the command line, and refuse another base.
BASE_ITERS = 2


def _train_on(env, hf: Path, base: Path, save: Path, *extra: str) -> None:
    run_torchrun("posttrain_gpt.py", *model_flags(hf), *train_flags(BASE_ITERS), "--lr", "1e-2", "--data-path",
                 env["plain"], "--load", str(base), "--save", str(save), "--finetune", "--bf16", *LORA, *extra,
                 nproc=1)


@pytest.fixture(scope="module")
def bf16_runs(env, tiny_model_factory, tmp_path_factory) -> dict:
    """--bf16 LoRA runs (unfiltered saves) on the fp32 base and on a bf16 copy of it, and bases that are not
    theirs: the same shape from another seed, and another hidden size (with a run of its own)."""
    from mindspeed_llm.checkpoint.hf2mg import Hf2MgOptions, convert_hf_to_mg

    tmp = tmp_path_factory.mktemp("lora_base")

    def convert(hf: Path, out: Path, **kw) -> Path:
        convert_hf_to_mg(Hf2MgOptions(load_dir=hf, save_dir=out, **kw), log=lambda m: None)
        return out

    out = {"tmp": tmp, "hf": env["hf"], "base": env["ckpt"][(1, 1)],
           "base_bf16": convert(env["hf"], tmp / "base_bf16", params_dtype="bf16"),
           "other_seed": convert(tiny_model_factory("qwen3", seed=99), tmp / "other_seed")}
    _train_on(env, env["hf"], out["base"], tmp / "run")
    _train_on(env, env["hf"], out["base_bf16"], tmp / "run_bf16")
    narrow_hf = tiny_model_factory("qwen3", hidden_size=32, head_dim=8, intermediate_size=64)
    narrow = model_flags(env["hf"])          # the same tokenizer as the preprocessed data
    for flag, value in (("--hidden-size", "32"), ("--ffn-hidden-size", "64"), ("--kv-channels", "8")):
        narrow[narrow.index(flag) + 1] = value
    run_torchrun("posttrain_gpt.py", *narrow, *train_flags(2), "--data-path", env["plain"], "--load",
                 str(convert(narrow_hf, tmp / "narrow_base")), "--save", str(tmp / "run_narrow"), *LORA, nproc=1)
    return out


def _merge(*args, check: bool = True):
    return run_cli("convert_ckpt.py", "--load-model-type", "mg", "--save-model-type", "hf", *map(str, args),
                   check=check)


def _one_error(proc) -> str:
    """The single `error:` line of a refused command (exit status 2, no traceback)."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return errors[0]


def _hf_logits(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()(IDS).logits


def _hf_dtypes(model_dir: Path) -> set:
    from safetensors import safe_open

    dtypes = set()
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
    return dtypes


@pytest.mark.distributed
def test_bf16_run_merges_onto_the_fp32_base_named(bf16_runs):
    tmp, hf = bf16_runs["tmp"], bf16_runs["hf"]
    _merge("--load-dir", bf16_runs["base"], "--lora-load", tmp / "run", "--save-dir", tmp / "merged",
           "--hf-cfg-dir", hf)
    _merge("--load-dir", bf16_runs["base"], "--lora-load", tmp / "run", "--save-dir", tmp / "peft",
           "--save-lora-to-hf", "--hf-cfg-dir", hf)
    assert _hf_dtypes(tmp / "merged") == {"F32"}
    with torch.no_grad():
        reference = _peft_model(hf, tmp / "peft")(IDS).logits
    assert (reference - _hf_logits(hf)).abs().max() > 1e-2             # the adapters matter
    assert (_hf_logits(tmp / "merged") - reference).abs().max() < 1e-5  # base + PEFT adapter, not the bf16 copy


@pytest.mark.distributed
def test_bf16_base_stays_bf16_when_merged(bf16_runs):
    tmp = bf16_runs["tmp"]
    proc = _merge("--load-dir", bf16_runs["base_bf16"], "--lora-load", tmp / "run_bf16", "--save-dir",
                  tmp / "merged_bf16", "--hf-cfg-dir", bf16_runs["hf"])
    assert "fingerprint" not in proc.stderr
    assert _hf_dtypes(tmp / "merged_bf16") == {"BF16"}


@pytest.mark.distributed
def test_fingerprint_is_the_same_for_every_layout(bf16_runs, env):
    from mindspeed_llm.checkpoint import layout
    from mindspeed_llm.models import lora
    from mindspeed_llm.models.placement import place_layers

    recorded = argparse.Namespace(**_state(bf16_runs["tmp"] / "run")["args"])
    assert recorded.lora_base_load == str(bf16_runs["base"]) and len(recorded.lora_base_fingerprint) == 12
    for (tp, pp), root in env["ckpt"].items():
        iter_dir = layout.iteration_dir(root)
        placement = place_layers(4, pp)
        total = sum(lora.fingerprint_share([(layout.load_rank_file(
            iter_dir / layout.rank_dir_name(t, p, pp) / layout.FILE_NAME)["model"], placement.layers[p][0])], 4)
            for t in range(tp) for p in range(pp))
        assert lora.fingerprint_text(total) == recorded.lora_base_fingerprint, (tp, pp)
    # the base in bf16 is the same base
    assert _state(bf16_runs["tmp"] / "run_bf16")["args"]["lora_base_fingerprint"] == recorded.lora_base_fingerprint


@pytest.mark.distributed
def test_another_base_is_refused_unless_overridden(bf16_runs, tmp_path):
    tmp, hf, other, base = bf16_runs["tmp"], bf16_runs["hf"], bf16_runs["other_seed"], bf16_runs["base"]
    merge = ["--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", other, "--lora-load", tmp / "run",
             "--hf-cfg-dir", hf]
    generate = ["--lora-load", tmp / "run", "--tokenizer-name-or-path", hf, "--max-new-tokens", "2", "--task",
                "greedy", "--prompt", "hi"]
    cases = {  # in this order, in one process (tests/cli_cases.py)
        "merge": ("convert_ckpt.py", [*merge, "--save-dir", tmp_path / "refused"]),
        "merge_anyway": ("convert_ckpt.py", [*merge, "--save-dir", tmp_path / "out", "--lora-ignore-base-mismatch"]),
        "generate": ("inference.py", [*generate, "--load", other]),
        "generate_anyway": ("inference.py", [*generate, "--load", other, "--lora-ignore-base-mismatch"]),
        "generate_on_base": ("inference.py", [*generate, "--load", base])}
    (tmp_path / "out_probe").mkdir()
    results = run_cases([{"name": name, "script": script, "argv": list(map(str, argv))}
                         for name, (script, argv) in cases.items()], tmp_path / "out_probe")
    line = error_line(results["merge"])
    assert str(other) in line and str(base) in line and "--lora-ignore-base-mismatch" in line
    warnings = [ln for ln in results["merge_anyway"]["stderr"].splitlines() if "warning:" in ln and str(other) in ln]
    assert results["merge_anyway"]["rc"] == 0 and (tmp_path / "out" / "config.json").is_file() and len(warnings) == 1
    assert not (tmp_path / "refused").exists() and not list(tmp_path.glob(".refused*"))
    line = error_line(results["generate"])
    assert str(other) in line and str(base) in line
    stderr = results["generate_anyway"]["stderr"]
    assert results["generate_anyway"]["rc"] == 0
    assert len([ln for ln in stderr.splitlines() if "warning:" in ln and str(other) in ln]) == 1
    assert results["generate_on_base"]["rc"] == 0 and "fingerprint" not in results["generate_on_base"]["stderr"]


@pytest.mark.distributed
def test_lora_save_without_fingerprint_still_merges(bf16_runs, tmp_path):
    import shutil

    from mindspeed_llm.checkpoint import layout

    old = tmp_path / "old_run"
    shutil.copytree(bf16_runs["tmp"] / "run", old)
    (rank_file,) = old.glob(f"iter_*/mp_rank_00/{layout.FILE_NAME}")
    state = layout.load_pt(rank_file)
    state["args"] = {k: v for k, v in state["args"].items() if not k.startswith("lora_base_")}
    torch.save(state, rank_file)
    proc = _merge("--load-dir", bf16_runs["other_seed"], "--lora-load", old, "--save-dir", tmp_path / "out",
                  "--hf-cfg-dir", bf16_runs["hf"])
    notices = [ln for ln in proc.stderr.splitlines() if "records no fingerprint" in ln]
    assert len(notices) == 1 and str(bf16_runs["other_seed"]) in notices[0]


@pytest.mark.distributed
def test_adapters_of_another_hidden_size_are_one_line_error(bf16_runs, tmp_path):
    line = _one_error(_merge("--load-dir", bf16_runs["base"], "--lora-load", bf16_runs["tmp"] / "run_narrow",
                             "--save-dir", tmp_path / "out", "--hf-cfg-dir", bf16_runs["hf"], check=False))
    assert "--hidden-size 32" in line and str(bf16_runs["base"]) in line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
