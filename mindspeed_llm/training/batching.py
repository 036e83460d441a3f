"""From SFT samples to model inputs: collation, the DP-aware sampler, `get_batch`, and the sidecar check.

Batch modes (`batch_mode(args)`):
* "fixed" (default): every micro-batch is padded to `--seq-length`.
* "dynamic" (`--no-pad-to-seq-lengths`): padded to the longest sample rounded up to `--pad-to-multiple-of` (8).
* "packed" (`--reset-attention-mask`, `--pack` data): rows are already `--seq-length`; segments travel as
  cu_seqlens and attention never crosses them. Pairwise data is packed here instead (`pack_sequences`): a
  micro-batch of b pairs is one row of its 2b sequences, rounded up to `--pad-to-multiple-of`.

Padding: input ids with the tokenizer's pad id, labels with -100, attention_mask with 0, on the right unless
`padding_side="left"`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from megatron.core import parallel_state

from mindspeed_llm.errors import UserError
from mindspeed_llm.models.context_parallel import (context_parallel_group, split_batch_for_cp,
                                                   split_packed_batch_for_cp)

from mindspeed_llm.training.loss import IGNORE_INDEX, loss_mask_from_labels, shift_labels
from mindspeed_llm.data.preprocess import SIDECAR_SUFFIX
from mindspeed_llm.training.sft_dataset import read_sidecar

MODES = ("fixed", "dynamic", "packed")


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n


def batch_mode(args: Any) -> str:
    """"packed", "dynamic" or "fixed" from the flags."""
    if getattr(args, "reset_attention_mask", False):
        return "packed"
    dynamic = getattr(args, "no_pad_to_seq_lengths", False) or getattr(args, "pad_to_seq_lengths", True) is False
    return "dynamic" if dynamic else "fixed"


# ---------------------------------------------------------------------------------------------------------------
# Collation
# ---------------------------------------------------------------------------------------------------------------

def _pad_rows(rows: Sequence[np.ndarray], length: int, value: int, left: bool) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.int64)
    for i, row in enumerate(rows):
        r = torch.as_tensor(np.asarray(row, dtype=np.int64))
        if left:
            out[i, length - len(r):] = r
        else:
            out[i, :len(r)] = r
    return out


def batch_cu_seqlens(row_cu_seqlens: Sequence[np.ndarray], row_length: int) -> torch.Tensor:
    """One int32 cu_seqlens for a micro-batch of packed rows flattened row after row: row r's boundaries are
    offset by r * row_length. A row shorter than `row_length` gets its padding as an extra segment."""
    parts = [np.zeros(1, dtype=np.int64)]
    for r, cu in enumerate(row_cu_seqlens):
        cu = np.asarray(cu, dtype=np.int64)
        ends = cu[1:] if cu[-1] == row_length else np.append(cu[1:], row_length)
        parts.append(ends + r * row_length)
    return torch.from_numpy(np.concatenate(parts)).to(torch.int32)


@dataclass
class SFTCollator:
    """`collate_fn` for the DataLoader (a dataclass so DataLoader workers can pickle it).

    Returns int64 tensors `input_ids`, `labels`, `attention_mask` of shape [b, L] (pairwise: 2b rows, all
    chosen then all rejected). Packed mode adds `position_ids` [b, L] int64, `cu_seqlens` (int32, flattened
    boundaries with row offsets) and `max_seqlen` (0-d int64, the longest segment); packed pairs are one row
    [1, L] of 2b segments in the same order (`pack_sequences`).
    """
    mode: str
    seq_length: int
    pad_token_id: int
    pad_to_multiple_of: int = 8
    padding_side: str = "right"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"batch mode {self.mode!r}: expected one of {MODES}")
        if self.padding_side not in ("right", "left"):
            raise UserError(f"--tokenizer-padding-side {self.padding_side!r}: expected right or left")
        if self.mode == "packed" and self.padding_side != "right":
            raise UserError("--tokenizer-padding-side left cannot be used with --reset-attention-mask")

    def padded_length(self, max_len: int) -> int:
        if self.mode == "dynamic":
            return round_up(max_len, self.pad_to_multiple_of)
        # Fixed and packed rows fill seq_length; a longer one (--no-cut-token) rounds up as the HF collator does.
        return round_up(max(max_len, 1), self.seq_length)

    def __call__(self, items: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        if "chosen_input_ids" in items[0]:
            items = [{k[len(side) + 1:]: v for k, v in it.items() if k.startswith(side)}
                     for side in ("chosen", "rejected") for it in items]
            if self.mode == "packed":
                return self.pack_sequences(items)
        length = self.padded_length(max(len(it["input_ids"]) for it in items))
        left = self.padding_side == "left"
        batch = {
            "input_ids": _pad_rows([it["input_ids"] for it in items], length, self.pad_token_id, left),
            "labels": _pad_rows([it["labels"] for it in items], length, IGNORE_INDEX, left),
            "attention_mask": _pad_rows([it["attention_mask"] for it in items], length, 0, left),
        }
        if self.mode == "packed":
            if "cu_seqlens" not in items[0]:
                raise UserError("--reset-attention-mask: the dataset yields unpacked samples; build it with "
                                 "SFTDataOptions(packed=True) over --pack data")
            batch["position_ids"] = _pad_rows([it["position_ids"] for it in items], length, 0, False)
            cu = batch_cu_seqlens([it["cu_seqlens"] for it in items], length)
            batch["cu_seqlens"] = cu
            batch["max_seqlen"] = (cu[1:] - cu[:-1]).max().to(torch.int64)
        return batch

    def pack_sequences(self, items: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        """Unpacked samples back to back in one packed row (pairwise data is packed per micro-batch). The
        padding up to `--pad-to-multiple-of` joins the last segment rather than forming its own, so there is
        exactly one segment per sample; it only follows real tokens, which causal attention never lets see it."""
        lengths = [len(it["input_ids"]) for it in items]
        length = round_up(sum(lengths), self.pad_to_multiple_of)
        starts = np.cumsum([0] + lengths[:-1])
        cu = np.append(starts, length)
        batch = {key: _pad_rows([np.concatenate([it[key] for it in items])], length, value, False)
                 for key, value in (("input_ids", self.pad_token_id), ("labels", IGNORE_INDEX), ("attention_mask", 0))}
        batch["position_ids"] = (torch.arange(length) - torch.from_numpy(np.repeat(starts, np.diff(cu))))[None]
        batch["cu_seqlens"] = torch.from_numpy(cu).to(torch.int32)
        batch["max_seqlen"] = torch.tensor(int(np.diff(cu).max()))
        return batch


def make_collator(args: Any, pad_token_id: int) -> SFTCollator:
    return SFTCollator(mode=batch_mode(args), seq_length=int(args.seq_length), pad_token_id=int(pad_token_id),
                       pad_to_multiple_of=int(getattr(args, "pad_to_multiple_of", 8) or 8),
                       padding_side=getattr(args, "tokenizer_padding_side", "right") or "right")


# ---------------------------------------------------------------------------------------------------------------
# Sampler and loader
# ---------------------------------------------------------------------------------------------------------------

class PretrainingSampler:
    """Megatron's "single" sampler: a batch sampler yielding one DP rank's micro-batches of dataset indices.

    The global stream is consumed_samples, consumed_samples + 1, ...; it is cut into windows of
    micro_batch_size * dp_size and rank d takes window[d * mbs:(d + 1) * mbs]. An incomplete final window
    is dropped (unless drop_last=False, which splits what is left). Restarting from the consumed_samples of
    a checkpoint therefore continues exactly where the run stopped.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, drop_last: bool = True) -> None:
        if total_samples <= 0:
            raise UserError(f"no samples to draw from (dataset length {total_samples})")
        if consumed_samples >= total_samples:
            raise UserError(f"consumed samples {consumed_samples} >= dataset length {total_samples}: the data "
                             "is exhausted; raise --train-iters only together with a new index map")
        if micro_batch_size <= 0 or not 0 <= data_parallel_rank < data_parallel_size:
            raise UserError(f"bad sampler setup: micro batch {micro_batch_size}, "
                             f"DP rank {data_parallel_rank} of {data_parallel_size}")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = data_parallel_rank
        self.dp_size = data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // (self.micro_batch_size * self.dp_size)

    def __iter__(self) -> Iterator[list[int]]:
        window = self.micro_batch_size * self.dp_size
        lo, hi = self.dp_rank * self.micro_batch_size, (self.dp_rank + 1) * self.micro_batch_size
        start = self.consumed_samples
        while start + window <= self.total_samples:
            yield list(range(start + lo, start + hi))
            start += window
        if not self.drop_last and start < self.total_samples:
            rest = list(range(start, self.total_samples))
            per_rank = -(-len(rest) // self.dp_size)
            mine = rest[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
            if mine:
                yield mine


def build_data_loader(dataset: torch.utils.data.Dataset, consumed_samples: int, micro_batch_size: int,
                      data_parallel_rank: int, data_parallel_size: int, collator: SFTCollator,
                      num_workers: int = 0, seed: int = 1234) -> torch.utils.data.DataLoader:
    """DataLoader over `PretrainingSampler`; every TP/PP rank of a DP replica builds the same one."""
    from mindspeed_llm.platform import pin_memory_available

    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, data_parallel_rank,
                                 data_parallel_size)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collator,
        pin_memory=pin_memory_available(), generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0)


# ---------------------------------------------------------------------------------------------------------------
# Batch -> model inputs
# ---------------------------------------------------------------------------------------------------------------

def build_packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int,
                            cp_group: torch.distributed.ProcessGroup | None = None,
                            device: torch.device | str | None = None):
    """megatron-core `PackedSeqParams` in THD layout (same boundaries for queries and keys), with the segment
    bounds and per-token positions computed here on the host (`models.packed.PackedSegments`)."""
    from mindspeed_llm.models.packed import packed_seq_params

    if cp_group is None:
        try:
            from megatron.core import parallel_state

            if parallel_state.model_parallel_is_initialized():
                cp_group = parallel_state.get_context_parallel_group()
        except (ImportError, AssertionError, RuntimeError):
            cp_group = None
    return packed_seq_params(cu_seqlens, int(max_seqlen), cp_group, device)


def _tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() \
        else 1


def padding_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Dense [b, 1, L, L] bool mask, True = masked (Megatron convention): the causal upper triangle and the
    padding key columns. The diagonal stays open so padding rows never softmax over nothing (NaN)."""
    length = attention_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).triu(1)
    pad_keys = (attention_mask == 0)[:, None, None, :]
    eye = torch.eye(length, dtype=torch.bool, device=attention_mask.device)
    return (causal | pad_keys) & ~eye


def get_batch(batch: dict[str, torch.Tensor], device: torch.device | str | None = None,
              cp_group: torch.distributed.ProcessGroup | None = None) -> dict[str, Any]:
    """Model inputs for one micro-batch from `SFTCollator` output.

    Returns
    * `tokens` int64, `labels` int64 (already shifted: labels[:, i] is the target of token i, -100 where
      none), `loss_mask` float32, `position_ids` int64, all [b, L];
    * `attention_mask`: None when causal attention alone is exact, else a [b, 1, L, L] bool mask (True =
      masked). Convention: with right padding (the default) every real token attends only to earlier real
      tokens under a causal mask, so None is returned and attention runs as plain causal (SDPA is_causal /
      flash); pad positions compute garbage that the loss mask removes. A dense mask is built only for left
      padding;
    * with a context-parallel group of N ranks (`cp_group`, else megatron-core's), unpacked tensors are this
      rank's chunks i and 2N-1-i of 2N along the sequence, [b, L/N]; packed rows are cut the same way per
      sample, each sample padded to a multiple of 2N (lcm(2, TP) x N), [1, t/N] (`models.context_parallel`);
    * `packed_seq_params`: None, or for packed batches a THD `PackedSeqParams` whose cu_seqlens index the
      micro-batch flattened row after row. Packed tensors are therefore returned as [1, b * L], position
      ids restarting at 0 in each segment, and `attention_mask` None.
    """
    def to(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=True) if device is not None else t

    tokens = batch["input_ids"]
    group = cp_group if cp_group is not None else context_parallel_group()
    if "cu_seqlens" in batch:
        cu = batch["cu_seqlens"]
        tokens = tokens.reshape(1, -1)
        labels = shift_labels(batch["labels"].reshape(1, -1), cu)
        if group is not None and group.size() > 1:
            local, params = split_packed_batch_for_cp({"tokens": tokens, "labels": labels}, {"tokens": 0,
                                                      "labels": IGNORE_INDEX}, cu, group, _tp_size(), device)
            return {"tokens": to(local["tokens"]), "labels": to(local["labels"]),
                    "loss_mask": to(loss_mask_from_labels(local["labels"])),
                    "position_ids": to(local["position_ids"]), "attention_mask": None, "packed_seq_params": params}
        return {"tokens": to(tokens), "labels": to(labels), "loss_mask": to(loss_mask_from_labels(labels)),
                "position_ids": to(batch["position_ids"].reshape(1, -1)), "attention_mask": None,
                "packed_seq_params": build_packed_seq_params(cu, int(batch["max_seqlen"]), cp_group, device)}
    labels = shift_labels(batch["labels"])
    mask = batch["attention_mask"]
    right_padded = bool((mask[:, 1:] <= mask[:, :-1]).all()) if mask.shape[1] > 1 else True
    b, length = tokens.shape
    inputs = {"tokens": to(tokens), "labels": to(labels), "loss_mask": to(loss_mask_from_labels(labels)),
              "position_ids": to(torch.arange(length, dtype=torch.int64).expand(b, length).contiguous()),
              "attention_mask": None if right_padded else to(padding_attention_mask(mask)),
              "packed_seq_params": None}
    return split_batch_for_cp(inputs, group)


# ---------------------------------------------------------------------------------------------------------------
# Sidecar check
# ---------------------------------------------------------------------------------------------------------------

def _thinking(value: Any) -> str:
    return "none" if value is None else str(value).strip().lower()


def _tok_name(path: Any) -> str | None:
    """Last path component: a moved model directory or a hub id ("Qwen/Qwen3-8B") still compares equal."""
    if path is None or str(path) in ("", "None"):
        return None
    return os.path.basename(str(path).rstrip("/\\"))


def check_data_files(prefix: str, recorded: dict[str, dict], where: str) -> None:
    """The data files are the ones the sidecar was written with (sizes, and the digest of each .idx)."""
    from mindspeed_llm.data.writer import file_digest

    directory = os.path.dirname(prefix)
    for name, want in sorted(recorded.items(), key=lambda kv: (not kv[0].endswith(".idx"), kv[0])):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue            # a missing file is reported by the dataset reader with the file it wanted
        got = file_digest(path) if "blake2b" in want else {"size": os.path.getsize(path)}
        if got != want:
            raise UserError(f"{path} does not match {where} (written by another preprocess_data.py run, or "
                            f"one stopped before it rewrote the sidecar); re-run preprocess_data.py into this "
                            f"--output-prefix")


def check_sidecar_tokenizer(sidecar: dict, where: str, name_or_path: Any, tokenizer: Any = None) -> None:
    """The tokenizer (--tokenizer-name-or-path `name_or_path`, loaded as `tokenizer` when given) is the one the
    data of `sidecar` (read from `where`) was preprocessed with: same directory name, content fingerprint, vocab
    size, eos and pad ids."""
    rerun = "re-run preprocess_data.py with the training flags"
    tok = sidecar.get("tokenizer") or {}
    ours_name, theirs_name = _tok_name(name_or_path), _tok_name(tok.get("name_or_path"))
    if ours_name and theirs_name and ours_name != theirs_name:
        raise UserError(f"{where}: --tokenizer-name-or-path is {ours_name!r} for training but the data was "
                        f"preprocessed with {theirs_name!r}; use the same tokenizer or {rerun}")
    if tokenizer is None:
        return
    if tok.get("fingerprint"):
        from mindspeed_llm.tokenizer import tokenizer_fingerprint

        if tokenizer_fingerprint(tokenizer) != tok["fingerprint"]:
            raise UserError(f"{where}: the tokenizer in --tokenizer-name-or-path {name_or_path} differs in content "
                            f"(vocabulary, merges or special tokens) from the one the data was preprocessed with; "
                            f"use that tokenizer or {rerun}")
    for key, ours in (("vocab_size", len(tokenizer)), ("eos_token_id", getattr(tokenizer, "eos_token_id", None)),
                      ("pad_token_id", getattr(tokenizer, "pad_token_id", None))):
        if tok.get(key) is not None and ours is not None and int(ours) != int(tok[key]):
            raise UserError(f"{where}: --tokenizer-name-or-path ({key}) is {int(ours)!r} for training but the data "
                            f"was preprocessed with {int(tok[key])!r}; the tokenizer differs from preprocessing; "
                            f"{rerun}")


def check_sidecar(prefix: str, args: Any, tokenizer: Any = None) -> dict | None:
    """Refuse data preprocessed differently from the training flags; returns the sidecar (None if absent).

    Compared: --prompt-type, --enable-thinking, --handler-name, --pack, the tokenizer (directory name of --tokenizer-name-or-path,
    and with `tokenizer` given: vocab size, eos and pad ids), --seq-length (when preprocessing had one),
    packing (--pack data needs --reset-attention-mask and the reverse, except for pairwise data, packed per
    micro-batch; --neat-pack must match) and
    --is-pairwise-dataset. Raises ValueError with one line naming the flag and both values.
    """
    sidecar = read_sidecar(prefix)
    if sidecar is None:
        return None
    where = prefix + SIDECAR_SUFFIX

    def refuse(flag: str, ours: Any, theirs: Any, fix: str) -> None:
        raise UserError(f"{where}: {flag} is {ours!r} for training but the data was preprocessed with "
                         f"{theirs!r}; {fix}")

    if sidecar.get("format_version") != 1:
        raise UserError(f"{where}: format_version {sidecar.get('format_version')!r} is not 1; "
                         "re-run preprocess_data.py with this version")
    rerun = "re-run preprocess_data.py with the training flags"
    check_data_files(prefix, sidecar.get("data_files") or {}, where)
    prompt = getattr(args, "prompt_type", None)
    if prompt != sidecar.get("prompt_type"):
        refuse("--prompt-type", prompt, sidecar.get("prompt_type"), f"pass the same --prompt-type or {rerun}")
    ours_t, theirs_t = _thinking(getattr(args, "enable_thinking", None)), _thinking(sidecar.get("enable_thinking"))
    if ours_t != theirs_t:
        refuse("--enable-thinking", ours_t, theirs_t, f"pass the same --enable-thinking or {rerun}")

    check_sidecar_tokenizer(sidecar, where, getattr(args, "tokenizer_name_or_path", None), tokenizer)

    handler = getattr(args, "handler_name", "") or None
    if handler and sidecar.get("handler_name") and handler != sidecar["handler_name"]:
        refuse("--handler-name", handler, sidecar["handler_name"], f"pass the same --handler-name or {rerun}")

    packed = bool(sidecar.get("pack")) or bool(sidecar.get("neat_pack"))
    if getattr(args, "pack", False) and not packed:
        refuse("--pack", True, "no --pack", "preprocess with --pack --neat-pack, or drop --pack")
    reset = bool(getattr(args, "reset_attention_mask", False))
    if packed and not reset:
        refuse("--reset-attention-mask", False, "--pack",
               "packed rows need --reset-attention-mask, or preprocess without --pack")
    pairwise = bool(getattr(args, "is_pairwise_dataset", False))
    if reset and not packed and not pairwise:       # pairs are packed per micro-batch by the collator
        refuse("--reset-attention-mask", True, "no --pack", "preprocess with --pack --neat-pack, or drop the flag")
    neat = bool(getattr(args, "neat_pack", False))
    if packed and neat != bool(sidecar.get("neat_pack")):
        refuse("--neat-pack", neat, bool(sidecar.get("neat_pack")), "pass --neat-pack exactly when the data has it")

    seq = sidecar.get("seq_length")
    if seq is not None and int(seq) != int(args.seq_length):
        refuse("--seq-length", int(args.seq_length), int(seq), f"pass --seq-length {seq} or {rerun}")

    fields = sidecar.get("fields") or []
    if fields and pairwise != any("chosen" in f for f in fields):
        refuse("--is-pairwise-dataset", pairwise, not pairwise, "pairwise data needs the pairwise flag and handler")
    return sidecar
