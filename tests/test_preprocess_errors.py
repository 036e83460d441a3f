"""Bad input: one clear line on stderr, non-zero exit, and no output that looks complete."""
import json
import os

import pytest

from mindspeed_llm.data.loaders import iter_records
from tests.conftest import run_cli


def run(tiny_qwen3, tmp_path, input_, *extra, handler="AlpacaStyleInstructionHandler", prompt="qwen3"):
    args = ["preprocess_data.py", "--input", str(input_), "--tokenizer-name-or-path", str(tiny_qwen3),
            "--output-prefix", str(tmp_path / "out" / "data"), "--handler-name", handler, *extra]
    if prompt:
        args += ["--prompt-type", prompt]
    proc = run_cli(*args, check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    out = tmp_path / "out"
    leftovers = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert leftovers == [], leftovers
    return lines[0]


@pytest.fixture
def alpaca(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"instruction": "hi", "input": "", "output": "yo"}) + "\n")
    return path


def test_missing_column_names_it_and_suggests_map_keys(tiny_qwen3, tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "hi", "answer": "yo"}) + "\n")
    line = run(tiny_qwen3, tmp_path, path)
    assert "'instruction'" in line and "question, answer" in line and "--map-keys" in line and str(path) in line


def test_malformed_json_names_file_and_line(tiny_qwen3, tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"instruction": "hi", "input": "", "output": "yo"})
    path.write_text("\n".join([good] * 300 + ['{"instruction": "oops",'] + [good]) + "\n")
    line = run(tiny_qwen3, tmp_path, path)
    assert f"{path}:301: malformed JSON" in line


def test_malformed_json_array_names_the_line(tiny_qwen3, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": "c" "output": "d"}\n]\n')
    line = run(tiny_qwen3, tmp_path, path)
    assert f"{path}:3: malformed JSON" in line


def test_unknown_handler_lists_valid_ones(tiny_qwen3, tmp_path, alpaca):
    line = run(tiny_qwen3, tmp_path, alpaca, handler="AlpacaStyleHandler")
    assert "--handler-name 'AlpacaStyleHandler' is unknown" in line and "SharegptStyleInstructionHandler" in line


def test_unknown_prompt_type_lists_valid_ones(tiny_qwen3, tmp_path, alpaca):
    line = run(tiny_qwen3, tmp_path, alpaca, prompt="qwen4")
    assert "--prompt-type 'qwen4'" in line and "qwen3" in line and "qwen_lf" in line


def test_bad_enable_thinking_value(tiny_qwen3, tmp_path, alpaca):
    line = run(tiny_qwen3, tmp_path, alpaca, "--enable-thinking", "maybe")
    assert "--enable-thinking" in line and "true, false, none" in line


def test_empty_input(tiny_qwen3, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    line = run(tiny_qwen3, tmp_path, path)
    assert str(path) in line and "no record" in line


def test_missing_input_and_tokenizer(tiny_qwen3, tmp_path, alpaca):
    assert "no such file or directory" in run(tiny_qwen3, tmp_path, tmp_path / "nope.jsonl")
    line = run(tmp_path / "no_tokenizer", tmp_path, alpaca)
    assert "--tokenizer-name-or-path" in line and "no such directory" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only directories")
def test_unwritable_output(tiny_qwen3, tmp_path, alpaca):
    locked = tmp_path / "out"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        line = run(tiny_qwen3, tmp_path, alpaca)
        assert "not writable" in line
    finally:
        locked.chmod(0o700)


def test_output_under_a_file_is_refused(tiny_qwen3, tmp_path, alpaca):
    (tmp_path / "out").mkdir()
    blocker = tmp_path / "out" / "file"
    blocker.write_text("")
    proc = run_cli("preprocess_data.py", "--input", str(alpaca), "--tokenizer-name-or-path", str(tiny_qwen3),
                   "--output-prefix", str(blocker / "data"), "--handler-name", "AlpacaStyleInstructionHandler",
                   "--prompt-type", "qwen3", check=False)
    assert proc.returncode != 0 and "--output-prefix" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["file"]


def test_every_row_invalid_writes_nothing(tiny_qwen3, tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"conversations": [{"from": "gpt", "value": "x"}]}) + "\n")
    line = run(tiny_qwen3, tmp_path, path, handler="SharegptStyleInstructionHandler")
    assert "no sample could be written" in line and "bad_role_order" in line


def test_neat_pack_needs_pack(tiny_qwen3, tmp_path, alpaca):
    assert "--neat-pack requires --pack" in run(tiny_qwen3, tmp_path, alpaca, "--neat-pack")


def test_json_array_reader_across_chunk_boundaries(tmp_path, monkeypatch):
    """A JSON array is decoded incrementally; records that straddle read chunks come out whole."""
    import mindspeed_llm.data.loaders as loaders

    rows = [{"i": i, "text": "x" * (i % 37), "nested": {"a": [i, "]"]}} for i in range(200)]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(rows, indent=1))
    monkeypatch.setattr(loaders, "_CHUNK", 64)
    assert list(iter_records([path])) == rows


def test_parallel_encoding_reads_input_only_a_window_ahead():
    """With --workers > 1 the reader stays a few chunks ahead of the writer, so memory does not grow with input."""
    import multiprocessing as mp

    import mindspeed_llm.data.preprocess as pre

    consumed = []

    def chunks():
        for i in range(50):
            consumed.append(i)
            yield []

    with mp.get_context("fork").Pool(2) as pool:
        results = pre._bounded_imap(pool, chunks(), window=4)
        next(results)
        assert len(consumed) <= 5
        assert sum(1 for _ in results) == 49
