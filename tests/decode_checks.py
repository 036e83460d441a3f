"""Checks of the static-cache decode path in one process (a world of one); writes what it measured as JSON.

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


def main(hf_dir: str, spec_file: str, out_file: str) -> None:
    import torch

    from mindspeed_llm.inference.beam import beam_search
    from mindspeed_llm.inference.comm import ReplicaBroadcast
    from mindspeed_llm.inference.decode import decode_stage_for, unsupported_reason
    from mindspeed_llm.inference.forward import StageForward
    from mindspeed_llm.inference.generation import StopCriteria, generate
    from mindspeed_llm.inference.sampling import SamplingParams
    from mindspeed_llm.platform import init_distributed

    init_distributed(1, 1, backend="gloo")
    spec = json.loads(Path(spec_file).read_text())
    prompts, max_new = spec["prompts"], spec["max_new_tokens"]
    model = load_model(hf_dir)
    step = StageForward(model)
    stage = decode_stage_for(step)
    assert stage is not None, f"the decode path refused the tiny Qwen3 model: {unsupported_reason(model)}"
    never = StopCriteria(frozenset())
    kwargs = dict(max_new_tokens=max_new, params=SamplingParams(), pad_id=0, broadcast=lambda t: t)
    greedy = generate(step, prompts, stop=never, use_cache=True, **kwargs).outputs

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
        ref = step(tokens[:, :t], None)
        worst = max(worst, float((fast - ref).abs().max()))
        steps += 1

    # stopping on ids and on a multi-token sequence: same rows as megatron's own loop (no cache); streaming
    length = spec["stop_sequence_len"]
    seq_stop = StopCriteria(frozenset({greedy[1][5]}), (tuple(greedy[0][3:3 + length]),))
    fast_stop = generate(step, prompts, stop=seq_stop, use_cache=True, **kwargs)
    ref_stop = generate(step, prompts, stop=seq_stop, use_cache=False, **kwargs)
    streamed: dict[int, list[int]] = {}

    def on_step(t, outputs):
        for row, out in enumerate(outputs):
            streamed[row] = list(out)

    generate(step, prompts, stop=seq_stop, use_cache=True, on_step=on_step, **kwargs)

    # beam search with the static cache (reordered per step) against megatron's own cached forward
    megatron_step = StageForward(model)
    megatron_step._decode_stage = None          # what decode_stage_for keeps for a model it cannot run
    beam = {}
    for name, which in (("fast", step), ("megatron", megatron_step)):
        beam[name] = beam_search(which, prompts[2], num_beams=3, max_new_tokens=16, params=SamplingParams(),
                                 stop=never, pad_id=0, broadcast=ReplicaBroadcast())
    result = {"greedy": greedy, "max_logit_diff": worst, "steps": steps,
              "stop": {"fast": fast_stop.outputs, "fast_stopped": fast_stop.stopped, "ref": ref_stop.outputs,
                       "ref_stopped": ref_stop.stopped},
              "stream_equal": [streamed[r] for r in range(len(prompts))] == fast_stop.outputs, "beam": beam}
    Path(out_file).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:4])
