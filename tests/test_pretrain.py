"""pretrain_gpt.py on the tiny Qwen3 model and GeneralPretrainHandler data: the first loss against `transformers` on
the samples megatron-core's own GPTDataset yields, TP2/PP2 against TP1, exact resume, a weighted blend, reset
attention/positions with EOD loss masking, learning from scratch, and the bad-input lines. One torchrun launch
(2 processes) runs every training configuration."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import run_cli
from tests.recipes import edit, load_recipes, recipe_argv, split_flags
from tests.test_safe_load import error_line, run_cases
from tests.train_fixtures import launch_plan, model_flags

SEQ = 64
REL = 1e-5


def write_text_corpus(path: Path, n: int, seed: int) -> Path:
    """The demo tasks as plain text documents (instruction, input and answer on one line)."""
    from mindspeed_llm.demo_data import generate_examples

    rows = [{"text": f"{ex['instruction']} {ex['input']} -> {ex['output']}"} for ex in generate_examples(n, seed)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pt(tmp_path_factory, tiny_qwen3) -> dict:
    """Two pretraining corpora (EOD appended to every document) and one instruction dataset."""
    from mindspeed_llm.demo_data import write_demo_data

    root = tmp_path_factory.mktemp("pretrain")
    prefixes = {}
    for name, n, seed in (("a", 600, 1), ("b", 300, 2)):
        raw = write_text_corpus(root / "raw" / f"{name}.jsonl", n, seed)
        run_cli("preprocess_data.py", "--input", str(raw), "--tokenizer-name-or-path", str(tiny_qwen3),
                "--handler-name", "GeneralPretrainHandler", "--json-keys", "text", "--append-eod",
                "--output-prefix", str(root / name / name))
        prefixes[name] = str(root / name / f"{name}_text_document")
    files = write_demo_data(root / "raw_sft", n_train=40, n_test=4)
    run_cli("preprocess_data.py", "--input", str(files["alpaca_train"]), "--tokenizer-name-or-path",
            str(tiny_qwen3), "--handler-name", "AlpacaStyleInstructionHandler", "--prompt-type", "qwen3",
            "--output-prefix", str(root / "sft" / "alpaca"), "--seq-length", str(SEQ))
    return {"root": root, "hf": tiny_qwen3, **prefixes, "sft": str(root / "sft" / "alpaca")}


def pretrain_flags(pt: dict, iters: int = 3) -> list[str]:
    return model_flags(pt["hf"]) + (
        f"--micro-batch-size 2 --global-batch-size 4 --train-iters {iters} --lr 1e-3 --min-lr 1e-4 "
        f"--lr-warmup-iters 1 --weight-decay 0.1 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95 --seed 42 "
        f"--split 100,0,0 --seq-length {SEQ} --ckpt-format torch --log-interval 1 --eval-iters 0 "
        f"--distributed-backend nccl").split() + ["--data-cache-path", str(pt["root"] / "index_cache")]


def from_hf(pt: dict, tag: str) -> list[str]:
    return ["--load", str(pt["hf"]), "--enable-hf2mg-convert", "--mg-save-dir", str(pt["root"] / f"mg_{tag}")]


@pytest.fixture(scope="module")
def runs(pt) -> dict:
    root = pt["root"]
    base = pretrain_flags(pt) + ["--data-path", pt["a"]]
    resume = pretrain_flags(pt, iters=4) + ["--data-path", pt["a"]]
    plan = [
        {"name": "tp1", "argv": base + from_hf(pt, "tp1")},
        {"name": "tp2", "argv": base + from_hf(pt, "tp2") + ["--tensor-model-parallel-size", "2",
                                                             "--sequence-parallel"]},
        {"name": "pp2", "argv": base + from_hf(pt, "pp2") + ["--pipeline-model-parallel-size", "2"]},
        {"name": "blend", "argv": pretrain_flags(pt) + ["--data-path", "0.3", pt["a"], "0.7", pt["b"]]
         + from_hf(pt, "tp1")},
        {"name": "reset", "argv": base + from_hf(pt, "tp1") + ["--reset-attention-mask", "--reset-position-ids",
                                                               "--eod-mask-loss"]},
        {"name": "reset_mask", "argv": base + from_hf(pt, "tp1") + ["--reset-attention-mask"]},
        {"name": "straight", "argv": resume + from_hf(pt, "tp1") + ["--save", str(root / "straight")]},
        {"name": "half", "argv": resume + from_hf(pt, "tp1") + ["--save", str(root / "half"), "--exit-interval",
                                                                "2"]},
        {"name": "resumed", "argv": resume + ["--load", str(root / "half"), "--save", str(root / "half")]},
        {"name": "scratch", "argv": pretrain_flags(pt, iters=40) + ["--data-path", pt["a"], "--lr", "3e-3",
                                                                    "--init-method-std", "0.02"]},
    ]
    return launch_plan(root, "pretrain", [{"kind": "pretrain", **case} for case in plan], nproc=2)


class DatasetTokenizer:
    """The three things megatron-core's GPT datasets read of a tokenizer."""

    def __init__(self, eod: int, vocab_size: int) -> None:
        self.eod, self.vocab_size = eod, vocab_size
        self.unique_identifiers = {"test": "pretrain", "eod": eod}


def megatron_samples(pt: dict, blend: list, count: int, reset: bool = False,
                     reset_positions: bool = False) -> list[dict]:
    """The first `count` training samples megatron-core's GPTDataset (blended by weight) yields for seed 42; `reset`:
    with the reset attention mask, and `reset_positions` also restarting positions and masking the EOD loss."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pt["hf"])
    prefixes, weights = (blend[1::2], [float(w) for w in blend[0::2]]) if len(blend) > 1 else (blend, None)
    # No cache folder: megatron-core then builds the blend's indices in memory (writing them asks for a process group).
    config = GPTDatasetConfig(random_seed=42, sequence_length=SEQ, blend=(prefixes, weights), split="100,0,0",
                              tokenizer=DatasetTokenizer(tok.eos_token_id, len(tok)),
                              reset_position_ids=reset and reset_positions, reset_attention_mask=reset,
                              eod_mask_loss=reset and reset_positions, create_attention_mask=False)
    train = BlendedMegatronDatasetBuilder(GPTDataset, [3 * 4, 0, 0], lambda: True, config).build()[0]
    return [train[i] for i in range(count)]


def transformers_first_loss(pt: dict, samples: list[dict], per_document: bool = False) -> float:
    """Iteration 1 as Megatron reports it: the mean over the 2 micro-batches (2 samples each) of each one's
    token-mean cross entropy under the loss mask. `per_document`: each EOD-ended document runs on its own, at the
    sample's positions (restarting or not)."""
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(pt["hf"], dtype=torch.float32)
    eod = AutoTokenizer.from_pretrained(pt["hf"]).eos_token_id
    means = []
    with torch.no_grad():
        for mb in (samples[0:2], samples[2:4]):
            total, count = 0.0, 0.0
            for s in mb:
                tokens = s["tokens"]
                if per_document:
                    ends = (torch.nonzero(tokens == eod).flatten() + 1).tolist()
                    cuts = [0] + [e for e in ends if e < len(tokens)] + [len(tokens)]
                    logits = torch.cat([model(tokens[a:b][None], position_ids=s["position_ids"][a:b][None]).logits[0]
                                        for a, b in zip(cuts[:-1], cuts[1:])])
                else:
                    logits = model(tokens[None]).logits[0]
                nll = F.cross_entropy(logits.float(), s["labels"], reduction="none")
                total += float((nll * s["loss_mask"]).sum())
                count += float(s["loss_mask"].sum())
            means.append(total / count)
    return sum(means) / len(means)


def assert_close(got: list[float], want: list[float], rel: float = REL) -> None:
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want):
        assert math.isfinite(g) and abs(g - w) <= rel * abs(w), (got, want)


@pytest.mark.distributed
def test_first_loss_equals_transformers_on_megatron_samples(pt, runs):
    want = transformers_first_loss(pt, megatron_samples(pt, [pt["a"]], 4))
    assert_close(runs["tp1"]["losses"][:1], [want])


@pytest.mark.distributed
def test_blend_draws_megatron_blended_samples(pt, runs):
    samples = megatron_samples(pt, ["0.3", pt["a"], "0.7", pt["b"]], 4)
    assert_close(runs["blend"]["losses"][:1], [transformers_first_loss(pt, samples)])
    assert all(math.isfinite(v) for v in runs["blend"]["losses"]) and runs["blend"]["iteration"] == 3


@pytest.mark.distributed
@pytest.mark.parametrize("name,positions", [("reset", True), ("reset_mask", False)])
def test_reset_attention_mask_runs_each_document_alone(pt, runs, name, positions):
    """--reset-attention-mask: attention stays inside each EOD-ended document; with --reset-position-ids (and
    --eod-mask-loss) positions restart there, without it they run on through the sample, as in Megatron-LM."""
    samples = megatron_samples(pt, [pt["a"]], 4, reset=True, reset_positions=positions)
    assert sum(int((s["position_ids"] == 0).sum()) for s in samples) > (4 if positions else 0)
    if positions:
        assert sum(float((s["loss_mask"] == 0).sum()) for s in samples) > 0, "no EOD in the samples: nothing tested"
    assert_close(runs[name]["losses"][:1], [transformers_first_loss(pt, samples, per_document=True)])


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["tp2", "pp2"])
def test_parallel_layouts_equal_tp1(runs, name):
    assert_close(runs[name]["losses"], runs["tp1"]["losses"])


@pytest.mark.distributed
def test_resume_continues_exactly(runs):
    straight, half, resumed = runs["straight"]["losses"], runs["half"]["losses"], runs["resumed"]["losses"]
    assert len(straight) == 4 and half == straight[:2] and runs["resumed"]["iteration"] == 4
    assert_close(resumed, straight[2:], rel=1e-6)


@pytest.mark.distributed
def test_training_from_scratch_learns(runs):
    losses = runs["scratch"]["losses"]
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert last < first - 1.0, (first, last)


def test_bad_input_is_one_line(pt, tmp_path):
    argv = pretrain_flags(pt, iters=1)
    # The tokenizer the corpus was made with, under the same name, with two token ids swapped.
    other = tmp_path / "other" / pt["hf"].name
    shutil.copytree(pt["hf"], other, ignore=shutil.ignore_patterns("*.safetensors*", "megatron_cache*"))
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    cases = [
        ("other_tokenizer", "pretrain_gpt.py", argv + ["--data-path", pt["a"], "--tokenizer-name-or-path", str(other)],
         ("a_preprocess.json", "differs in content")),
        ("no_files", "pretrain_gpt.py", argv + ["--data-path", str(pt["root"] / "a" / "a")],
         ("missing a.bin and a.idx", "did you mean", "a_text_document")),
        ("instruction", "pretrain_gpt.py", argv + ["--data-path", pt["sft"]], ("instruction data", "posttrain_gpt.py")),
        ("weights", "pretrain_gpt.py", argv + ["--data-path", "0.3", pt["a"], "0,7", pt["b"]],
         ("blend weight '0,7' does not parse",)),
        ("mixed", "pretrain_gpt.py", argv + ["--data-path", pt["a"], "0.5", pt["b"]], ("mixes weights",)),
        ("sft_flag", "pretrain_gpt.py", argv + ["--data-path", pt["a"], "--prompt-type", "qwen3"],
         ("--prompt-type qwen3: not supported by pretrain_gpt.py",)),
        ("to_posttrain", "posttrain_gpt.py",
         [a for a in argv if a != "--data-cache-path" and a != str(pt["root"] / "index_cache")]
         + ["--data-path", pt["a"], "--is-instruction-dataset", "--prompt-type", "qwen3"],
         ("pretraining text", "pretrain_gpt.py")),
    ]
    results = run_cases([{"name": n, "script": s, "argv": a} for n, s, a, _ in cases], tmp_path)
    for name, _, _, needles in cases:
        assert results[name]["rc"] == 2, (name, results[name]["stderr"][-2000:])
        line = error_line(results[name])
        assert all(n in line for n in needles), (name, line)


# ---------------------------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------------------------

RECIPES = {name: flags for name, (_, flags) in load_recipes().items() if "/pretrain_" in name}
OUR_RECIPES = Path(__file__).resolve().parents[1] / "examples" / "mcore" / "qwen3"


def test_reference_lists_the_dense_pretraining_recipes():
    assert sorted(n.split("/")[1] for n in RECIPES) == sorted(
        f"pretrain_qwen3_{size}_4K_ptd{a3}" for size in ("0point6b", "1point7b", "4b", "8b", "14b", "32b")
        for a3 in ("", "_A3") if not (a3 and size in ("0point6b", "1point7b", "4b")))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_our_recipe_passes_mindspeeds_flags(name, tmp_path):
    """Our script passes exactly MindSpeed's flags and values (PATH values from its variables)."""
    argv = recipe_argv(OUR_RECIPES / f"{name.split('/')[1]}.sh", tmp_path, entry="pretrain_gpt.py")
    ours, theirs = {}, {}
    for flags, out in ((split_flags(argv), ours), (RECIPES[name], theirs)):
        for flag, *values in flags:
            out[flag] = values
    assert sorted(ours) == sorted(theirs)
    differ = {f: (ours[f], theirs[f]) for f in theirs if theirs[f] != ["PATH"] and ours[f] != theirs[f]}
    assert not differ


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_mindspeed_recipe_parses(name, pt, capsys):
    from mindspeed_llm.arguments import parse_pretrain_args

    args = parse_pretrain_args(edit(RECIPES[name], {"--load": str(pt["hf"]), "--save": "save", "--data-path": pt["a"],
                                                    "--tokenizer-name-or-path": str(pt["hf"])}))
    assert args.stage == "pretrain" and args.data_path == [pt["a"]] and args.enable_hf2mg_convert
    assert "--use-flash-attn: accepted, no effect" in capsys.readouterr().err


@pytest.mark.distributed
def test_recipes_run_on_the_tiny_model(pt, tiny_qwen3_tied, tmp_path):
    """Our 1.7B recipe (tied embeddings, --norm-topk-prob on a dense model; run with a validation split) and the 32B
    one (reset attention mask; VPP dropped at one process) through pretrain_gpt.py, one process each, from the tiny
    Hugging Face model."""
    from tests.conftest import run_torchrun

    short = {"--seq-length": str(SEQ), "--split": "90,10,0", "--eval-interval": "2", "--eval-iters": "1"}
    for name, hf, extra in (("pretrain_qwen3_1point7b_4K_ptd", tiny_qwen3_tied, short),
                            ("pretrain_qwen3_32b_4K_ptd", pt["hf"], {"--seq-length": str(SEQ)})):
        paths = {"--load": str(hf), "--data-path": pt["a"], "--tokenizer-name-or-path": str(pt["hf"]),
                 "--save": str(tmp_path / name)}
        flags = split_flags(recipe_argv(OUR_RECIPES / f"{name}.sh", tmp_path, entry="pretrain_gpt.py"))
        argv = edit([[f[0], "PATH"] if f[0] in paths else f for f in flags], paths, extra)
        proc = run_torchrun("pretrain_gpt.py", *argv, "--mg-save-dir", str(tmp_path / "mg" / name), nproc=1)
        losses = [float(v) for v in re.findall(r"\| lm loss: (\S+) \|", proc.stdout)]
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses), proc.stdout[-3000:]
        assert ("--norm-topk-prob: accepted, no effect" in proc.stderr) == ("1point7b" in name)
        assert (tmp_path / name / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
        if extra is short:
            value, ppl = re.search(r"validation loss at iteration 2 \| lm loss value: (\S+) \| lm loss PPL: (\S+)",
                                   proc.stdout).groups()
            assert math.isclose(math.exp(float(value)), float(ppl), rel_tol=1e-5)
