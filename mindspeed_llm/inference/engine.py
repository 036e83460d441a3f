"""A loaded model ready to generate: tokenizer, prompt builder, stop criteria, this rank's stage, RNG."""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from mindspeed_llm.checkpoint.startup import convert_at_startup, startup_options
from mindspeed_llm.errors import UserError
from mindspeed_llm.inference import comm
from mindspeed_llm.inference.beam import beam_search
from mindspeed_llm.inference.decode import DecodeStage
from mindspeed_llm.inference.generation import Generated, StepCallback, StopCriteria, generate
from mindspeed_llm.inference.prompts import PromptBuilder, stop_criteria
from mindspeed_llm.inference.sampling import SamplingParams

log = logging.getLogger("mindspeed_llm.inference")


@dataclass
class Engine:
    tokenizer: object
    builder: PromptBuilder
    stop: StopCriteria
    step: DecodeStage
    broadcast: comm.ReplicaBroadcast
    generator: torch.Generator
    max_positions: int
    pad_id: int
    use_cache: bool
    max_new_tokens: int
    truncate: bool = False
    limit_flag: str = "--max-position-embeddings"     # what max_positions came from, for the messages

    def fit(self, ids: list[int], where: str, new_tokens: Optional[int] = None) -> list[int]:
        """Make room for `new_tokens` (default --max-new-tokens; 0 for a prompt that is only scored) within the
        model's positions: cut from the left (--truncate-prompt, with a warning) or refuse with an error naming
        the request."""
        reserve = self.max_new_tokens if new_tokens is None else new_tokens
        room = self.max_positions - reserve
        if len(ids) <= room:
            return ids
        if room < 1:
            raise UserError(f"--max-new-tokens {self.max_new_tokens} leaves no room for a prompt within "
                            f"{self.limit_flag} {self.max_positions}")
        if not self.truncate:
            with_new = f"; with --max-new-tokens {reserve} that" if reserve else ", which"
            lower = ", lower --max-new-tokens," if reserve else ""
            raise UserError(f"{where}: the prompt has {len(ids)} tokens{with_new} exceeds {self.limit_flag} "
                            f"{self.max_positions}. Shorten it{lower} or pass --truncate-prompt to keep its last "
                            f"{room} tokens")
        if comm.world_rank() == 0:
            log.warning(f"{where}: prompt of {len(ids)} tokens cut to its last {room} (--truncate-prompt)")
        return ids[-room:]

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 on_step: Optional[StepCallback] = None) -> Generated:
        return generate(self.step, prompts, max_new_tokens=self.max_new_tokens, params=params, stop=self.stop,
                        pad_id=self.pad_id, broadcast=self.broadcast, generator=self.generator,
                        use_cache=self.use_cache, on_step=on_step)

    def beam_search(self, prompt: list[int], params: SamplingParams, num_beams: int,
                    length_penalty: float = 1.0) -> list[int]:
        return beam_search(self.step, prompt, num_beams=num_beams, max_new_tokens=self.max_new_tokens,
                           params=params, stop=self.stop, pad_id=self.pad_id, broadcast=self.broadcast,
                           generator=self.generator, use_cache=self.use_cache, length_penalty=length_penalty)

    def decode(self, ids: list[int]) -> str:
        """Response text: special tokens dropped, a trailing multi-token stop word cut off."""
        for seq in self.stop.sequences:
            if len(ids) >= len(seq) and tuple(ids[-len(seq):]) == seq:
                ids = ids[:-len(seq)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def check_expert_parallel_size(args: argparse.Namespace) -> None:
    """Expert parallelism splits the data-parallel ranks of each TP/PP slot: EP must divide them."""
    tp, pp, ep = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % (tp * pp):
        return          # init_distributed names the TP x PP that does not fit
    if ep < 1 or (world // (tp * pp)) % ep:
        raise UserError(f"--expert-model-parallel-size {ep} x --tensor-model-parallel-size {tp} x "
                        f"--pipeline-model-parallel-size {pp} does not fit {world} processes: expert parallelism "
                        f"splits the {world // (tp * pp)} data-parallel ranks of each TP/PP slot, so EP must divide "
                        f"{world // (tp * pp)}")


def setup(args: argparse.Namespace) -> Engine:
    """Initialise the parallel state, load tokenizer and checkpoint on every rank (all ranks fail together)."""
    from mindspeed_llm.data.prompt_type import get_template
    from mindspeed_llm.inference.model import build_and_load, read_checkpoint_args, resolve_model_config
    from mindspeed_llm.platform import init_distributed
    from mindspeed_llm.tokenizer import build_tokenizer

    check_expert_parallel_size(args)
    init_distributed(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, None,
                     backend=args.distributed_backend, seed=args.seed,
                     timeout_minutes=args.distributed_timeout_minutes,
                     expert_model_parallel_size=args.expert_model_parallel_size)
    if args.enable_hf2mg_convert:
        converted = startup_options(args)
        convert_at_startup(converted)
        args.load = str(converted.save_dir)       # --load now names the converted checkpoint

    def load():
        template = (get_template(args.prompt_type, args.prompt_type_path, enable_thinking=args.enable_thinking)
                    if args.prompt_type else None)
        tokenizer = build_tokenizer(args.tokenizer_name_or_path, use_fast=not args.tokenizer_not_use_fast,
                                    template=template, trust_remote_code=args.trust_remote_code)
        saved, source = read_checkpoint_args(args.load)
        cfg = resolve_model_config(args, saved, len(tokenizer), source)
        if args.seq_length and args.seq_length > cfg.max_position_embeddings:
            raise UserError(f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
                            f"{cfg.max_position_embeddings} of the model; lower --seq-length")
        if len(tokenizer) > cfg.vocab_size:
            raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model only {cfg.vocab_size} "
                            f"embedding rows; --tokenizer-name-or-path does not belong to this checkpoint")
        return template, tokenizer, cfg, DecodeStage(build_and_load(args, cfg))

    template, tokenizer, cfg, stage = comm.agree(load)
    builder = PromptBuilder(tokenizer, template, args.hf_chat_template, args.enable_thinking)
    stop = stop_criteria(tokenizer, template)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop.ids)
    return Engine(tokenizer=tokenizer, builder=builder, stop=stop, step=stage,
                  broadcast=comm.ReplicaBroadcast(), generator=torch.Generator().manual_seed(args.seed),
                  max_positions=args.seq_length or cfg.max_position_embeddings, pad_id=int(pad_id),
                  use_cache=args.use_kv_cache, max_new_tokens=args.max_new_tokens, truncate=args.truncate_prompt,
                  limit_flag=getattr(args, "limit_flag", None) or ("--seq-length" if args.seq_length else
                                                                   "--max-position-embeddings"))
