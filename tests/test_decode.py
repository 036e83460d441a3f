"""The static-cache decode path: greedy tokens equal transformers.generate over 64 steps for prompts of different
lengths (fp32, CPU), per-step logits equal megatron's forward, device-side stopping equals the host loop, beam search
over the static cache equals beam search recomputing every prefix."""
from __future__ import annotations

import json

import torch

from tests.conftest import run_cli

MAX_NEW = 64


def _hf_greedy(hf_dir, prompts: list[list[int]]) -> list[list[int]]:
    """transformers' greedy generate, one prompt at a time (no padding), exactly MAX_NEW tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                               eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in prompts]


def test_decode_path_matches_transformers_and_megatron(tiny_qwen3, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_qwen3))
    texts = ["hi", "how are you today?", "The quick brown fox jumps over the lazy dog and then runs away"]
    prompts = [tok.encode(t, add_special_tokens=False) for t in texts]
    assert len({len(p) for p in prompts}) == 3
    (tmp_path / "spec.json").write_text(json.dumps({"prompts": prompts, "max_new_tokens": MAX_NEW,
                                                    "stop_sequence_len": 2}))
    run_cli("tests/decode_checks.py", str(tiny_qwen3), str(tmp_path / "spec.json"), str(tmp_path / "out.json"))
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["greedy"] == _hf_greedy(tiny_qwen3, prompts)
    assert got["steps"] == max(map(len, prompts)) + MAX_NEW - min(map(len, prompts))
    assert got["max_logit_diff"] <= 1e-5, got["max_logit_diff"]
    stop = got["stop"]
    assert stop["fast"] == stop["ref"] and stop["fast_stopped"] == stop["ref_stopped"]
    assert stop["fast_stopped"][0] and stop["fast_stopped"][1]      # the sequence and the id both stop rows
    assert got["stream_equal"]
    assert got["beam"]["fast"] == got["beam"]["recomputed"] and len(got["beam"]["fast"]) > 0
