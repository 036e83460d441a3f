"""Qwen3-MoE through inference.py and evaluation.py: greedy output equals transformers' generate
(Qwen3MoeForCausalLM) at EP1 (one process), EP2, TP2 and PP2 (torchrun), with and without the KV cache; option scores
equal transformers' log-probabilities; MindSpeed's MoE generate/evaluate recipes run on the tiny model; bad MoE input
is one error line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mindspeed_llm.checkpoint import cli
from tests.conftest import REPO, run_cli, run_torchrun
from tests.recipes import edit, recipe_argv, split_flags
from tests.test_evaluation import _check_choice_task, build_tasks, expected_prompts
from tests.test_inference import MAX_NEW, TEXTS, _prompts, hf_greedy

# "routed": every layer MoE, top-k renormalised (as Qwen3-30B-A3B); "mixed": layer 2 keeps a dense MLP and the top-k
# weights are not renormalised.
SHAPES = {"routed": {}, "mixed": {"norm_topk_prob": False, "mlp_only_layers": (2,)}}
MOE_RECIPES = REPO / "examples" / "mcore" / "qwen3_moe"
# The tiny Qwen3-MoE in the recipes' flags (tiny.MOE_DEFAULTS over build_tiny_model's dense shape)
TINY_MOE_SHAPE = {"--num-layers": "4", "--hidden-size": "64", "--ffn-hidden-size": "128", "--num-attention-heads": "4",
                  "--num-query-groups": "2", "--kv-channels": "16", "--padded-vocab-size": "448",
                  "--num-experts": "8", "--moe-router-topk": "2", "--moe-ffn-hidden-size": "32", "--seq-length": "256",
                  "--max-new-tokens": "4", "--tensor-model-parallel-size": "1", "--pipeline-model-parallel-size": "1",
                  "--expert-model-parallel-size": "1"}


def _convert(hf: Path, mg: Path, tp: int = 1, ep: int = 1, pp: int = 1, grouped: bool = False) -> str:
    assert cli.main(["--load-model-type", "hf", "--save-model-type", "mg", "--model-type-hf", "qwen3-moe",
                     "--load-dir", str(hf), "--save-dir", str(mg), "--target-tensor-parallel-size", str(tp),
                     "--target-expert-parallel-size", str(ep), "--target-pipeline-parallel-size", str(pp),
                     *(["--moe-grouped-gemm"] if grouped else [])]) == 0
    return str(mg)


@pytest.fixture(scope="module")
def moe(tiny_model_factory, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("moe_infer")
    hf = {name: tiny_model_factory("qwen3-moe", **shape) for name, shape in SHAPES.items()}
    mg = {(name, tp, ep): _convert(hf[name], root / f"{name}_tp{tp}ep{ep}", tp, ep)
          for name, tp, ep in (("routed", 1, 1), ("mixed", 1, 1), ("routed", 1, 2), ("routed", 2, 1), ("mixed", 1, 2))}
    mg["routed_pp2"] = _convert(hf["routed"], root / "routed_pp2", pp=2)
    mg["grouped"] = _convert(hf["routed"], root / "routed_grouped", grouped=True)    # GroupedMLP weight1/weight2
    return {"root": root, "hf": hf, "mg": mg}


# inference.py batch-file runs at EP1: name -> (model shape, checkpoint)
EP1_RUNS = {"routed": ("routed", ("routed", 1, 1)), "mixed": ("mixed", ("mixed", 1, 1)), "grouped": ("routed", "grouped")}
# Bad input: (case, checkpoint, flags) -> what the one error line says
BAD = [("ep_world", ("routed", 1, 2), ["--expert-model-parallel-size", "2"]),
       ("experts", ("routed", 1, 1), ["--num-experts", "4"]),
       ("topk", ("routed", 1, 1), ["--moe-router-topk", "3"]),
       ("expert_ffn", ("routed", 1, 1), ["--moe-ffn-hidden-size", "16"]),
       ("ep_checkpoint", ("routed", 1, 2), [])]
BAD_MESSAGES = {"ep_world": "--expert-model-parallel-size 2 x --tensor-model-parallel-size 1 x "
                            "--pipeline-model-parallel-size 1 does not fit 1 processes",
                "experts": "--num-experts 4 disagrees with", "topk": "--moe-router-topk 3 disagrees with",
                "expert_ffn": "--moe-ffn-hidden-size 16 disagrees with",
                "ep_checkpoint": "--expert-model-parallel-size"}


def recipe_flags(recipe: str, tmp_path: Path, entry: str, values: dict[str, str]) -> list[str]:
    """One of our MoE recipes' arguments to `entry` with the tiny shape, one process and `values` (paths)."""
    groups = split_flags(recipe_argv(MOE_RECIPES / f"{recipe}.sh", tmp_path, entry))
    return edit(groups, {}, {**TINY_MOE_SHAPE, **values})


@pytest.fixture(scope="module")
def cli_runs(moe) -> dict:
    """One process, each case forked: inference.py batch files at EP1 on both shapes, and the two MoE generate
    recipes (their flags with the tiny shape and one process)."""
    root = moe["root"]
    requests = root / "in.jsonl"
    requests.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in TEXTS))
    cases = []
    for name, (shape, load) in EP1_RUNS.items():
        cases.append({"name": name, "argv": ["--load", moe["mg"][load], "--tokenizer-name-or-path",
                                             str(moe["hf"][shape]), "--max-new-tokens", str(MAX_NEW), "--input-file",
                                             str(requests), "--output-file", str(root / f"{name}.jsonl")]})
    for recipe in ("generate_qwen3_30b_a3b_ptd", "generate_qwen3_235b_a22b_ptd"):
        argv = recipe_flags(recipe, root, "inference.py", {"--load": moe["mg"][("routed", 1, 1)],
                                                            "--tokenizer-name-or-path": str(moe["hf"]["routed"])})
        cases.append({"name": recipe, "argv": argv + ["--task", "greedy"]})
    base = ["--tokenizer-name-or-path", str(moe["hf"]["routed"]), "--prompt", "hi", "--task", "greedy"]
    for name, load, flags in BAD:
        cases.append({"name": name, "argv": ["--load", moe["mg"][load], *base, *flags]})
    (root / "cases.json").write_text(json.dumps(cases))
    run_cli("tests/infer_cli_cases.py", str(root / "cases.json"), str(root / "results.json"))
    return json.loads((root / "results.json").read_text())


@pytest.mark.parametrize("name", sorted(EP1_RUNS))
def test_greedy_batch_file_matches_transformers_at_ep1(cli_runs, moe, name):
    """Both shapes, and a checkpoint in the grouped expert layout run without --moe-grouped-gemm (generation
    follows the checkpoint's layout, with a notice)."""
    res = cli_runs[name]
    assert res["rc"] == 0, res["stderr"]
    shape = EP1_RUNS[name][0]
    lines = [json.loads(line) for line in (moe["root"] / f"{name}.jsonl").read_text().splitlines()]
    prompts = _prompts(moe["hf"][shape])
    assert [line["prompt_token_ids"] for line in lines] == prompts
    assert [line["response_token_ids"] for line in lines] == hf_greedy(moe["hf"][shape], prompts)
    assert ("holds its experts in the GroupedMLP layout" in res["stderr"]) == (name == "grouped")


@pytest.mark.parametrize("recipe", ["generate_qwen3_30b_a3b_ptd", "generate_qwen3_235b_a22b_ptd"])
def test_generate_recipes_run_on_the_tiny_moe_model(cli_runs, recipe):
    res = cli_runs[recipe]
    assert res["rc"] == 0, res["stderr"]
    assert "Greedy Search" in res["stdout"] and "MindSpeed-LLM:\n" in res["stdout"]
    # The recipes pass --moe-grouped-gemm; this checkpoint was converted without it
    assert "holds its experts in the SequentialMLP layout, which this run uses" in res["stderr"], res["stderr"]


@pytest.mark.distributed
def test_greedy_matches_transformers_at_ep2_and_tp2(moe, tmp_path):
    """One launch of two processes: EP2 (both shapes: the experts split over the two data-parallel ranks, which
    decode the same prompts together), TP2 and PP2."""
    prompts = {name: _prompts(moe["hf"][name]) for name in SHAPES}
    ref = {name: hf_greedy(moe["hf"][name], prompts[name]) for name in SHAPES}
    stop_ids = [ref["routed"][0][3], ref["routed"][2][5]]
    ref_stop = hf_greedy(moe["hf"]["routed"], prompts["routed"], eos=stop_ids + [400, 401])
    assert any(len(r) < MAX_NEW for r in ref_stop)
    configs = [{"name": "routed_ep2", "load": moe["mg"][("routed", 1, 2)], "tp": 1, "pp": 1, "ep": 2},
               {"name": "routed_tp2", "load": moe["mg"][("routed", 2, 1)], "tp": 2, "pp": 1, "ep": 1},
               {"name": "mixed_ep2", "load": moe["mg"][("mixed", 1, 2)], "tp": 1, "pp": 1, "ep": 2},
               {"name": "routed_pp2", "load": moe["mg"]["routed_pp2"], "tp": 1, "pp": 2, "ep": 1}]
    assert prompts["routed"] == prompts["mixed"]            # one tokenizer
    spec = {"tokenizer": str(moe["hf"]["routed"]), "prompts": prompts["routed"], "max_new_tokens": MAX_NEW,
            "stop_ids": stop_ids, "configs": configs}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run_torchrun("tests/dist_infer.py", str(tmp_path / "spec.json"), str(tmp_path / "out.json"))
    got = json.loads((tmp_path / "out.json").read_text())
    for name, res in got.items():
        expected = ref[name.split("_")[0]]
        assert res["greedy_cache"] == expected, f"{name}: greedy with KV cache differs from transformers"
        assert res["greedy_nocache"] == expected, f"{name}: greedy without KV cache differs from transformers"
        assert res["topk1"] == expected, f"{name}: top-k 1 sampling differs from greedy"
        assert res["sample_a"] == res["sample_b"], f"{name}: seeded sampling is not reproducible"
    for name in ("routed_ep2", "routed_tp2", "routed_pp2"):
        assert got[name]["greedy_stop"] == ref_stop, f"{name}: stopping differs from transformers"
        assert got[name]["beam"] == got["routed_ep2"]["beam"], f"{name}: beam search depends on the layout"


@pytest.fixture(scope="module")
def eval_data(moe) -> dict[str, Path]:
    return build_tasks(moe["root"] / "data")


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_choice_scores_match_transformers_at_ep1(moe, eval_data, name, tmp_path):
    hf = moe["hf"][name]
    run_cli("evaluation.py", "--load", moe["mg"][(name, 1, 1)], "--tokenizer-name-or-path", str(hf),
            "--task", "mmlu", "--task-data-path", str(eval_data["mmlu"]), "--no-chat-template",
            "--evaluation-batch-size", "4", "--results-file", str(tmp_path / "r.json"))
    summary = json.loads((tmp_path / "r.json").read_text())["tasks"]["mmlu"]
    _check_choice_task(summary, hf, expected_prompts()["mmlu"], chat=False)


@pytest.mark.parametrize("recipe", ["evaluate_qwen3_30b_a3b_ptd", "evaluate_qwen3_235b_a22b_ptd"])
def test_evaluate_recipes_run_on_the_tiny_moe_model(moe, eval_data, recipe, tmp_path):
    """The recipes' flags with the tiny shape in one process. evaluate_qwen3_30b_a3b leaves out
    --untie-embeddings-and-output-weights as MindSpeed's does: the untied checkpoint is evaluated as it is (its own
    output layer), so in fp32 the scores equal transformers' on the untied model. The checkpoint is in the grouped
    expert layout, as ckpt_convert_qwen3_moe_hf2mcore.sh writes it, and the recipes' --moe-grouped-gemm runs it."""
    argv = recipe_flags(recipe, tmp_path, "evaluation.py", {"--load": moe["mg"]["grouped"],
                                                             "--tokenizer-name-or-path": str(moe["hf"]["routed"]),
                                                             "--task-data-path": str(eval_data["mmlu"])})
    assert "--untie-embeddings-and-output-weights" not in argv or recipe != "evaluate_qwen3_30b_a3b_ptd"
    fp32 = [a for a in argv if a != "--bf16"]
    proc = run_cli("evaluation.py", *fp32, "--results-file", str(tmp_path / "r.json"))
    assert "mmlu acc = " in proc.stdout and "holds its experts" not in proc.stderr, proc.stderr
    summary = json.loads((tmp_path / "r.json").read_text())["tasks"]["mmlu"]
    _check_choice_task(summary, moe["hf"]["routed"], expected_prompts()["mmlu"], chat=False)


@pytest.mark.parametrize("name", sorted(BAD_MESSAGES))
def test_bad_moe_input_is_one_error_line(cli_runs, name):
    res = cli_runs[name]
    errors = [line for line in res["stderr"].splitlines() if line.startswith("error:")]
    assert res["rc"] == 2 and len(errors) == 1 and BAD_MESSAGES[name] in errors[0], res["stderr"]
