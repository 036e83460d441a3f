"""Compare a converted Megatron checkpoint with the Hugging Face model: logits on a few token sequences."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from mindspeed_llm.checkpoint import layout
from mindspeed_llm.checkpoint.errors import ConversionError
from mindspeed_llm.checkpoint.mapping import chunk_state_dict
from mindspeed_llm.checkpoint.mg2hf import grouped_experts, iter_hf_tensors
from mindspeed_llm.models.family import DictSource

PROMPTS = ("Reverse the letters of the word: kalomi", "Add the two numbers. 12+30",
           "The quick brown fox jumps over the lazy dog.")


@dataclass
class VerifyResult:
    max_abs: float
    cosine: float
    threshold: float

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.threshold and self.cosine >= 0.999

    def line(self) -> str:
        return (f"[verify] logits max-abs diff {self.max_abs:.3e}, cosine {self.cosine:.8f} "
                f"(threshold {self.threshold:g}): {'OK' if self.ok else 'MISMATCH'}")


def _token_batches(hf_dir: Path, vocab_size: int, seq_len: int = 16,
                   trust_remote_code: bool = False) -> list[torch.Tensor]:
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=trust_remote_code)
        batches = [torch.tensor([tok(p)["input_ids"][:seq_len]]) for p in PROMPTS]
        if all(b.numel() > 1 and int(b.max()) < vocab_size for b in batches):
            return batches
    except Exception:
        pass
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (1, seq_len), generator=g) for _ in PROMPTS]


def verify(hf_dir: str | Path, mg_dir: str | Path, *, model_type_hf: Optional[str] = None,
           threshold: float = 1e-3, log: Callable[[str], None] = print,
           trust_remote_code: bool = False) -> VerifyResult:
    """Load `hf_dir` with transformers and `mg_dir` into our GPTModel (TP=1, PP=1, merged in memory), run both in
    fp32 and compare logits. Single process; initialises a one-rank gloo/nccl group if none exists."""
    from transformers import AutoModelForCausalLM

    from mindspeed_llm.models.build import build_model
    from mindspeed_llm.platform import current_device, init_distributed

    hf_dir, mg_dir = Path(hf_dir), Path(mg_dir)
    if not (hf_dir / "config.json").is_file():
        raise ConversionError(f"verify: {hf_dir} has no config.json; pass the Hugging Face model directory")
    fam, cfg, layers = iter_hf_tensors(mg_dir, model_type_hf, hf_dir)
    merged: dict[str, torch.Tensor] = {}
    for _, tensors in layers:
        merged.update({k: v.float() for k, v in tensors.items()})
    init_distributed(1, 1)
    # the checkpoint's expert module: GroupedMLP for a --moe-grouped-gemm save
    grouped = grouped_experts(layout.read_args(layout.iteration_dir(mg_dir))) and cfg.num_experts is not None
    model = build_model(cfg, params_dtype=torch.float32, **({"moe_grouped_gemm": True} if grouped else {}))[0]
    sd = chunk_state_dict(fam, cfg, DictSource(merged), 0, 1, range(cfg.num_layers), first=True, last=True,
                          grouped=grouped)
    model.load_state_dict(sd, strict=True)
    del merged, sd
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, use_safetensors=True,
                                               trust_remote_code=trust_remote_code).eval().to(current_device())
    max_abs, cos_min = 0.0, 1.0
    with torch.no_grad():
        for ids in _token_batches(hf_dir, cfg.vocab_size, trust_remote_code=trust_remote_code):
            ids = ids.to(current_device())
            pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
            ours = model(ids, pos, None).float()
            theirs = ref(ids).logits.float()
            max_abs = max(max_abs, (ours - theirs).abs().max().item())
            cos = torch.nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0).item()
            cos_min = min(cos_min, cos)
    result = VerifyResult(max_abs, cos_min, threshold)
    log(result.line())
    return result
