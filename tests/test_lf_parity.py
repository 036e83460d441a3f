"""Parity with LLaMA-Factory 0.9.5: `preprocess_data.py` must give LF's token ids and labels, sample for sample.

Our `--prompt-type qwen3` is LF's `qwen3` template, `qwen_lf` is LF's `qwen`. Our `--enable-thinking true|false|none`
is LF's `DataArguments.enable_thinking` True / False / None (None is a legal value of LF's Optional[bool] field and
gives exactly "keep the CoT the data has, put an empty think block in the masked prompt of turns without one").

The LF side is the real LF code (see tests/lf_reference.py: wheel installed with --no-deps into
`.cache/lf-0.9.5`, imported in a worker process). LF cutoff_len = our --seq-length; train_on_prompt and
mask_history off, no packing.

Two tokenizers: the project's tiny Qwen-style tokenizer (`tiny_qwen3`), and a "boundary-sensitive" one trained
here with Qwen2's pre-tokenizer (split regex `\\s*[\\r\\n]+` ..., which transformers' Qwen2Tokenizer also applies to
the tiny one) on chat-shaped text, so that it has merges across newlines ("\\n\\n", "\\n\\n\\n" ...).
LF encodes each template slot (and the empty think block) separately; a tokenizer with such merges exposes any
difference in where the text is cut before encoding, which the tiny tokenizer (no merges over newlines) hides.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, SHARED_DATASETS, run_cli
from tests import lf_reference as lfr

IGNORE = -100
BIG = 16384  # --seq-length / cutoff_len for runs that must not truncate


# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def lf_worker():
    try:
        site = lfr.ensure_llamafactory()
        worker = lfr.LFWorker(site)
    except lfr.LFUnavailable as e:
        pytest.skip(f"LLaMA-Factory {lfr.LF_VERSION} reference unavailable: {e}")
    yield worker
    worker.close()


@pytest.fixture(scope="session")
def cli_ready():
    if not (REPO / "preprocess_data.py").is_file():
        pytest.skip("preprocess_data.py does not exist yet")


BOUNDARY_TOKENIZER_CORPUS_EXTRA = [
    "system\nYou are a helpful assistant.\n\n", "user\nHello\n\n", "assistant\n\nSure.\n\n", "\n\n\n\n",
    "one\n\n\ntwo", "\n\n\nHi there.", "x\n\n\n", "\n\n Hello.",
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n",
    "You are provided with function signatures within XML tags:\n", "\n\nFor each function call\n",
    '{"name": "get_weather", "arguments": {"city": "Paris"}}\n', '{"temperature": 21}\n\n', "The answer is 3.\n\n",
    "First, think.\nThen answer.\n\n", "step one\nstep two\n\n", "reasoning\n\nanswer\n\n",
]


QWEN2_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                       r"\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.fixture(scope="session")
def boundary_tok(tiny_qwen3, tmp_path_factory) -> Path:
    """A copy of tiny_qwen3 whose tokenizer has merges across newlines (same specials and config)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mindspeed_llm import demo_data, tiny

    out = tmp_path_factory.mktemp("tok") / "boundary_qwen3"
    shutil.copytree(tiny_qwen3, out)
    corpus = list(demo_data.corpus()) + BOUNDARY_TOKENIZER_CORPUS_EXTRA * 20
    for rec in ALPACA_RECORDS + SHAREGPT_RECORDS + EDGE_RECORDS:
        corpus += [json.dumps(rec, ensure_ascii=False)] + [str(v) for v in rec.values() if isinstance(v, str)]
    tok = Tokenizer(models.BPE())
    # Qwen2/Qwen3's pre-tokenizer: their split regex, then byte-level mapping without the GPT-2 regex.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=tiny.SPECIAL_TOKENS[1:],
                                   clean_up_tokenization_spaces=False)
    fast.add_special_tokens({"additional_special_tokens": tiny.SPECIAL_TOKENS})
    fast.add_tokens(tiny.TAG_TOKENS)
    fast.chat_template = tiny.QWEN3_CHAT_TEMPLATE
    fast.model_max_length = 4096
    for f in out.glob("*token*"):
        f.unlink()
    fast.save_pretrained(out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg["split_special_tokens"] = False
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    # sanity, as both sides load it: merges over newlines, and pre-tokens that span "\n\n" + "\n..."
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(out)
    enc = lambda text: loaded.encode(text, add_special_tokens=False)  # noqa: E731
    assert len(enc("\n\n")) == 1 and enc("\n\n\nHi") != enc("\n\n") + enc("\nHi"), "boundary tokenizer lost its merges"
    return out


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
COT = "<think>\nThe word is kalo; reversed it is olak.\n</think>\n\n"
ALPACA_RECORDS = [
    {"instruction": "Reverse the letters of the word.", "input": "kalo", "output": "olak",
     "system": "You are a careful assistant.", "history": [["Add the two numbers.\n3+4", "7"],
                                                          ["Write the word in capital letters.", "MINE"]]},
    {"instruction": "Reverse the letters of the word.", "input": "", "output": COT + "olak", "system": "",
     "history": []},
    {"instruction": "Add the two numbers.", "input": "12+30", "output": "42", "system": "Answer with digits.",
     "history": [["Reverse: ne", "<think>\nn, e -> e, n\n</think>\n\nen"]]},
    {"instruction": "Repeat the word twice, separated by a space.", "input": "zo",
     "output": "<think>\n\n</think>\n\nzo zo", "system": "", "history": [["Hello, how are you?", "I am fine."]]},
    {"instruction": "Say hi.", "input": "", "output": "\nHi there.", "system": "", "history": [["Hi", " Hello."]]},
]

TOOLS = json.dumps([{"name": "get_weather", "description": "Weather of a city",
                     "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                    "required": ["city"]}}])
SHAREGPT_RECORDS = [
    {"conversations": [{"from": "human", "value": "Add the two numbers.\n3+4"}, {"from": "gpt", "value": "7"},
                       {"from": "human", "value": "Reverse the letters of the word: kalo"},
                       {"from": "gpt", "value": COT + "olak"},
                       {"from": "human", "value": "Upper-case: mine"}, {"from": "gpt", "value": "MINE"}],
     "system": "You are a careful assistant.", "tools": ""},
    {"conversations": [{"from": "system", "value": "System message inside the conversation."},
                       {"from": "human", "value": "Hello, how are you?"},
                       {"from": "gpt", "value": "I am fine, thank you."}],
     "system": "", "tools": ""},
    {"conversations": [{"from": "human", "value": "What is the weather in Paris?"},
                       {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
                       {"from": "observation", "value": '{"temperature": 21}'},
                       {"from": "gpt", "value": "It is 21 degrees in Paris."}],
     "system": "", "tools": TOOLS},
    {"conversations": [{"from": "human", "value": "And in Rome? Think first."},
                       {"from": "function_call",
                        "value": '[{"name": "get_weather", "arguments": {"city": "Rome"}}, '
                                 '{"name": "get_weather", "arguments": {"city": "Milan"}}]'},
                       {"from": "observation", "value": '{"temperature": 25}'},
                       {"from": "gpt", "value": "<think>\nRome is warm.\n</think>\n\nIt is 25 degrees in Rome."}],
     "system": "Be brief.", "tools": TOOLS},
]

DPO_ALPACA_RECORDS = [
    {"instruction": "Reverse the letters of the word.", "input": "kalo", "chosen": "olak", "rejected": "kalo",
     "system": "Be brief.", "history": [["Add 1+2.", "<think>\n1+2=3\n</think>\n\n3"]]},
    {"instruction": "Add the two numbers.", "input": "2+2", "chosen": "<think>\n2+2=4\n</think>\n\n4",
     "rejected": "5", "system": "", "history": []},
]
DPO_SHAREGPT_RECORDS = [
    {"conversations": [{"from": "human", "value": "Add 1+2."}, {"from": "gpt", "value": COT + "3"},
                       {"from": "human", "value": "Reverse: kalo"}],
     "chosen": {"from": "gpt", "value": "olak"}, "rejected": {"from": "gpt", "value": COT + "kalo"}},
    {"conversations": [{"from": "human", "value": "Upper-case: mine"}],
     "chosen": {"from": "gpt", "value": "MINE"}, "rejected": {"from": "gpt", "value": "mine"}},
]


def write_json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1))
    return path


def read_records(src: Path, n: int | None = None) -> list[dict]:
    if src.suffix == ".json":
        return json.loads(src.read_text())[:n]
    return [json.loads(line) for line in src.read_text().splitlines() if line.strip()][:n]


def normalized(records: list[dict]) -> list[dict]:
    """Give every record every key (missing system/tools -> "", history -> []), so files mix cleanly."""
    defaults = {"system": "", "tools": "", "history": []}
    keys = {k for r in records for k in r}
    return [{**{k: defaults[k] for k in keys if k in defaults and k not in r}, **r} for r in records]


# Edge rows, one file (one CLI run per thinking mode); each group isolates one LF rule:
EDGE_RECORDS = [
    # rows 0-1, glaive-style: a tools column holding "[]" (no tools). LF's Template._encode tests the raw string
    # (`if system or tools:`), so with no system it emits an empty system turn `<|im_start|>system\n<|im_end|>\n`.
    {"conversations": [{"from": "human", "value": "Hello, how are you?"}, {"from": "gpt", "value": "I am fine."}],
     "system": "", "tools": "[]"},
    {"conversations": [{"from": "human", "value": "Add 2+2."}, {"from": "gpt", "value": "4"}],
     "system": "Be brief.", "tools": "[]"},
    # rows 2-4: CoT whose tags are not followed/preceded by newlines. LF 0.9.5's thought_words are
    # ("<think>\n", "\n</think>\n\n"): detection is `"<think>" in content or "</think>" in content` (the words
    # stripped), removal is the regex over the full words then lstrip("\n"), so a thought spelled without the
    # newlines is kept under enable_thinking false and gets no empty block ("<think>\n\n</think>\n\n").
    {"conversations": [{"from": "human", "value": "Reverse: kalo"},
                       {"from": "gpt", "value": "<think>reverse it</think>olak"}], "system": "", "tools": ""},
    {"conversations": [{"from": "human", "value": "Upper: mine"},
                       {"from": "gpt", "value": "<think>\nupper</think>MINE"}], "system": "", "tools": ""},
    {"conversations": [{"from": "human", "value": "Add 1+1"},
                       {"from": "gpt", "value": "<think>\n1+1\n</think>\n\n2"}], "system": "", "tools": ""},
    # rows 5-6: rows LF drops (roles out of order; conversation ending on a user turn). Ours must skip them too.
    {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                       {"from": "gpt", "value": "c"}], "system": "", "tools": ""},
    {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                       {"from": "human", "value": "c"}], "system": "", "tools": ""},
    # rows 7-8: answers that start with a newline or a space. LF encodes the empty think block on its own, then
    # the answer; with Qwen's pre-tokenizer "\n\n" + "\nHi" encodes differently from "\n\n\nHi" (boundary tokenizer).
    {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "\nHi there."}],
     "system": "", "tools": ""},
    {"conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": " Hello."}],
     "system": "", "tools": ""},
    # row 9: a valid row after the dropped ones (alignment check)
    SHAREGPT_RECORDS[1],
]


def demo_records(tmp: Path, fmt: str, n: int) -> list[dict]:
    from mindspeed_llm.demo_data import write_demo_data

    paths = write_demo_data(tmp / "demo", n_train=200, n_test=10)
    return read_records(paths[f"{fmt}_train"], n)


# name -> (format, pairwise, builder(tmp, shared_dir) -> records, needs ../shared)
DATASETS = {
    "alpaca_mix": ("alpaca", False, lambda tmp, sh: normalized(ALPACA_RECORDS + demo_records(tmp, "alpaca", 30)),
                   False),
    "sharegpt_mix": ("sharegpt", False,
                     lambda tmp, sh: normalized(SHAREGPT_RECORDS + demo_records(tmp, "sharegpt", 20)), False),
    "edge": ("sharegpt", False, lambda tmp, sh: EDGE_RECORDS, False),
    "dpo_alpaca": ("alpaca", True, lambda tmp, sh: DPO_ALPACA_RECORDS, False),
    "dpo_sharegpt": ("sharegpt", True, lambda tmp, sh: DPO_SHAREGPT_RECORDS, False),
    "glaive50": ("sharegpt", False, lambda tmp, sh: read_records(sh / "glaive_toolcall_en_demo.json", 50), True),
    "dpo50": ("sharegpt", True, lambda tmp, sh: read_records(sh / "dpo_en_demo.json", 50), True),
    "alpaca_en50": ("alpaca", False, lambda tmp, sh: read_records(sh / "alpaca_en_demo.json", 50), True),
}


class Case:
    """One comparison: one run of our CLI and one LF job on the same file with the same settings."""

    def __init__(self, dataset: str, prompt_type: str, thinking: str, seq_length: int = BIG,
                 tokenizer: str = "tiny"):
        self.dataset, self.prompt_type, self.thinking = dataset, prompt_type, thinking
        self.seq_length, self.tokenizer = seq_length, tokenizer
        self.fmt, self.pairwise, self.build, self.shared = DATASETS[dataset]
        self.id = f"{dataset}-{prompt_type}-{thinking}" + (f"-seq{seq_length}" if seq_length != BIG else "") + \
            (f"-{tokenizer}" if tokenizer != "tiny" else "")

    def __repr__(self) -> str:
        return self.id


HANDLERS = {("alpaca", False): "AlpacaStyleInstructionHandler", ("sharegpt", False): "SharegptStyleInstructionHandler",
            ("alpaca", True): "AlpacaStylePairwiseHandler", ("sharegpt", True): "SharegptStylePairwiseHandler"}
SFT_KEYS = ("input_ids", "labels")
PAIR_KEYS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


def our_map_keys(fmt: str, keys: set[str]) -> dict[str, str]:
    """The optional columns both tools read only when told to (LF: dataset_info columns; ours: --map-keys)."""
    optional = ("system", "history") if fmt == "alpaca" else ("system", "tools")
    return {k: k for k in optional if k in keys}


def run_ours(case: Case, data: Path, tok: Path, out_dir: Path) -> dict[str, Any]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = out_dir / case.id
    args = ["preprocess_data.py", "--input", str(data), "--tokenizer-type", "PretrainedFromHF",
            "--tokenizer-name-or-path", str(tok), "--output-prefix", str(prefix),
            "--handler-name", HANDLERS[(case.fmt, case.pairwise)], "--prompt-type", case.prompt_type,
            "--enable-thinking", case.thinking, "--seq-length", str(case.seq_length), "--workers", "1"]
    map_keys = our_map_keys(case.fmt, {k for r in read_records(data) for k in r})
    if map_keys:
        args += ["--map-keys", json.dumps(map_keys)]
    proc = run_cli(*args, check=False)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return {"error": f"preprocess_data.py exited {proc.returncode}:\n{log[-3000:]}", "log": log}
    names = PAIR_KEYS if case.pairwise else SFT_KEYS
    columns = {n: IndexedDataset(f"{prefix}_packed_{n}_document") for n in names}
    counts = {n: len(ds) for n, ds in columns.items()}
    if len(set(counts.values())) != 1:
        return {"error": f"our output columns have different sample counts: {counts}", "log": log}
    samples = [{n: [int(x) for x in columns[n][i]] for n in names} for i in range(counts[names[0]])]
    return {"samples": samples, "log": log}


def run_lf(case: Case, data: Path, tok: Path, worker) -> dict[str, Any]:
    keys = {k for r in read_records(data) for k in r}
    try:
        return lfr.lf_encode(data_file=data, fmt=case.fmt, tokenizer_dir=tok,
                             template=lfr.OUR_TO_LF_TEMPLATE[case.prompt_type], enable_thinking=case.thinking,
                             cutoff_len=case.seq_length, pairwise=case.pairwise,
                             columns=lfr._default_columns(case.fmt, case.pairwise, keys), with_aligned=True,
                             worker=worker)
    except Exception as e:  # noqa: BLE001 - reported by the test that asks for this case
        return {"error": f"LLaMA-Factory failed: {e}"}


class Runner:
    """Runs every selected case once: our CLI runs concurrently (2 at a time), LF jobs beside them in the worker."""

    def __init__(self, request, tmp: Path, worker):
        self.request, self.tmp, self.worker = request, tmp, worker
        self.futures: dict[str, Any] = {}
        self.pool = None

    def _tokenizer(self, kind: str) -> Path:
        return self.request.getfixturevalue("tiny_qwen3" if kind == "tiny" else "boundary_tok")

    def _data(self, case: Case) -> Path:
        path = self.tmp / f"{case.dataset}.json"
        if not path.exists():
            write_json(path, case.build(self.tmp, SHARED_DATASETS))
        return path

    def start(self, cases: list[Case]) -> None:
        import concurrent.futures as cf
        import os

        todo = [c for c in cases if c.id not in self.futures and (not c.shared or SHARED_DATASETS.is_dir())]
        if not todo:
            return
        if self.pool is None:
            self.pool = cf.ThreadPoolExecutor(max_workers=int(os.environ.get("LF_PARITY_JOBS", "2")))
            self.lf_pool = cf.ThreadPoolExecutor(max_workers=1)
        for case in todo:  # fixtures and files are made here, in the main thread
            data, tok = self._data(case), self._tokenizer(case.tokenizer)
            out = self.tmp / "out"
            out.mkdir(exist_ok=True)
            self.futures[case.id] = (data, tok, self.pool.submit(run_ours, case, data, tok, out),
                                     self.lf_pool.submit(run_lf, case, data, tok, self.worker))

    def get(self, case: Case) -> tuple[Path, Path, dict, dict]:
        self.start([case])
        data, tok, ours, lf = self.futures[case.id]
        return data, tok, ours.result(), lf.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.lf_pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="session")
def runner(request, cli_ready, lf_worker, tmp_path_factory):
    r = Runner(request, tmp_path_factory.mktemp("lf_parity"), lf_worker)
    # Start every case that the session will ask for, so that they overlap.
    selected = [item.callspec.params["case"] for item in request.session.items
                if hasattr(item, "callspec") and isinstance(item.callspec.params.get("case"), Case)]
    r.start(selected)
    yield r
    r.close()


def describe_mismatch(tok_dir: Path, name: str, ours: list[int], theirs: list[int], labels_ours: list[int],
                      labels_theirs: list[int]) -> str:
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tok_dir)
    pos = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    lo, hi = max(0, pos - 12), pos + 12

    def show(ids, labels):  # trained tokens in «»
        return "".join(t.decode([i]) if l == IGNORE else f"«{t.decode([i])}»"
                       for i, l in zip(ids[lo:hi], labels[lo:hi])).encode("unicode_escape").decode()

    return (f"{name}: first difference at position {pos} (ours len {len(ours)}, LF len {len(theirs)})\n"
            f"  ours[{lo}:{hi}] = {ours[lo:hi]} labels {labels_ours[lo:hi]}\n"
            f"  LF  [{lo}:{hi}] = {theirs[lo:hi]} labels {labels_theirs[lo:hi]}\n"
            f"  ours text: {show(ours, labels_ours)}\n  LF   text: {show(theirs, labels_theirs)}")


def check(runner: Runner, case: Case, expected_count: int | None = None) -> None:
    if case.shared and not SHARED_DATASETS.is_dir():
        pytest.skip(f"{SHARED_DATASETS} is absent: the shared demo datasets live beside the checkout")
    data, tok, ours, lf = runner.get(case)
    ctx = (f"[{case.id}: {data.name} {case.fmt}{' pairwise' if case.pairwise else ''} --prompt-type "
           f"{case.prompt_type} (LF {lfr.OUR_TO_LF_TEMPLATE[case.prompt_type]}) --enable-thinking {case.thinking} "
           f"--seq-length {case.seq_length}, {case.tokenizer} tokenizer]")
    assert "error" not in lf, f"{ctx} {lf['error']}"
    assert "error" not in ours, f"{ctx} {ours['error']}"
    theirs, mine = lf["samples"], ours["samples"]
    kept = [s["source_index"] for s in theirs]
    assert len(mine) == len(theirs), (
        f"{ctx} sample count: ours {len(mine)}, LF {len(theirs)} (LF kept input rows {kept} of {lf['n_input']})"
        f"\nour log:\n{ours['log'][-3000:]}")
    names = PAIR_KEYS if case.pairwise else SFT_KEYS
    problems = []
    for i, (o, t) in enumerate(zip(mine, theirs)):
        for ids_name, lab_name in zip(names[::2], names[1::2]):
            if o[ids_name] != t[ids_name] or o[lab_name] != t[lab_name]:
                which = ids_name if o[ids_name] != t[ids_name] else lab_name
                problems.append(
                    f"sample {i} (input row {t['source_index']}), {which}:\n"
                    + describe_mismatch(tok, which, o[which], t[which], o[lab_name], t[lab_name])
                    + f"\n  LF messages: {json.dumps(lf['aligned'][t['source_index']], ensure_ascii=False)[:500]}")
                break
    assert not problems, (f"{ctx}\n{len(problems)} of {len(mine)} samples differ from LLaMA-Factory "
                          f"{lfr.LF_VERSION} (first 6 shown):\n" + "\n\n".join(problems[:6]))
    if expected_count is not None:
        assert len(mine) == expected_count, f"{ctx} expected {expected_count} samples, got {len(mine)}"


def cases(*specs) -> list:
    marks = []
    for spec in specs:
        case = Case(*spec)
        marks.append(pytest.param(case, id=case.id, marks=[pytest.mark.shared_data] if case.shared else []))
    return marks


# ---------------------------------------------------------------------------------------------------------------
# Tests (each case = one run of our CLI, ~7 CPU-seconds, so the matrix is kept small)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", cases(("alpaca_mix", "qwen3", "false"), ("alpaca_mix", "qwen_lf", "true"),
                                       ("alpaca_mix", "qwen3", "true", BIG, "boundary")))
def test_alpaca_system_history_cot(runner, case):
    """Alpaca with system and history (CoT in answers and in history), plus the project's demo records."""
    check(runner, case, expected_count=len(ALPACA_RECORDS) + 30)


@pytest.mark.parametrize("case", cases(("sharegpt_mix", "qwen3", "true"), ("sharegpt_mix", "qwen3", "none"),
                                       ("sharegpt_mix", "qwen_lf", "none"),
                                       ("sharegpt_mix", "qwen3", "false", BIG, "boundary")))
def test_sharegpt_multiturn_tools_cot(runner, case):
    """Multi-turn ShareGPT: system column and leading system message, CoT, tools with function_call and
    observation turns (single and parallel calls), plus the project's demo conversations."""
    check(runner, case, expected_count=len(SHAREGPT_RECORDS) + 20)


@pytest.mark.parametrize("case", cases(("edge", "qwen3", "true", BIG, "boundary"), ("edge", "qwen3", "false")))
def test_edge_rows(runner, case):
    """EDGE_RECORDS: tools == "[]", CoT without newlines, invalid rows dropped (see the comments there)."""
    check(runner, case, expected_count=len(EDGE_RECORDS) - 2)


@pytest.mark.parametrize("case", cases(("dpo_sharegpt", "qwen3", "none"), ("dpo_sharegpt", "qwen3", "true"),
                                       ("dpo_alpaca", "qwen3", "none")))
def test_pairwise_hand(runner, case):
    """Pairwise: LF's encode_oneturn drops history CoT; the shared prompt is the one encoded with the *chosen*
    answer (with `none`/`false`, the empty think block goes into it iff chosen has no CoT)."""
    check(runner, case, expected_count=2)


@pytest.mark.parametrize("case", cases(("sharegpt_mix", "qwen3", "true", 40), ("dpo_sharegpt", "qwen3", "false", 30),
                                       ("alpaca_en50", "qwen_lf", "none", 128)))
def test_truncation_matches_lf_cutoff(runner, case):
    """LF cutoff_len = our --seq-length: LF's infer_seqlen budget turn by turn (pairwise: prompt vs the longer
    answer); samples are kept, never longer than cutoff_len."""
    check(runner, case)


@pytest.mark.parametrize("case", cases(("glaive50", "qwen3", "true")))
def test_glaive_toolcall(runner, case, shared_datasets):
    check(runner, case)


@pytest.mark.parametrize("case", cases(("dpo50", "qwen3", "none"), ("dpo50", "qwen_lf", "true")))
def test_dpo_en_demo(runner, case, shared_datasets):
    check(runner, case)
