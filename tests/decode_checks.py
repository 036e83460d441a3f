"""Checks of the generation forward path (`DecodeStage`) in one process (a world of one); writes what it measured as JSON.

Usage: python tests/decode_checks.py HF_DIR SPEC.json OUT.json
SPEC.json: {"prompts": [[ids], ...], "max_new_tokens": N, "stop_sequence_len": L}
OUT.json: {"greedy": rows, "max_logit_diff": float, "steps": int, "stop": {...}, "stream_equal": bool}
Run in its own process because the CPU adaptation patches megatron-core for the whole process.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load_model(hf_dir: str):
    """Our GPTModel built from the tiny Hugging Face model's weights (fp32)."""
    import torch
    from safetensors.torch import load_file

    from mindspeed_llm.checkpoint.mapping import chunk_state_dict
    from mindspeed_llm.models import build_model, get_family
    from mindspeed_llm.models.family import DictSource

    hf_cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    fam = get_family(hf_cfg["model_type"])
    cfg = fam.config(hf_cfg)
    tensors = {}
    for shard in sorted(Path(hf_dir).glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    model = build_model(cfg, params_dtype=torch.float32, parallel_output=False)[0]
    sd = chunk_state_dict(fam, cfg, DictSource(tensors), 0, 1, range(cfg.num_layers), first=True, last=True)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")] and not unexpected, (missing, unexpected)
    return model


def megatron_last_logits(model, tokens):
    """megatron-core's own GPTModel forward (no cache) over tokens [b, s]: the last position's logits [b, V]."""
    import torch

    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None)[:, -1].float()


def main(hf_dir: str, spec_file: str, out_file: str) -> None:
    import torch

    from mindspeed_llm.inference.beam import beam_search
    from mindspeed_llm.inference.comm import ReplicaBroadcast
    from mindspeed_llm.inference.decode import DecodeStage
    from mindspeed_llm.inference.generation import StopCriteria, generate
    from mindspeed_llm.inference.sampling import SamplingParams
    from mindspeed_llm.platform import init_distributed

    init_distributed(1, 1, backend="gloo")
    spec = json.loads(Path(spec_file).read_text())
    prompts, max_new = spec["prompts"], spec["max_new_tokens"]
    model = load_model(hf_dir)
    stage = DecodeStage(model)
    never = StopCriteria(frozenset())
    kwargs = dict(max_new_tokens=max_new, params=SamplingParams(), pad_id=0, broadcast=lambda t: t)
    greedy = generate(stage, prompts, stop=never, use_cache=True, **kwargs).outputs

    # per-step logits of the decode path against megatron's full forward (no cache) over the same tokens
    lengths = [len(p) for p in prompts]
    total = max(lengths) + max_new
    tokens = torch.zeros(len(prompts), total, dtype=torch.long)
    for row, (p, out) in enumerate(zip(prompts, greedy)):
        seq = (p + out)[:total]
        tokens[row, :len(seq)] = torch.tensor(seq)
    cache = stage.new_cache(len(prompts), total)
    worst, steps = 0.0, 0
    for t in range(min(lengths), total):
        fast = stage(tokens[:, cache.offset:t], cache)
        ref = megatron_last_logits(model, tokens[:, :t])
        worst = max(worst, float((fast - ref).abs().max()))
        steps += 1

    # stopping on ids and on a multi-token sequence: the same rows with the cache and recomputing every prefix; streaming
    length = spec["stop_sequence_len"]
    seq_stop = StopCriteria(frozenset({greedy[1][5]}), (tuple(greedy[0][3:3 + length]),))
    fast_stop = generate(stage, prompts, stop=seq_stop, use_cache=True, **kwargs)
    ref_stop = generate(stage, prompts, stop=seq_stop, use_cache=False, **kwargs)
    streamed: dict[int, list[int]] = {}

    def on_step(t, outputs):
        for row, out in enumerate(outputs):
            streamed[row] = list(out)

    generate(stage, prompts, stop=seq_stop, use_cache=True, on_step=on_step, **kwargs)

    # beam search with the static cache (reordered per step) against beam search recomputing every prefix
    beam = {}
    for name, use_cache in (("fast", True), ("recomputed", False)):
        beam[name] = beam_search(stage, prompts[2], num_beams=3, max_new_tokens=16, params=SamplingParams(),
                                 stop=never, pad_id=0, broadcast=ReplicaBroadcast(), use_cache=use_cache)
    result = {"greedy": greedy, "max_logit_diff": worst, "steps": steps,
              "stop": {"fast": fast_stop.outputs, "fast_stopped": fast_stop.stopped, "ref": ref_stop.outputs,
                       "ref_stopped": ref_stop.stopped},
              "stream_equal": [streamed[r] for r in range(len(prompts))] == fast_stop.outputs, "beam": beam}
    Path(out_file).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:4])
