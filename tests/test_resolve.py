"""One model shape through every path (training, generation, hf -> mg, mg -> hf), checked against transformers'
reading of config.json; typed flags that contradict the checkpoint are one-line errors; one runner and exit code."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mindspeed_llm.errors import UserError
from tests.conftest import run_cli
from tests.test_safe_load import error_line, run_cases
from tests.train_fixtures import train_flags


@pytest.fixture(scope="module")
def ckpts(tiny_qwen3, tmp_path_factory) -> dict:
    """The tiny model converted to Megatron, and a checkpoint posttrain_gpt.py saved from it when given only
    --load (no model-shape flag)."""
    from mindspeed_llm.checkpoint import cli
    from mindspeed_llm.demo_data import write_demo_data

    root = tmp_path_factory.mktemp("resolve")
    assert cli.main(["--load-dir", str(tiny_qwen3), "--save-dir", str(root / "mg")]) == 0
    files = write_demo_data(root / "raw", n_train=40, n_test=4)
    run_cli("preprocess_data.py", "--input", str(files["alpaca_train"]), "--tokenizer-name-or-path", str(tiny_qwen3),
            "--handler-name", "AlpacaStyleInstructionHandler", "--prompt-type", "qwen3",
            "--output-prefix", str(root / "data" / "alpaca"), "--seq-length", "128")
    train = ["--load", str(root / "mg"), "--finetune", "--swiglu", "--disable-bias-linear",
             "--tokenizer-name-or-path", str(tiny_qwen3), "--data-path", str(root / "data" / "alpaca"),
             *train_flags(2), "--save", str(root / "trained")]
    run_cli("posttrain_gpt.py", *train)
    return {"hf": tiny_qwen3, "converted": root / "mg", "trained": root / "trained", "root": root, "train": train}


def _all_paths(ckpt: Path, hf: Path) -> dict:
    from mindspeed_llm.arguments import parse_train_args
    from mindspeed_llm.checkpoint.mg2hf import iter_hf_tensors
    from mindspeed_llm.inference.args import parse_args
    from mindspeed_llm.inference.model import read_checkpoint_args, resolve_model_config
    from mindspeed_llm.models.config import read_hf_config
    from mindspeed_llm.models.resolve import resolve_model
    from mindspeed_llm.training.resolve_run import model_config

    train_args = parse_train_args(["--load", str(ckpt), "--data-path", "/nonexistent/prefix",
                                   "--is-instruction-dataset", "--train-iters", "1", "--lr", "1e-4",
                                   "--seq-length", "64"])
    infer_args = parse_args(["--load", str(ckpt), "--tokenizer-name-or-path", str(hf)])
    saved, source = read_checkpoint_args(str(ckpt))
    return {
        "hf2mg": resolve_model(hf=read_hf_config(hf), hf_source=str(hf / "config.json")),
        "training": model_config(train_args, 400),
        "inference": resolve_model_config(infer_args, saved, 400, source),
        "mg2hf": iter_hf_tensors(ckpt)[1],
        "mg2hf --hf-cfg-dir": iter_hf_tensors(ckpt, hf_cfg_dir=hf)[1],
    }


@pytest.mark.parametrize("which", ["converted", "trained"])
def test_every_path_resolves_the_hf_config(ckpts, which):
    from transformers import AutoConfig

    got = _all_paths(ckpts[which], ckpts["hf"])
    first = got["hf2mg"]
    assert all(cfg == first for cfg in got.values()), {k: v for k, v in got.items() if v != first}
    ref = AutoConfig.from_pretrained(str(ckpts["hf"]))
    rope = ref.rope_theta if hasattr(ref, "rope_theta") else ref.rope_parameters["rope_theta"]
    assert (first.num_layers, first.hidden_size, first.ffn_hidden_size, first.num_attention_heads,
            first.num_query_groups, first.kv_channels, first.vocab_size, first.max_position_embeddings,
            first.tie_word_embeddings) == \
        (ref.num_hidden_layers, ref.hidden_size, ref.intermediate_size, ref.num_attention_heads,
         ref.num_key_value_heads, ref.head_dim, ref.vocab_size, ref.max_position_embeddings,
         ref.tie_word_embeddings)
    assert first.norm_epsilon == ref.rms_norm_eps == 1e-6 and first.rotary_base == rope == 1e6
    assert first.qk_layernorm and first.family == "qwen3"      # Qwen3 always normalises q and k


def test_training_saves_the_model_that_ran(ckpts):
    from mindspeed_llm.checkpoint.load import saved_args

    saved, source = saved_args(ckpts["trained"])
    assert source.endswith("iter_0000002/mp_rank_00/model_optim_rng.pt")
    assert (saved.norm_epsilon, saved.rotary_base, saved.num_query_groups, saved.qk_layernorm,
            saved.untie_embeddings_and_output_weights, saved.model_type_hf) == (1e-6, 1e6, 2, True, True, "qwen3")


@pytest.mark.parametrize("flags, message", [
    (["--norm-epsilon", "1e-5"], "--norm-epsilon 1e-05 disagrees with {f}, which records norm_epsilon = 1e-06"),
    (["--rotary-base", "10000"], "--rotary-base 10000.0 disagrees with {f}, which records rotary_base = 1000000.0"),
    (["--group-query-attention", "--num-query-groups", "4"],
     "--num-query-groups 4 disagrees with {f}, which records num_query_groups = 2"),
    (["--padded-vocab-size", "512"], "--padded-vocab-size 512 disagrees with {f}, which records vocab_size = 448"),
    (["--hidden-size", "32"], "--hidden-size 32 disagrees with {f}, which records hidden_size = 64"),
])
def test_flag_against_checkpoint_is_one_error(ckpts, flags, message):
    from mindspeed_llm.inference.args import parse_args
    from mindspeed_llm.inference.model import read_checkpoint_args, resolve_model_config

    saved, source = read_checkpoint_args(str(ckpts["trained"]))
    args = parse_args(["--load", str(ckpts["trained"]), "--tokenizer-name-or-path", str(ckpts["hf"]), *flags])
    with pytest.raises(UserError) as err:
        resolve_model_config(args, saved, 400, source)
    assert message.format(f=source) in str(err.value)


def test_tied_checkpoint_refuses_untie_flag(tiny_qwen3_tied):
    from mindspeed_llm.arguments import parse_train_args
    from mindspeed_llm.models.config import read_hf_config
    from mindspeed_llm.models.resolve import resolve_model

    args = parse_train_args(["--untie-embeddings-and-output-weights", "--data-path", "/nonexistent/prefix",
                             "--is-instruction-dataset", "--train-iters", "1", "--lr", "1e-4", "--seq-length", "64"])
    with pytest.raises(UserError, match=r"--untie-embeddings-and-output-weights disagrees with .*config.json, "
                                        r"which records tie_word_embeddings = True; drop the flag"):
        resolve_model(args, args.explicit, hf=read_hf_config(tiny_qwen3_tied),
                      hf_source=str(tiny_qwen3_tied / "config.json"))


def test_mismatch_through_the_clis(ckpts, tmp_path):
    rank_file = ckpts["converted"] / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    other = tmp_path / "other_cfg"           # --hf-cfg-dir whose config.json is another model's
    shutil.copytree(ckpts["hf"], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rope_theta"] = 10000.0
    (other / "config.json").write_text(json.dumps(cfg))
    train = [a if a != str(ckpts["root"] / "trained") else str(tmp_path / "never") for a in ckpts["train"]]
    cases = [  # one process runs them all (tests/cli_cases.py)
        # the recipe's --norm-epsilon 1e-5 against a checkpoint converted from an eps-1e-6 model
        {"name": "train", "script": "posttrain_gpt.py", "argv": [*train, "--norm-epsilon", "1e-5"]},
        {"name": "generate", "script": "inference.py",      # KV groups
         "argv": ["--load", str(ckpts["converted"]), "--tokenizer-name-or-path", str(ckpts["hf"]),
                  "--group-query-attention", "--num-query-groups", "4"]},
        {"name": "mg2hf", "script": "convert_ckpt.py",
         "argv": ["--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", str(ckpts["converted"]),
                  "--save-dir", str(tmp_path / "out"), "--hf-cfg-dir", str(other)]}]
    (tmp_path / "cases").mkdir()
    results = run_cases(cases, tmp_path / "cases")
    assert f"--norm-epsilon 1e-05 disagrees with {rank_file}, which records norm_epsilon = 1e-06" in \
        error_line(results["train"])
    assert not (tmp_path / "never").exists()
    assert f"--num-query-groups 4 disagrees with {rank_file}, which records num_query_groups = 2" in \
        error_line(results["generate"])
    assert f"{rank_file} records rotary_base = 1000000.0 but {other / 'config.json'} has rope_theta = 10000.0" in \
        error_line(results["mg2hf"])
    assert not (tmp_path / "out").exists()


# ---- one error type, one runner, one exit code ----------------------------------------------------------------

@pytest.mark.parametrize("script, argv", [
    ("preprocess_data.py", ["--input", "x.jsonl", "--output-prefix", "o", "--workers", "many"]),
    ("convert_ckpt.py", ["--load-dir", "a", "--save-dir", "b", "--target-tensor-parallel-size", "two"]),
    ("convert_ckpt_v2.py", ["--load-dir", "a", "--save-dir", "b", "--load-model-type", "safetensors"]),
    ("posttrain_gpt.py", ["--num-layers", "four"]),
    ("inference.py", ["--load", "a", "--max-new-tokens", "lots"]),
])
def test_bad_flag_value_exits_2_with_one_error_line(script, argv):
    proc = run_cli(script, *argv, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and argv[-2] in lines[0], proc.stderr


def test_user_errors_share_one_type():
    from mindspeed_llm.checkpoint.errors import ConversionError
    from mindspeed_llm.models.config import ConfigError
    from mindspeed_llm.models.placement import PlacementError

    assert all(issubclass(e, UserError) and not issubclass(e, ValueError)
               for e in (ConversionError, ConfigError, PlacementError))


def test_run_main_keeps_the_traceback_of_a_bug(capsys):
    from mindspeed_llm.logs import exit_status

    def bug() -> None:
        raise KeyError("internal")

    with pytest.raises(KeyError):
        exit_status(bug)
    assert exit_status(lambda: (_ for _ in ()).throw(UserError("bad --flag"))) == 2
    assert capsys.readouterr().err == "error: bad --flag\n"
    code = "from mindspeed_llm.logs import run_main\ndef main():\n    {}['missing']\nrun_main(main)\n"
    proc = run_cli("-c", code, check=False)
    assert proc.returncode not in (0, 2) and "Traceback" in proc.stderr and "KeyError: 'missing'" in proc.stderr
    assert not [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
