"""torchrun script: load converted checkpoints into our GPTModel at TP/PP/VPP and compare logits with transformers.

Usage: torchrun --nproc_per_node 2 tests/dist_logits.py CASES.json
CASES.json: [{"name", "hf_dir", "mg_dir", "tp", "pp", "ep"?, "grouped"?, "num_layer_list"?, "vpp_layers"?, "tol"?,
               "lora"?: {"dir", "r", "alpha", "targets", "peft_dir" | "merged_dir"}}, ...]
Each rank that holds final logits compares them with `AutoModelForCausalLM` (fp32) and prints one line per case;
any mismatch raises (non-zero exit). A "lora" case adds our adapter modules, loads the LoRA checkpoint into them
(unmerged) and compares with `peft.PeftModel` over the HF model and the PEFT adapter in "peft_dir", or with the
merged HF export in "merged_dir".
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


CASE_LINE = re.compile(r"CASE (\S+) rank (\d+): max-abs \S+ (OK|FAIL)")


def assert_cases_ok(stdout: str, cases: list[dict], ranks: int | None = None) -> None:
    """Every case reported OK (by `ranks` ranks when given). Read with a regex over the whole output: two ranks'
    lines can arrive interleaved without their newlines."""
    reports: dict[str, list[str]] = {}
    for name, _, verdict in CASE_LINE.findall(stdout):
        reports.setdefault(name, []).append(verdict)
    for case in cases:
        got = reports.get(case["name"], [])
        assert got and all(v == "OK" for v in got) and (ranks is None or len(got) == ranks), \
            (case["name"], stdout[-3000:])


def pipeline_forward(chunks, ids: torch.Tensor, pos: torch.Tensor):
    """Run one batch through this rank's chunks in pipeline order (chunk v of stage p after stage p-1); returns the
    logits on the rank holding the last chunk, else None."""
    from megatron.core import parallel_state as ps

    pp, p = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    nxt, prev = ps.get_pipeline_model_parallel_next_rank(), ps.get_pipeline_model_parallel_prev_rank()
    seq, batch = ids.shape[1], ids.shape[0]
    hidden = chunks[0].config.hidden_size
    out = None
    for v, chunk in enumerate(chunks):
        if not (p == 0 and v == 0):
            buf = torch.empty(seq, batch, hidden, dtype=chunk.config.params_dtype)
            torch.distributed.recv(buf, src=prev)
            chunk.set_input_tensor(buf)
        result = chunk(ids, pos, None)
        if p == pp - 1 and v == len(chunks) - 1:
            out = result
        else:
            torch.distributed.send(result.contiguous(), dst=nxt)
    return out


def main(cases_file: str) -> None:
    from transformers import AutoModelForCausalLM

    from mindspeed_llm.checkpoint import load_checkpoint
    from mindspeed_llm.models import build_model, load_model_config
    from mindspeed_llm.models.placement import place_layers
    from mindspeed_llm.platform import init_distributed

    cases = json.load(open(cases_file))
    failures = []
    for case in cases:
        fam, cfg = load_model_config(case["hf_dir"])
        vpp_layers = case.get("vpp_layers")
        placement = place_layers(cfg.num_layers, case["pp"], case.get("num_layer_list"), vpp_layers)
        init_distributed(case["tp"], case["pp"], placement.vpp if placement.vpp > 1 else None,
                         expert_model_parallel_size=case.get("ep", 1))
        chunks = build_model(cfg, params_dtype=torch.float32, num_layer_list=case.get("num_layer_list"),
                             num_layers_per_virtual_pipeline_stage=vpp_layers, parallel_output=False,
                             moe_grouped_gemm=case.get("grouped", False))
        lora = case.get("lora")
        if lora:
            from mindspeed_llm.checkpoint.load import load_adapters
            from mindspeed_llm.models.lora import LoraSpec, add_lora

            for chunk in chunks:
                add_lora(chunk, LoraSpec(lora["r"], lora["alpha"], tuple(lora["targets"])), seed=0)
        load_checkpoint(chunks, case["mg_dir"])
        if lora:
            load_adapters(chunks, lora["dir"])
        ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(7))
        pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
        with torch.no_grad():
            logits = pipeline_forward(chunks, ids, pos)
        if logits is None:
            continue
        ref_dir = lora["merged_dir"] if lora and "merged_dir" in lora else case["hf_dir"]
        ref_model = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
        if lora and "peft_dir" in lora:
            from peft import PeftModel

            ref_model = PeftModel.from_pretrained(ref_model, lora["peft_dir"]).eval()
        with torch.no_grad():
            ref = ref_model(ids).logits
        diff = (logits.float() - ref).abs().max().item()
        rank = torch.distributed.get_rank()
        ok = diff <= case.get("tol", 1e-4)
        print(f"CASE {case['name']} rank {rank}: max-abs {diff:.3e} {'OK' if ok else 'FAIL'}", flush=True)
        if not ok:
            failures.append(case["name"])
    torch.distributed.barrier()
    if failures:
        raise SystemExit(f"logits mismatch: {failures}")


if __name__ == "__main__":
    main(sys.argv[1])
