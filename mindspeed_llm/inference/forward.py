"""One forward pass of a token window through this rank's pipeline stage, with or without a KV cache."""
from __future__ import annotations

from typing import Optional

import torch

from mindspeed_llm.inference import comm


class KVCache:
    """megatron-core's `StaticInferenceContext`: per-layer key/value buffers of [max_len, batch, ...].

    Each rank holds the cache of its own layers; every rank advances the offset by the same window length, so
    the stages stay in step without exchanging anything but activations.
    """

    def __init__(self, batch: int, max_len: int) -> None:
        from megatron.core.inference.contexts import StaticInferenceContext

        self.context = StaticInferenceContext(batch, max_len)

    @property
    def offset(self) -> int:
        return self.context.sequence_len_offset

    def advance(self, n: int) -> None:
        self.context.sequence_len_offset += n

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: row i of the cache becomes the old row `rows[i]`."""
        if self.context.key_value_memory_dict:
            self.context.swap_key_value_dict(rows)


class StageForward:
    """Runs token windows through the model chunk of this pipeline stage.

    `__call__(tokens, cache)` feeds tokens [b, s] (the window after `cache.offset`, or the whole prefix when
    `cache` is None); the last stage returns logits of the window's last position [b, V] (full vocabulary:
    the output layer gathers the TP shards), other stages return None after sending their activations on.
    `last` [b] picks another position per row instead (right-padded rows of different lengths: causal
    attention keeps each row's logits at its own last token exact).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.config = model.config
        self.device = next(model.parameters()).device
        self.first = comm.is_first_stage()
        self.last = comm.is_last_stage()

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, cache: Optional[KVCache] = None,
                 last: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        batch, seq = tokens.shape
        start = cache.offset if cache is not None else 0
        if not self.first:
            hidden = comm.recv_from_prev((seq, batch, self.config.hidden_size), self.config.params_dtype, self.device)
            self.model.set_input_tensor(hidden)
        tokens = tokens.to(self.device)
        # GPTModel takes RoPE positions from the cache offset; position ids are passed for completeness.
        positions = torch.arange(start, start + seq, device=self.device).unsqueeze(0).expand(batch, seq)
        out = self.model(tokens, positions, None, inference_context=cache.context if cache is not None else None,
                         runtime_gather_output=True)
        if cache is not None:
            cache.advance(seq)
        if not self.last:
            comm.send_to_next(out)
            return None
        if last is not None:
            return out[torch.arange(batch, device=out.device), last.to(out.device)].float()
        return out[:, -1, :].float()
