"""preprocess_data.py through its CLI, output read back with megatron-core's IndexedDataset."""
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset
from transformers import AutoTokenizer

from mindspeed_llm.data.templates import IGNORE_INDEX
from mindspeed_llm.demo_data import write_demo_data
from tests.conftest import run_cli

FIELDS = ("input_ids", "attention_mask", "labels")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_data(tmp_path_factory.mktemp("demo"), n_train=300, n_test=20)


@pytest.fixture(scope="module")
def tok(tiny_qwen3):
    return AutoTokenizer.from_pretrained(tiny_qwen3)


def _argv(tokenizer_dir, input_, prefix, handler: str, extra) -> list[str]:
    argv = ["--input", str(input_), "--tokenizer-name-or-path", str(tokenizer_dir), "--output-prefix", str(prefix),
            "--handler-name", handler, *extra]
    if handler != "GeneralPretrainHandler" and "--prompt-type" not in extra:
        argv += ["--prompt-type", "qwen3"]
    return argv


def preprocess(tokenizer_dir, input_, prefix, handler="AlpacaStyleInstructionHandler", *extra, check=True):
    return run_cli("preprocess_data.py", *_argv(tokenizer_dir, input_, prefix, handler, extra), check=check)


def preprocess_here(tokenizer_dir, input_, prefix, handler="AlpacaStyleInstructionHandler", *extra) -> None:
    """What preprocess_data.py runs, in this process (no interpreter start per call)."""
    from mindspeed_llm.arguments import parse_preprocess_args
    from mindspeed_llm.data.preprocess import run

    run(parse_preprocess_args(_argv(tokenizer_dir, input_, prefix, handler, extra)))


def read(prefix, fields=FIELDS):
    return {f: IndexedDataset(f"{prefix}_packed_{f}_document") for f in fields}


def test_idx_file_follows_the_megatron_format(tiny_qwen3, demo, tmp_path):
    prefix = tmp_path / "alpaca"
    preprocess(tiny_qwen3, demo["alpaca_train"], prefix, "AlpacaStyleInstructionHandler", "--seq-length", "256")
    raw = (tmp_path / "alpaca_packed_input_ids_document.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, dtype_code, n_seq, n_doc = struct.unpack("<QBQQ", raw[9:34])
    assert (version, dtype_code, n_seq, n_doc) == (1, 4, 300, 301)  # int32; one document per sample
    lengths = np.frombuffer(raw, np.int32, n_seq, 34)
    pointers = np.frombuffer(raw, np.int64, n_seq, 34 + 4 * n_seq)
    docs = np.frombuffer(raw, np.int64, n_doc, 34 + 12 * n_seq)
    assert list(docs) == list(range(301))
    assert pointers[0] == 0 and list(np.diff(pointers)) == list(lengths[:-1] * 4)
    bin_size = (tmp_path / "alpaca_packed_input_ids_document.bin").stat().st_size
    assert bin_size == 4 * lengths.sum()
    assert not list(tmp_path.glob("*tmp*"))
    meta = json.loads((tmp_path / "alpaca_preprocess.json").read_text())
    assert meta["prompt_type"] == "qwen3" and meta["seq_length"] == 256 and meta["num_samples"] == 300


def test_alpaca_demo_matches_chat_template(tiny_qwen3, demo, tok, tmp_path):
    prefix = tmp_path / "alpaca"
    preprocess(tiny_qwen3, demo["alpaca_train"], prefix, "AlpacaStyleInstructionHandler",
               "--enable-thinking", "false", "--map-keys", '{"system": "system"}')
    data = read(prefix)
    records = [json.loads(line) for line in Path(demo["alpaca_train"]).read_text().splitlines()]
    assert len(data["input_ids"]) == len(records)
    for i in range(0, len(records), 37):
        r = records[i]
        messages = [{"role": "system", "content": r["system"]},
                    {"role": "user", "content": r["instruction"] + "\n" + r["input"]}]
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        answer = r["output"] + "<|im_end|>\n"
        ids, labels, mask = (data[f][i].tolist() for f in ("input_ids", "labels", "attention_mask"))
        assert tok.decode(ids) == prompt + answer
        n_prompt = sum(1 for x in labels if x == IGNORE_INDEX)
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
        assert tok.decode(ids[:n_prompt]) == prompt and tok.decode(labels[n_prompt:]) == answer
        assert mask == [1] * len(ids)


def test_sharegpt_multiturn_trains_every_answer(tiny_qwen3, demo, tok, tmp_path):
    prefix = tmp_path / "sg"
    preprocess(tiny_qwen3, demo["sharegpt_train"], prefix, "SharegptStyleInstructionHandler",
               "--enable-thinking", "true")
    data = read(prefix)
    records = [json.loads(line) for line in Path(demo["sharegpt_train"]).read_text().splitlines()]
    for i in (0, 1, len(records) - 1):
        answers = [t["value"] for t in records[i]["conversations"][1::2]]
        labels = data["labels"][i].tolist()
        spans, cur = [], []
        for x in labels + [IGNORE_INDEX]:
            if x != IGNORE_INDEX:
                cur.append(x)
            elif cur:
                spans.append(tok.decode(cur))
                cur = []
        assert spans == [f"<think>\n\n</think>\n\n{a}<|im_end|>\n" for a in answers]
        assert tok.decode(data["input_ids"][i]).startswith(f"<|im_start|>system\n{records[i]['system']}<|im_end|>")


def test_pack_and_neat_pack(tiny_qwen3, demo, tok, tmp_path):
    plain = tmp_path / "plain"
    preprocess(tiny_qwen3, demo["alpaca_train"], plain, "AlpacaStyleInstructionHandler", "--seq-length", "512")
    unpacked = read(plain)
    lengths = sorted(len(unpacked["input_ids"][i]) for i in range(len(unpacked["input_ids"])))
    for neat in (False, True):
        prefix = tmp_path / f"packed{int(neat)}"
        preprocess(tiny_qwen3, demo["alpaca_train"], prefix, "AlpacaStyleInstructionHandler", "--seq-length", "512",
                   "--pack", *(["--neat-pack"] if neat else []))
        data = read(prefix)
        rows = len(data["input_ids"])
        assert rows < len(unpacked["input_ids"]) / 3
        seg_lengths = []
        for r in range(rows):
            ids, labels, mask = (data[f][r] for f in ("input_ids", "labels", "attention_mask"))
            assert len(ids) == len(labels) == len(mask) == 512
            assert ids[-1] == tok.pad_token_id and labels[-1] == IGNORE_INDEX
            if neat:
                segs = mask[mask > 0]
                assert list(np.unique(segs)) == list(range(1, segs.max() + 1))
                seg_lengths += [int((mask == s).sum()) for s in range(1, segs.max() + 1)]
                assert (ids[mask == 0] == tok.pad_token_id).all()
            else:
                assert (mask == 1).all()
        if neat:
            assert sorted(seg_lengths) == lengths  # every sample lands in exactly one row, unchanged


def test_workers_give_identical_output(tiny_qwen3, demo, tmp_path):
    outputs = []
    for workers in ("1", "2"):
        prefix = tmp_path / f"w{workers}"
        preprocess(tiny_qwen3, demo["sharegpt_train"], prefix, "SharegptStyleInstructionHandler",
                   "--workers", workers, "--log-interval", "50")
        outputs.append([(tmp_path / f"w{workers}_packed_{f}_document.{e}").read_bytes()
                        for f in FIELDS for e in ("bin", "idx")])
    assert outputs[0] == outputs[1]


def test_input_formats_dir_glob_and_list(tiny_qwen3, demo, tmp_path):
    """The same records as jsonl, json array, csv, parquet and arrow give identical output."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in Path(demo["alpaca_test"]).read_text().splitlines()]
    table = pa.Table.from_pylist(rows)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.json").write_text(json.dumps(rows, indent=2))
    pcsv.write_csv(table, src / "a.csv")
    pq.write_table(table, src / "a.parquet")
    with pa.ipc.new_stream(src / "a.arrow", table.schema) as w:
        w.write_table(table)
    ref = None
    for name in ("a.json", "a.csv", "a.parquet", "a.arrow"):
        prefix = tmp_path / name.replace(".", "_")
        preprocess_here(tiny_qwen3, src / name, prefix)
        got = [(tmp_path / f"{prefix.name}_packed_{f}_document.bin").read_bytes() for f in FIELDS]
        ref = ref or got
        assert got == ref, name
    # a comma list and a glob read the files in order
    preprocess_here(tiny_qwen3, f"{src / 'a.json'},{src / 'a.parquet'}", tmp_path / "two")
    assert len(read(tmp_path / "two")["input_ids"]) == 2 * len(rows)
    preprocess(tiny_qwen3, str(src / "a.*"), tmp_path / "glob")        # the command line, once
    assert len(read(tmp_path / "glob")["input_ids"]) == 4 * len(rows)


def test_pretrain_text(tiny_qwen3, tok, tmp_path):
    lines = ["first line of text", "second one, a bit longer than the first"]
    (tmp_path / "t.txt").write_text("\n".join(lines) + "\n")
    preprocess(tiny_qwen3, tmp_path / "t.txt", tmp_path / "pt", "GeneralPretrainHandler", "--append-eod")
    ds = IndexedDataset(str(tmp_path / "pt_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == [tok(s)["input_ids"] + [tok.eos_token_id] for s in lines]


def test_invalid_rows_are_skipped_and_counted(tiny_qwen3, tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
            {"conversations": [{"from": "gpt", "value": "wrong order"}, {"from": "human", "value": "x"}]},
            {"conversations": [{"from": "human", "value": "no answer"}]},
            {"conversations": []}]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    proc = preprocess(tiny_qwen3, path, tmp_path / "out", "SharegptStyleInstructionHandler")
    assert "read: 4, written: 1, truncated: 0, skipped: 3" in proc.stdout
    assert "bad_role_order: 1" in proc.stdout and "odd_message_count: 1" in proc.stdout
    assert len(read(tmp_path / "out")["input_ids"]) == 1


def test_openai_messages_are_recognised(tiny_qwen3, tok, tmp_path):
    row = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                        {"role": "assistant", "content": "A"}]}
    (tmp_path / "m.jsonl").write_text(json.dumps(row) + "\n")
    preprocess(tiny_qwen3, tmp_path / "m.jsonl", tmp_path / "o", "SharegptStyleInstructionHandler",
               "--enable-thinking", "false")
    data = read(tmp_path / "o")  # keep the datasets alive: items are views into their memory maps
    ids = data["input_ids"][0].tolist()
    assert tok.decode(ids) == tok.apply_chat_template(row["messages"], tokenize=False, enable_thinking=False)


# ---- the shared public demo datasets ---------------------------------------------------------------------
@pytest.mark.shared_data
def test_shared_alpaca_parquet_equals_json(tiny_qwen3, shared_datasets, tmp_path):
    for ext in ("parquet", "json"):
        preprocess(tiny_qwen3, shared_datasets / f"alpaca_en_demo.{ext}", tmp_path / ext,
                   "AlpacaStyleInstructionHandler", "--seq-length", "1024", "--workers", "2")
    for f in FIELDS:
        assert (tmp_path / f"parquet_packed_{f}_document.bin").read_bytes() == \
            (tmp_path / f"json_packed_{f}_document.bin").read_bytes()
    meta = json.loads((tmp_path / "json_preprocess.json").read_text())
    assert meta["summary"]["written"] == 999 and meta["summary"]["truncated"] > 0
    ds = IndexedDataset(str(tmp_path / "json_packed_input_ids_document"))
    assert ds.sequence_lengths.max() <= 1024


@pytest.mark.shared_data
def test_shared_glaive_tool_calls(tiny_qwen3, shared_datasets, tok, tmp_path):
    preprocess(tiny_qwen3, shared_datasets / "glaive_toolcall_en_demo.json", tmp_path / "g",
               "SharegptStyleInstructionHandler", "--map-keys", '{"tools": "tools"}')
    data = read(tmp_path / "g")
    records = json.loads((shared_datasets / "glaive_toolcall_en_demo.json").read_text())
    assert len(data["input_ids"]) == len(records)
    text = tok.decode(data["input_ids"][0])
    assert "# Tools" in text and '"name": "search_recipes"' in text
    trained = tok.decode([t for t in data["labels"][0].tolist() if t != IGNORE_INDEX])
    call = json.loads(records[0]["conversations"][3]["value"])
    assert f"<tool_call>\n{json.dumps(call, ensure_ascii=False)}\n</tool_call><|im_end|>\n" in trained
    assert "<tool_response>" not in trained


@pytest.mark.shared_data
def test_shared_dpo_pairs(tiny_qwen3, shared_datasets, tok, tmp_path):
    preprocess(tiny_qwen3, shared_datasets / "dpo_en_demo.json", tmp_path / "d", "SharegptStylePairwiseHandler")
    fields = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
    data = read(tmp_path / "d", fields)
    records = json.loads((shared_datasets / "dpo_en_demo.json").read_text())
    assert all(len(data[f]) == len(records) for f in fields)
    r = records[5]
    for side in ("chosen", "rejected"):
        trained = tok.decode([t for t in data[f"{side}_labels"][5].tolist() if t != IGNORE_INDEX])
        assert trained == r[side]["value"] + "<|im_end|>\n"


@pytest.mark.shared_data
def test_shared_plain_text(tiny_qwen3, shared_datasets, tok, tmp_path):
    preprocess(tiny_qwen3, shared_datasets / "c4_demo.jsonl", tmp_path / "c4", "GeneralPretrainHandler",
               "--workers", "2")
    ds = IndexedDataset(str(tmp_path / "c4_text_document"))
    first = json.loads((shared_datasets / "c4_demo.jsonl").open().readline())["text"]
    assert ds[0].tolist() == tok(first)["input_ids"]
