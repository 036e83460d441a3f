"""Flags that generation and evaluation once accepted without reading: --spec picks the layer spec as in training,
--group-query-attention means what it means in Megatron, and values only the default of which is honoured are
refused by the flag policy with one line naming the flag."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mindspeed_llm.arguments import parse_train_args
from mindspeed_llm.checkpoint import cli as convert_cli
from mindspeed_llm.errors import UserError
from mindspeed_llm.inference.args import parse_args as parse_inference_args
from mindspeed_llm.models.resolve import resolve_model
from tests.conftest import run_cli

TRAIN_MIN = ["--data-path", "/nonexistent/prefix", "--is-instruction-dataset", "--train-iters", "1", "--lr", "1e-4",
             "--seq-length", "64", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"]
QWEN3_SPEC = ["--spec", "mindspeed_llm.tasks.models.spec.qwen3_spec", "layer_spec"]
NO_SUCH_SPEC = ["--spec", "mindspeed_llm.no_such_module", "layer_spec"]


def test_group_query_attention_alone_is_one_query_group():
    """Megatron-LM: --num-query-groups defaults to 1 and counts only under --group-query-attention."""
    gqa = parse_train_args(TRAIN_MIN + ["--group-query-attention"])
    assert resolve_model(gqa, gqa.explicit, tokenizer_len=100).num_query_groups == 1
    groups = parse_train_args(TRAIN_MIN + ["--group-query-attention", "--num-query-groups", "2"])
    assert resolve_model(groups, groups.explicit, tokenizer_len=100).num_query_groups == 2
    plain = parse_train_args(TRAIN_MIN)
    assert resolve_model(plain, plain.explicit, tokenizer_len=100).num_query_groups == 4


@pytest.mark.parametrize("parse,argv,message", [
    (parse_train_args, TRAIN_MIN + ["--context-parallel-size", "2", "--context-parallel-algo", "kvallgather_cp_algo"],
     "--context-parallel-algo kvallgather_cp_algo: not implemented; use one of ulysses_cp_algo, megatron_cp_algo, "
     "hybrid_cp_algo"),
    (parse_inference_args, ["--load", "x", "--tokenizer-name-or-path", "y", "--expert-tensor-parallel-size", "2"],
     "--expert-tensor-parallel-size 2: not supported by inference.py (the experts are split over TP like the "
     "dense MLP (expert TP = --tensor-model-parallel-size); leave it out)"),
    (parse_train_args, TRAIN_MIN + ["--use-legacy-models"],
     "--use-legacy-models: not supported by posttrain_gpt.py (only megatron-core models are implemented)"),
    (parse_train_args, TRAIN_MIN + ["--normalization", "LayerNorm"],
     "--normalization LayerNorm: not supported by posttrain_gpt.py (only RMSNorm is implemented)"),
    (parse_inference_args, ["--load", "x", "--tokenizer-name-or-path", "y", "--context-parallel-size", "2"],
     "--context-parallel-size 2: not supported by inference.py (context parallelism is not implemented; use 1)"),
    (parse_inference_args, ["--load", "x", "--tokenizer-name-or-path", "y", "--num-layers-per-virtual-pipeline-stage",
                            "2"], "--num-layers-per-virtual-pipeline-stage 2: not supported by inference.py (convert "
                                  "the checkpoint without VPP and drop the flag)"),
    (lambda argv: convert_cli.run(argv), ["--load-dir", "a", "--save-dir", "b", "--make-vocab-size-divisible-by", "2"],
     "--make-vocab-size-divisible-by 2: not supported by convert_ckpt.py (the vocabulary keeps the HF checkpoint's "
     "rows; use 1)"),
])
def test_only_the_default_is_honoured_by_the_policy(parse, argv, message):
    with pytest.raises(UserError) as err:
        parse(argv)
    assert str(err.value) == message


# ---- through the entry scripts -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inference_runs(tiny_qwen3, tmp_path_factory) -> dict:
    """inference.py --input-file runs of the tiny Qwen3 model (4 heads, 2 query groups), one process per case."""
    tmp = tmp_path_factory.mktemp("flag_readers")
    mg = tmp / "mg"
    assert convert_cli.main(["--load-dir", str(tiny_qwen3), "--save-dir", str(mg)]) == 0
    prompts = tmp / "in.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hello there"}) + "\n")
    base = ["--load", str(mg), "--tokenizer-name-or-path", str(tiny_qwen3), "--max-new-tokens", "4",
            "--input-file", str(prompts)]
    cases = {"plain": [], "qwen3_spec": QWEN3_SPEC, "no_such_spec": NO_SUCH_SPEC,
             "gqa_alone": ["--group-query-attention"],
             "gqa_groups": ["--group-query-attention", "--num-query-groups", "2"]}
    plan = [{"name": name, "argv": base + extra + ["--output-file", str(tmp / f"{name}.jsonl")]}
            for name, extra in cases.items()]
    (tmp / "cases.json").write_text(json.dumps(plan))
    run_cli("tests/infer_cli_cases.py", str(tmp / "cases.json"), str(tmp / "results.json"))
    return {"dir": tmp, "mg": mg, "hf": tiny_qwen3, **json.loads((tmp / "results.json").read_text())}


def _answer(runs: dict, name: str) -> str:
    assert runs[name]["rc"] == 0, runs[name]["stderr"][-2000:]
    return json.loads((Path(runs["dir"]) / f"{name}.jsonl").read_text())["response_token_ids"]


def _error(result: dict) -> str:
    lines = [ln for ln in result["stderr"].splitlines() if ln.startswith("error:")]
    assert result["rc"] == 2 and len(lines) == 1, result["stderr"][-2000:]
    return lines[0]


def test_inference_reads_spec(inference_runs):
    assert _answer(inference_runs, "qwen3_spec") == _answer(inference_runs, "plain")
    assert _error(inference_runs["no_such_spec"]).startswith(
        "error: --spec mindspeed_llm.no_such_module layer_spec: cannot import it")


def test_inference_reads_group_query_attention(inference_runs):
    assert _answer(inference_runs, "gqa_groups") == _answer(inference_runs, "plain")
    assert _error(inference_runs["gqa_alone"]).startswith(
        "error: --group-query-attention without --num-query-groups (1 query group, as in Megatron) disagrees with ")


def test_evaluation_reads_spec(inference_runs, tmp_path):
    proc = run_cli("evaluation.py", "--load", str(inference_runs["mg"]), "--tokenizer-name-or-path",
                   str(inference_runs["hf"]), "--task", "mmlu", "--task-data-path", str(tmp_path), "--results-file",
                   str(tmp_path / "results.json"), *NO_SUCH_SPEC, check=False)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and errors and errors[0].startswith(
        "error: --spec mindspeed_llm.no_such_module layer_spec: cannot import it"), proc.stderr[-2000:]
    assert not (tmp_path / "results.json").exists()
