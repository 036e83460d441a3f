"""Next-token choice: greedy argmax, or temperature -> top-k -> top-p -> multinomial with a seeded generator."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0          # 0: off
    top_p: float = 0.0      # 0 or 1: off

    def validate(self) -> None:
        from mindspeed_llm.errors import UserError

        if self.do_sample and self.temperature <= 0:
            raise UserError(f"--temperature {self.temperature} must be > 0 for sampling")
        if self.top_k < 0:
            raise UserError(f"--top-k {self.top_k} must be >= 0 (0 turns it off)")
        if not 0.0 <= self.top_p <= 1.0:
            raise UserError(f"--top-p {self.top_p} must lie in [0, 1] (0 or 1 turns it off)")


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Both filters together, as the reference applies them: top-k first, then top-p on what is left (the most
    likely token always survives). Removed entries become -inf."""
    logits = logits.clone()
    if top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative > top_p
        drop[..., 1:] = drop[..., :-1].clone()   # keep the token that crosses p
        drop[..., 0] = False
        logits.scatter_(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def choose(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits [b, V] -> token ids [b]."""
    logits = logits.float()
    if not params.do_sample:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    probs = logits.softmax(dim=-1)
    # multinomial draws on the generator's device; keep the generator on the CPU for device-independent results
    draws = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1)
    return draws.to(logits.device)


def sampling_for(task: str, args) -> SamplingParams:
    """The decoding of an inference task: greedy / beam search, or sampling with the --temperature/--top-k/--top-p
    flags."""
    if task in ("greedy", "beam_search"):
        return SamplingParams()
    params = SamplingParams(True, args.temperature, args.top_k, args.top_p)
    params.validate()
    return params
