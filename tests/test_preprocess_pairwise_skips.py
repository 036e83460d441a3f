"""preprocess_data.py with the pairwise handlers: pairs that cannot teach a preference (identical answers, an
empty rejected answer) are skipped, counted by reason in the summary, and not written."""
from __future__ import annotations

import json

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset
from transformers import AutoTokenizer

from tests.conftest import run_cli

ANSWERS = [("Paris.", "London."),          # kept
           ("Blue.", "Blue."),             # same answer twice
           ("Four.", ""),                  # empty rejected answer
           ("Seven.", "  \n"),             # blank rejected answer
           ("Cold.", "Hot.")]              # kept
KEPT = [0, 4]


def alpaca(n: int, chosen: str, rejected: str) -> dict:
    return {"instruction": f"Question {n}?", "input": "", "chosen": chosen, "rejected": rejected}


def sharegpt(n: int, chosen: str, rejected: str) -> dict:
    return {"conversations": [{"from": "human", "value": f"Question {n}?"}],
            "chosen": {"from": "gpt", "value": chosen}, "rejected": {"from": "gpt", "value": rejected}}


@pytest.mark.parametrize("handler, record", [("AlpacaStylePairwiseHandler", alpaca),
                                             ("SharegptStylePairwiseHandler", sharegpt)])
def test_pairs_without_a_preference_are_skipped_and_counted(tiny_qwen3, tmp_path, handler, record):
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps([record(n, c, r) for n, (c, r) in enumerate(ANSWERS)]))
    prefix = tmp_path / "out"
    proc = run_cli("preprocess_data.py", "--input", str(data), "--tokenizer-name-or-path", str(tiny_qwen3),
                   "--output-prefix", str(prefix), "--handler-name", handler, "--prompt-type", "qwen3")
    assert "read: 5, written: 2, truncated: 0, skipped: 3 (" in proc.stdout, proc.stdout
    assert "empty_rejected: 2" in proc.stdout and "chosen_equals_rejected: 1" in proc.stdout
    meta = json.loads((tmp_path / "out_preprocess.json").read_text())
    assert meta["summary"]["skipped"] == {"chosen_equals_rejected": 1, "empty_rejected": 2}
    assert meta["num_samples"] == 2

    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    chosen = IndexedDataset(f"{prefix}_packed_chosen_input_ids_document")
    rejected = IndexedDataset(f"{prefix}_packed_rejected_input_ids_document")
    assert len(chosen) == len(rejected) == len(KEPT)
    for row, n in enumerate(KEPT):
        messages = [{"role": "user", "content": f"Question {n}?"}]
        for column, answer in ((chosen, ANSWERS[n][0]), (rejected, ANSWERS[n][1])):
            want = tok.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False,
                                           enable_thinking=False)
            assert tok.decode(column[row].tolist()) == want
