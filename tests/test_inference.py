"""inference.py: greedy parity with transformers at TP/PP with and without KV cache, sampling, beam search,
batch files, chat, and bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mindspeed_llm.checkpoint import cli
from mindspeed_llm.errors import UserError
from mindspeed_llm.inference.batch import AtomicJsonl, read_requests
from mindspeed_llm.inference.generation import StopCriteria
from mindspeed_llm.inference.sampling import SamplingParams, choose, filter_logits
from tests.conftest import REPO, run_cli, run_torchrun

MAX_NEW = 12
TEXTS = ["how are you?", "hi", "The quick brown fox jumps over the lazy dog and then"]


# ---- sampling and stopping (no model) -------------------------------------------------------------------------

def test_top_k_then_top_p_filter():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert torch.isinf(filter_logits(logits, 2, 0.0)[0, 2:]).all()
    kept = ~torch.isinf(filter_logits(logits, 0, 0.6))
    assert kept[0].tolist() == [True, True, False, False, False]     # the token crossing p is kept
    kept = ~torch.isinf(filter_logits(logits, 4, 0.8))
    assert kept[0].tolist() == [True, True, True, False, False]
    assert (~torch.isinf(filter_logits(logits, 0, 0.01)))[0].tolist() == [True] + [False] * 4


def test_top_k_one_is_greedy_and_seeded_sampling_repeats():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    greedy = choose(logits, SamplingParams(), None)
    assert torch.equal(choose(logits, SamplingParams(True, 0.7, 1, 0.95), torch.Generator().manual_seed(3)), greedy)
    params = SamplingParams(True, 0.7, 50, 0.95)
    draws = [choose(logits, params, torch.Generator().manual_seed(11)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])


def test_stop_criteria_tokens_and_sequences():
    stop = StopCriteria(frozenset({5}), ((7, 8),))
    assert stop.hit([1, 5]) and stop.hit([7, 8]) and not stop.hit([8, 7]) and not stop.hit([])


def test_sampling_params_validation():
    with pytest.raises(UserError, match="--top-p"):
        SamplingParams(True, 1.0, 0, 1.5).validate()
    with pytest.raises(UserError, match="--temperature"):
        SamplingParams(True, 0.0, 0, 0.5).validate()


def test_request_file_errors_name_file_and_line(tmp_path):
    good = tmp_path / "in.jsonl"
    good.write_text('{"prompt": "a"}\n\n{"messages": [{"role": "user", "content": "b"}]}\n')
    assert [r["line"] for r in read_requests(str(good))] == [1, 3]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        read_requests(str(bad))
    bad.write_text('{"text": "a"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1: expected"):
        read_requests(str(bad))
    with pytest.raises(UserError, match="cannot read"):
        read_requests(str(tmp_path / "missing.jsonl"))


def test_output_appears_only_on_commit(tmp_path):
    out = tmp_path / "out.jsonl"
    sink = AtomicJsonl(str(out))
    sink.write({"a": 1})
    assert not out.exists()
    sink.commit()
    assert out.read_text() == '{"a": 1}\n'
    sink = AtomicJsonl(str(tmp_path / "other.jsonl"))
    sink.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
    with pytest.raises(UserError, match="does not exist"):
        AtomicJsonl(str(tmp_path / "no" / "x.jsonl"))


# ---- the model: checkpoints and transformers references ------------------------------------------------------

def _convert(hf: Path, mg: Path, tp: int, pp: int) -> str:
    assert cli.main(["--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", str(hf), "--save-dir",
                     str(mg), "--target-tensor-parallel-size", str(tp), "--target-pipeline-parallel-size",
                     str(pp)]) == 0
    return str(mg)


@pytest.fixture(scope="module")
def ckpts(tiny_model_factory, tmp_path_factory) -> dict:
    untied, tied = tiny_model_factory("qwen3"), tiny_model_factory("qwen3", tie_word_embeddings=True)
    root = tmp_path_factory.mktemp("infer_ckpts")
    return {"hf": untied, "hf_tied": tied,
            "tp1": _convert(untied, root / "tp1", 1, 1), "tp2": _convert(untied, root / "tp2", 2, 1),
            "pp2": _convert(untied, root / "pp2", 1, 2), "tied_pp2": _convert(tied, root / "tied_pp2", 1, 2)}


def _prompts(hf: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf))
    return [tok.encode(t, add_special_tokens=False) for t in TEXTS]


def hf_greedy(hf: Path, prompts: list[list[int]], eos: list[int] | None = None) -> list[list[int]]:
    """transformers' generate(do_sample=False), one prompt at a time (no padding in the reference)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    kwargs = {"eos_token_id": eos} if eos else {}
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=MAX_NEW, **kwargs)[0, len(p):]
                .tolist() for p in prompts]


@pytest.mark.distributed
def test_greedy_matches_transformers_at_tp_and_pp(ckpts, tmp_path):
    prompts = _prompts(ckpts["hf"])
    assert len({len(p) for p in prompts}) == 3
    ref = hf_greedy(ckpts["hf"], prompts)
    ref_tied = hf_greedy(ckpts["hf_tied"], prompts)
    # stop ids the random model hits early, so stopping is checked too (plus the model's own eos ids)
    stop_ids = [ref[0][3], ref[2][5]]
    ref_stop = hf_greedy(ckpts["hf"], prompts, eos=stop_ids + [400, 401])
    assert any(len(r) < MAX_NEW for r in ref_stop)
    spec = {"tokenizer": str(ckpts["hf"]), "prompts": prompts, "max_new_tokens": MAX_NEW, "stop_ids": stop_ids,
            "configs": [{"name": "tp1", "load": ckpts["tp1"], "tp": 1, "pp": 1},
                        {"name": "tp2", "load": ckpts["tp2"], "tp": 2, "pp": 1},
                        {"name": "pp2", "load": ckpts["pp2"], "tp": 1, "pp": 2},
                        {"name": "tied_pp2", "load": ckpts["tied_pp2"], "tp": 1, "pp": 2}]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run_torchrun("tests/dist_infer.py", str(tmp_path / "spec.json"), str(tmp_path / "out.json"))
    got = json.loads((tmp_path / "out.json").read_text())
    for name, res in got.items():
        expected = ref_tied if name.startswith("tied") else ref
        assert res["greedy_cache"] == expected, f"{name}: greedy with KV cache differs from transformers"
        assert res["greedy_nocache"] == expected, f"{name}: greedy without KV cache differs from transformers"
        assert res["topk1"] == expected, f"{name}: top-k 1 sampling differs from greedy"
        assert res["sample_a"] == res["sample_b"], f"{name}: seeded sampling is not reproducible"
        assert res["sample_a"] != expected, f"{name}: sampling looks greedy"
        if not name.startswith("tied"):
            assert res["greedy_stop"] == ref_stop, f"{name}: stopping differs from transformers"
            assert res["beam"] == got["tp1"]["beam"], f"{name}: beam search differs from TP=1"
            assert res["sample_a"] == got["tp1"]["sample_a"], f"{name}: sampling depends on the layout"


# ---- the CLI: batch files, tasks, chat, bad input ---------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_results(ckpts, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("infer_cli")
    base = ["--load", ckpts["tp1"], "--tokenizer-name-or-path", str(ckpts["hf"]), "--max-new-tokens", str(MAX_NEW)]
    good = tmp / "in.jsonl"
    good.write_text("".join(json.dumps({"prompt": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)) +
                    json.dumps({"messages": [{"role": "user", "content": "hello"}]}) + "\n")
    bad = tmp / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": oops}\n')
    long = tmp / "long.jsonl"
    long.write_text(json.dumps({"prompt": "word " * 600}) + "\n")
    cases = [
        {"name": "batch", "argv": base + ["--input-file", str(good), "--output-file", str(tmp / "out.jsonl"),
                                          "--inference-batch-size", "2"]},
        {"name": "tasks", "argv": base + ["--prompt-type", "qwen3"], "stdin": "hello\nclear\nhi again\nquit\n"},
        {"name": "bad_json", "argv": base + ["--input-file", str(bad), "--output-file", str(tmp / "bad_out.jsonl")]},
        {"name": "missing", "argv": base + ["--input-file", str(tmp / "none.jsonl"), "--output-file",
                                            str(tmp / "none_out.jsonl")]},
        {"name": "too_long", "argv": base + ["--input-file", str(long), "--output-file", str(tmp / "long_out.jsonl")]},
        {"name": "truncated", "argv": base + ["--input-file", str(long), "--output-file",
                                              str(tmp / "trunc_out.jsonl"), "--truncate-prompt"]},
        {"name": "mismatch", "argv": base + ["--num-layers", "6", "--input-file", str(good), "--output-file",
                                             str(tmp / "mm_out.jsonl")]},
        {"name": "hf_dir", "argv": ["--load", str(ckpts["hf"])] + base[2:]},
        {"name": "hf_convert", "argv": ["--load", str(ckpts["hf"]), "--enable-hf2mg-convert", "--mg-save-dir",
                                        str(tmp / "converted")] + base[2:] +
         ["--input-file", str(good), "--output-file", str(tmp / "conv_out.jsonl"), "--inference-batch-size", "2"]},
    ]
    (tmp / "cases.json").write_text(json.dumps(cases))
    run_cli("tests/infer_cli_cases.py", str(tmp / "cases.json"), str(tmp / "results.json"))
    return {"dir": tmp, **json.loads((tmp / "results.json").read_text())}


def test_batch_file_answers_match_transformers(cli_results, ckpts):
    res = cli_results["batch"]
    assert res["rc"] == 0, res["stderr"]
    lines = [json.loads(line) for line in (cli_results["dir"] / "out.jsonl").read_text().splitlines()]
    assert [line.get("id") for line in lines] == [0, 1, 2, None]        # input order, input keys kept
    prompts = _prompts(ckpts["hf"])
    assert [line["prompt_token_ids"] for line in lines[:3]] == prompts
    assert [line["response_token_ids"] for line in lines[:3]] == hf_greedy(ckpts["hf"], prompts)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ckpts["hf"]))
    chat = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                   tokenize=False)
    assert lines[3]["prompt_token_ids"] == tok.encode(chat, add_special_tokens=False)
    for line in lines:
        assert line["response"] == tok.decode(line["response_token_ids"], skip_special_tokens=True)
        assert "<|im_end|>" not in line["response"] and "<|endoftext|>" not in line["response"]


def test_enable_hf2mg_convert_generates_as_the_converted_checkpoint(cli_results, ckpts):
    """inference.py --load HF_DIR --enable-hf2mg-convert converts at start-up (under --mg-save-dir, not into the HF
    directory) and answers as the checkpoint convert_ckpt.py made."""
    res = cli_results["hf_convert"]
    assert res["rc"] == 0, res["stderr"]
    assert (cli_results["dir"] / "conv_out.jsonl").read_text() == (cli_results["dir"] / "out.jsonl").read_text()
    assert (cli_results["dir"] / "converted" / "latest_checkpointed_iteration.txt").is_file()
    assert not list(Path(ckpts["hf"]).glob("megatron_cache*"))


def test_default_tasks_then_chat(cli_results):
    res = cli_results["tasks"]
    assert res["rc"] == 0, res["stderr"]
    out = res["stdout"]
    for banner in ("Greedy Search", "Do Sample", "Beam Search =", "Beam Search with sampling"):
        assert banner in out
    assert out.count("MindSpeed-LLM:\n") == 6          # four tasks, two chat answers
    assert "You:\nhow are you?\n\nMindSpeed-LLM:\n" in out
    assert "1. If you want to quit, please entry one of [q, quit, exit]" in out
    assert out.count("You >> ") == 4
    for special in ("<|im_end|>", "<|im_start|>", "<|endoftext|>", "<think>"):
        assert special not in out


@pytest.mark.parametrize("name, message", [
    ("bad_json", r"bad.jsonl:2: not valid JSON"),
    ("missing", r"none.jsonl: cannot read it"),
    ("too_long", r"long.jsonl:1: the prompt has \d+ tokens.*--max-position-embeddings 512.*--truncate-prompt"),
    ("mismatch", r"--num-layers 6 disagrees with .*model_optim_rng.pt, which records num_layers = 4"),
    ("hf_dir", r"--load .* is a Hugging Face model directory; convert it first"),
])
def test_bad_input_is_one_line_and_no_output(cli_results, name, message):
    import re

    res = cli_results[name]
    assert res["rc"] == 2
    errors = [line for line in res["stderr"].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), res["stderr"]
    assert "Traceback" not in res["stderr"]
    assert not [p for p in cli_results["dir"].iterdir() if p.name.startswith((f"{name}_out", ".bad_out",
                                                                            ".none_out", ".long_out", ".mm_out"))]


def test_truncate_prompt_keeps_the_tail(cli_results):
    res = cli_results["truncated"]
    assert res["rc"] == 0, res["stderr"]
    assert "cut to its last 500" in res["stdout"] + res["stderr"]
    line = json.loads((cli_results["dir"] / "trunc_out.jsonl").read_text())
    assert len(line["prompt_token_ids"]) == 512 - MAX_NEW


def test_flag_errors_without_model():
    proc = run_cli("inference.py", "--load", "/nonexistent", "--tokenizer-name-or-path", str(REPO),
                   "--hf-chat-template", "--prompt-type", "qwen3", check=False)
    assert proc.returncode == 2 and "mutually exclusive" in proc.stderr


@pytest.mark.parametrize("size, layers, tied", [("0point6b", 28, True), ("1point7b", 28, True), ("4b", 36, True),
                                                ("8b", 36, False), ("14b", 40, False), ("32b", 64, False)])
def test_generate_recipes_parse_to_real_qwen3_shapes(size, layers, tied):
    import shlex

    from mindspeed_llm.inference.args import parse_args
    from mindspeed_llm.inference.model import resolve_model_config

    script = (REPO / f"examples/mcore/qwen3/generate_qwen3_{size}_ptd.sh").read_text()
    body = script.split("inference.py", 1)[1].split("| tee", 1)[0].replace("\\\n", " ")
    for var, value in (("${TP}", "1"), ("${PP}", "1"), ("${CHECKPOINT}", "/ckpt"), ("${TOKENIZER_PATH}", "/tok"),
                       ("${SEQ_LENGTH}", "4096")):
        body = body.replace(var, value)
    args = parse_args(shlex.split(body))
    cfg = resolve_model_config(args, None, 151669, "recipe")
    assert (cfg.num_layers, cfg.tie_word_embeddings, cfg.vocab_size, cfg.kv_channels, cfg.num_query_groups) == \
        (layers, tied, 151936, 128, 8)
    assert cfg.qk_layernorm and cfg.rotary_base == 1e6 and cfg.norm_epsilon == 1e-6 and args.use_kv_cache
