"""torchrun script: generation at several TP/PP layouts in one launch; rank 0 writes what each produced.

Usage: torchrun --nproc_per_node 2 tests/dist_infer.py SPEC.json OUT.json
SPEC.json: {"tokenizer": HF_DIR, "prompts": [[ids], ...], "max_new_tokens": N, "stop_ids": [extra stop ids],
            "configs": [{"name", "load", "tp", "pp", "ep" (default 1)}, ...]}
OUT.json: {name: {"greedy_cache", "greedy_nocache", "sample_a", "sample_b", "topk1", "beam", "greedy_stop"}}
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(spec_file: str, out_file: str) -> None:
    import torch.distributed as dist

    from mindspeed_llm.inference.args import parse_args
    from mindspeed_llm.inference.engine import setup
    from mindspeed_llm.inference.generation import StopCriteria
    from mindspeed_llm.inference.sampling import SamplingParams

    spec = json.loads(Path(spec_file).read_text())
    prompts = spec["prompts"]
    results = {}
    for cfg in spec["configs"]:
        args = parse_args(["--load", cfg["load"], "--tokenizer-name-or-path", spec["tokenizer"],
                           "--tensor-model-parallel-size", str(cfg["tp"]),
                           "--pipeline-model-parallel-size", str(cfg["pp"]),
                           "--expert-model-parallel-size", str(cfg.get("ep", 1)),
                           "--max-new-tokens", str(spec["max_new_tokens"]), "--seed", "7"])
        engine = setup(args)
        got = {"greedy_cache": engine.generate(prompts, SamplingParams()).outputs}
        engine.use_cache = False
        got["greedy_nocache"] = engine.generate(prompts, SamplingParams()).outputs
        engine.use_cache = True
        sampling = SamplingParams(True, 0.7, 50, 0.95)
        for key in ("sample_a", "sample_b"):
            engine.generator.manual_seed(7)
            got[key] = engine.generate(prompts, sampling).outputs
        got["topk1"] = engine.generate(prompts, SamplingParams(True, 1.0, 1, 0.0)).outputs
        got["beam"] = engine.beam_search(prompts[0], SamplingParams(), 2)
        stop = engine.stop
        engine.stop = StopCriteria(frozenset(spec["stop_ids"]) | stop.ids)
        got["greedy_stop"] = engine.generate(prompts, SamplingParams()).outputs
        engine.stop = stop
        results[cfg["name"]] = got
        if dist.get_rank() == 0:
            print(f"CASE {cfg['name']} done", flush=True)
    if dist.get_rank() == 0:
        Path(out_file).write_text(json.dumps(results))
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
