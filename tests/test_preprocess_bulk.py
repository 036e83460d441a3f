"""Preprocessing's fast paths give what the plain ones give: chunked reading, the encoder's Rust calls, bulk writes,
and the CLI's files byte for byte against samples encoded with the tokenizer's standard `encode` and written one by
one with megatron-core's IndexedDatasetBuilder."""
import json
import random

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mindspeed_llm.data.encode import EncodeOptions, encode_record
from mindspeed_llm.data.handlers import Skip, build_handler
from mindspeed_llm.data.loaders import chunk_records, iter_record_chunks, iter_records
from mindspeed_llm.data.prompt_type import get_template
from mindspeed_llm.data.templates import _LLAMA3_SPLIT, _WordEncoder, _TextEncoder, encode_text
from mindspeed_llm.data.writer import IndexedWriter
from mindspeed_llm.errors import UserError
from mindspeed_llm.tokenizer import build_tokenizer
from tests.conftest import run_cli

FIELDS = ("input_ids", "attention_mask", "labels")
# NFC changes the decomposed accent; NFC keeps the ligature (NFKC would not); special tokens and a thought inside
# the text; CJK, emoji.
TRICKY = ["Cafe\u0301 cre\u0300me", "\ufb01sh and chips", "say <|im_end|> and <think>\nhmm\n</think>\n\nthen",
          "\u4f60\u597d\uff0c\u4e16\u754c", "ok \U0001f600!", "  leading spaces\n\nand\ttabs  "]


class StandardEncode:
    """The tokenizer without its Rust backend in sight, so `encode_text` falls back to `tokenizer.encode`."""

    def __init__(self, tokenizer):
        self._wrapped = tokenizer

    def __getattr__(self, name: str):
        if name == "_tokenizer":
            raise AttributeError(name)
        return getattr(self._wrapped, name)

    def __len__(self) -> int:
        return len(self._wrapped)


def alpaca_records(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        text = TRICKY[i % len(TRICKY)]
        row = {"instruction": f"Task {i}: {text}", "input": text if i % 3 == 0 else "",
               "output": f"<think>\nplan {i}\n</think>\n\nAnswer {i} " + text * (1 + i % 7)}
        if i % 50 == 7:
            row["instruction"] = row["input"] = ""  # skipped: empty prompt
        rows.append(row)
    return rows


def test_encode_text_gives_the_standard_ids(tiny_qwen3):
    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    assert isinstance(tok._tokenizer.normalizer, normalizers.NFC)
    assert _TextEncoder(tok).ascii_backend is not None  # ASCII text takes the path without the normalizer
    texts = TRICKY + ["plain ascii <|im_start|>user\nhi<|im_end|>\n", "x" * 2000, "\n\n", " "]
    for text in texts:
        assert encode_text(tok, text) == tok.encode(text, add_special_tokens=False), text


def test_encode_text_keeps_a_normalizer_that_changes_ascii():
    """Lowercasing is not a no-op on ASCII, so no text may skip it."""
    backend = Tokenizer(models.WordLevel({"hello": 0, "[UNK]": 1}, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    assert _TextEncoder(tok).ascii_backend is None
    assert encode_text(tok, "HELLO Hello") == tok.encode("HELLO Hello", add_special_tokens=False) == [0, 0]


def split_texts(n: int, seed: int = 0) -> list[str]:
    """Random text heavy in what the split decides on: every ASCII character, whitespace runs, contractions in
    any case, digits, added tokens whole, cut or back to back, and non-ASCII letters, digits, spaces and
    punctuation, among them some that NFC changes and some that case-fold into a contraction."""
    atoms = ([chr(i) for i in range(128)] + list(" \t\n\r\x0b\x0c") * 6
             + ["'s", "'S", "'re", "'RE", "'Ll", "'d", "'x", "''"] * 3
             + ["hello", "World", "x", "12345", "  ", "\n\n", "\r\n", " \n ", "<|im_end|>", "<think>", "</think>",
                "<|im_start|>", "<|endoftext|>", "<|im", "_end|>", "...", " -"] * 4
             + list("\u2019\u00b0\u201d\u00e9\u2013\u00b2\u2082\u00a0\u2028\u0085\u017f\u212a\u00df\ufb06\u0663"
                    "\u4f60\U0001f600\u0301\u3000") + ["e\u0301", "A\u030a", "\u017ft", "\ufb05"])
    rng = random.Random(seed)
    return ["".join(rng.choice(atoms) for _ in range(rng.randint(0, 30))) for _ in range(n)]


def variant(tok, **changes) -> Tokenizer:
    """The tokenizer's Rust backend with parts of its JSON replaced."""
    spec = json.loads(tok._tokenizer.to_str())
    spec.update(changes)
    if "normalized_tags" in spec:  # the added tokens that are not special are matched after normalization
        del spec["normalized_tags"]
        for token in spec["added_tokens"]:
            token["normalized"] = not token["special"]
    return Tokenizer.from_str(json.dumps(spec))


def test_words_give_the_standard_ids(tiny_qwen3, tiny_model_factory):
    """Qwen's split (the tiny Qwen3 tokenizer's), Llama 3's, GPT-2's (ByteLevel with its own regex) and added
    tokens matched after normalization: the word encoder's ids are the backend's, also when its cache overflows,
    and it encodes most text with some non-ASCII characters itself."""
    qwen = AutoTokenizer.from_pretrained(tiny_qwen3)
    llama = AutoTokenizer.from_pretrained(tiny_model_factory("llama3"))
    assert json.loads(llama._tokenizer.pre_tokenizer.__getstate__())["use_regex"] is True
    split = json.loads(qwen._tokenizer.to_str())["pre_tokenizer"]
    split["pretokenizers"][0]["pattern"]["Regex"] = _LLAMA3_SPLIT
    backends = [qwen._tokenizer, llama._tokenizer, variant(qwen, pre_tokenizer=split),
                variant(qwen, normalized_tags=True)]
    texts = split_texts(3000) + ["", " ", "don't", "I'LL", "a  b\n\n  c   ", "x" * 600,
                                 "Caf\u00e9 \u2019ok\u2019 at 10\u00b0C, in plain words"]
    for backend in backends:
        for max_words in (1_000_000, 5):
            words = _WordEncoder.build(backend)
            words.max_words = max_words
            encoded = 0
            for text in texts:
                ids = words.encode(text)  # None: left to the Rust pipeline
                if ids is not None:
                    assert ids == backend.encode(text, add_special_tokens=False).ids, repr(text)
                    encoded += not text.isascii()
            assert encoded > 1000
            assert words.encode(texts[-1]) is not None
            assert len(words.cache) <= max(max_words, *(len(words.split.findall(t)) for t in texts))


def test_encode_text_uses_the_words(tiny_qwen3):
    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    encoder = _TextEncoder(tok)
    assert encoder.words is not None
    text = "Plain text, caf\u00e9, " * 50 + "<|im_end|>\n"  # over the length whose ids the text cache keeps
    assert encoder.encode(tok, text) == encode_text(tok, text) == tok.encode(text, add_special_tokens=False)
    assert encoder.words.cache  # the words went through it


@pytest.mark.parametrize("pre_tokenizer", [pre_tokenizers.Whitespace(),
                                           pre_tokenizers.ByteLevel(add_prefix_space=True),
                                           pre_tokenizers.Sequence([pre_tokenizers.Split("x", "isolated"),
                                                                    pre_tokenizers.ByteLevel(use_regex=False)])])
def test_no_words_for_another_split(tiny_qwen3, pre_tokenizer):
    backend = AutoTokenizer.from_pretrained(tiny_qwen3)._tokenizer
    assert _WordEncoder.build(backend) is not None
    backend.pre_tokenizer = pre_tokenizer
    assert _WordEncoder.build(backend) is None


def test_add_many_writes_what_add_writes(tmp_path):
    rng = np.random.default_rng(0)
    samples = [{f: rng.integers(-100, 1000, size=rng.integers(1, 50)).astype(np.int32) for f in ("a", "b")}
               for _ in range(40)]
    one_by_one = IndexedWriter({f: str(tmp_path / f"one_{f}") for f in ("a", "b")})
    for sample in samples:
        one_by_one.add(sample)
    one_by_one.finalize()
    one_by_one.commit()
    bulk = IndexedWriter({f: str(tmp_path / f"bulk_{f}") for f in ("a", "b")})
    for part in (samples[:15], samples[15:16], samples[16:]):
        bulk.add_many({f: np.concatenate([s[f] for s in part]) for f in ("a", "b")},
                      {f: np.array([len(s[f]) for s in part]) for f in ("a", "b")})
    bulk.finalize()
    bulk.commit()
    assert bulk.count == one_by_one.count == 40
    for f in ("a", "b"):
        for ext in (".bin", ".idx"):
            assert (tmp_path / f"bulk_{f}{ext}").read_bytes() == (tmp_path / f"one_{f}{ext}").read_bytes()


def test_record_chunks_hold_the_records_in_order(tmp_path):
    rows = alpaca_records(23)
    lines = tmp_path / "a.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in rows[:10]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[10:]))
    array = tmp_path / "b.json"
    array.write_text(json.dumps(rows))
    files = [lines, array]
    chunks = list(iter_record_chunks(files, 4))
    assert [r for c in chunks for r in chunk_records(c)] == list(iter_records(files))
    assert max(len(chunk_records(c)) for c in chunks) == 4


def test_json_lines_decode_as_json_does(tmp_path):
    """Integers beyond 64 bits (which orjson would turn into floats, also with fewer than 20 digits), floats,
    nesting: the records are what `json` makes of the lines."""
    lines = ['{"a": 123456789012345678901234, "b": "x"}', '{"a": -9223372036854775809}',
             '{"a": 18446744073709551615, "f": 0.1}', '{"m": [{"v": 2.5e-3}, {"v": [1, 99999999999999999999]}]}',
             '{"s": "12345678901234567890123"}']
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(lines) + "\n")
    records = list(iter_records([path]))
    assert records == [json.loads(line) for line in lines]
    assert [type(r.get("a")) for r in records] == [int, int, int, type(None), type(None)]


def test_a_malformed_line_in_a_later_chunk_is_named(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in alpaca_records(9)) + '{"instruction": "x",\n')
    with pytest.raises(UserError, match=rf"^{path}:10: malformed JSON"):
        for chunk in iter_record_chunks([path], 4):
            chunk_records(chunk)


def reference_files(tokenizer_dir, files, prefix, seq_length: int) -> None:
    """The samples encoded with the tokenizer's standard `encode`, written one by one."""
    template = get_template("qwen3", enable_thinking=False)
    tokenizer = StandardEncode(build_tokenizer(str(tokenizer_dir), True, template, "PretrainedFromHF", seq_length))
    spec = build_handler("AlpacaStyleInstructionHandler", {})
    builders = {f: IndexedDatasetBuilder(f"{prefix}_{f}.bin", dtype=np.int32) for f in FIELDS}
    for record in iter_records(files):
        try:
            sample = encode_record(record, spec, template, tokenizer, EncodeOptions(seq_length), list(FIELDS))
        except Skip:
            continue
        for f in FIELDS:
            builders[f].add_document(sample.fields[f], [len(sample.fields[f])])
    for f in FIELDS:
        builders[f].finalize(f"{prefix}_{f}.idx")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_cli_output_equals_samples_written_one_by_one(tiny_qwen3, tmp_path, workers):
    rows = alpaca_records(700)  # a few chunks of work, truncation (--seq-length 96), skipped rows
    lines, array = tmp_path / "a.jsonl", tmp_path / "b.json"
    lines.write_text("".join(json.dumps(r, ensure_ascii=i % 2 == 0) + "\n" for i, r in enumerate(rows[:450])))
    array.write_text(json.dumps(rows[450:], ensure_ascii=False))
    run_cli("preprocess_data.py", "--input", f"{lines},{array}", "--tokenizer-name-or-path", str(tiny_qwen3),
            "--output-prefix", str(tmp_path / "cli"), "--handler-name", "AlpacaStyleInstructionHandler",
            "--prompt-type", "qwen3", "--enable-thinking", "false", "--seq-length", "96", "--workers", workers)
    reference_files(tiny_qwen3, [lines, array], tmp_path / "ref", 96)
    for f in FIELDS:
        for ext in (".bin", ".idx"):
            cli = (tmp_path / f"cli_packed_{f}_document{ext}").read_bytes()
            assert cli == (tmp_path / f"ref_{f}{ext}").read_bytes(), f + ext
    meta = json.loads((tmp_path / "cli_preprocess.json").read_text())
    assert meta["summary"]["skipped"] == {"empty_prompt": 14} and meta["summary"]["truncated"] > 0
