"""Megatron's training log line (MindSpeed-LLM format), the validation line, FLOP counting and TensorBoard."""
from __future__ import annotations

import argparse
import math
import time
from typing import Optional

import torch


def flops_per_iteration(cfg, terms: list[tuple[int, int, float]], swiglu: bool = True) -> float:
    """Megatron's formula (fwd + bwd) summed over micro-batches (rows, length, attention density rho):
    B*S*[12*L*h*ffn*g + 12*L*h^2*(1 + G/N + (S/h)*2*rho)*(kv*N/h) + 6*h*V], g = 1.5 with SwiGLU.
    rho = 0.5 for causal attention; packed rows use 0.5 * sum(len_i^2) / S^2."""
    L, h, ffn = cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size
    N, G, kv, V = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels, cfg.vocab_size
    g = 1.5 if swiglu else 1.0
    total = 0.0
    for rows, length, rho in terms:
        per_token = (12 * L * h * ffn * g + 12 * L * h * h * (1 + G / N + (length / h) * 2 * rho) * (kv * N / h)
                     + 6 * h * V)
        total += rows * length * per_token
    return total


class TrainLog:
    """Accumulates per-iteration values between log lines; prints on the last rank only."""

    def __init__(self, args: argparse.Namespace, cfg) -> None:
        self.args, self.cfg = args, cfg
        self.is_last = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
        self.reset()
        self.mark = time.time()
        self.writer = None
        self.memory_reported = False
        if args.tensorboard_dir and self.is_last:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=args.tensorboard_dir, max_queue=1000)
            except ImportError:
                print(f"WARNING: --tensorboard-dir {args.tensorboard_dir}: tensorboard is not installed "
                      f"(pip install tensorboard); scalars are not written", flush=True)

    def reset(self) -> None:
        self.losses: list[float] = []
        self.iters = 0
        self.skipped = 0
        self.nans = 0
        self.flops = 0.0
        self.tokens = 0.0
        self.rho: list[float] = []
        self.metrics: dict[str, list[float]] = {}     # --stage dpo: rewards, accuracies, margins, log-probs

    def add(self, loss: float, skipped: bool, nan: bool, flops: float, tokens: float, rho: list[float],
            metrics: Optional[dict[str, float]] = None) -> None:
        self.iters += 1
        self.skipped += int(skipped)
        self.nans += int(nan)
        if not skipped and not nan:
            self.losses.append(loss)
            for key, value in (metrics or {}).items():
                self.metrics.setdefault(key, []).append(value)
        self.flops += flops
        self.tokens += tokens
        self.rho += rho

    def emit(self, iteration: int, consumed: int, lr: float, loss_scale: float, grad_norm: Optional[float]) -> None:
        """Print the line for the interval just ended (collective: barrier for the timer, as Megatron does)."""
        torch.distributed.barrier()
        now = time.time()
        elapsed = (now - self.mark) / max(self.iters, 1)
        self.mark = now
        a = self.args
        world = torch.distributed.get_world_size()
        # Each TP/PP rank of a replica counted the same batches; flops/tokens are summed over DP already.
        tflops = self.flops / max(self.iters, 1) / (elapsed * 1e12 * world) if elapsed > 0 else 0.0
        tok_s = self.tokens / max(self.iters, 1) / elapsed if elapsed > 0 else 0.0
        loss = sum(self.losses) / len(self.losses) if self.losses else 0.0
        if self.is_last:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            line = (f" [{stamp}] iteration {iteration:8d}/{a.train_iters:8d} | consumed samples: {consumed:12d} |"
                    f" elapsed time per iteration (ms): {elapsed * 1000:.1f} |")
            if not a.no_pad_to_seq_lengths:
                rho = 100 * sum(self.rho) / max(len(self.rho), 1)
                line += f" throughput per GPU (TFLOP/s/GPU): {tflops:.1f} | core attn ratio (%): {rho:.1f} |"
            line += f" tokens per second: {tok_s:.1f} |"
            line += f" learning rate: {lr:.6E} | global batch size: {a.global_batch_size:5d} |"
            if loss > 0:
                line += f" lm loss: {loss:.6E} |"
            averages = {key: sum(v) / len(v) for key, v in self.metrics.items()}
            for key, value in averages.items():      # Megatron prints every reported loss-dict entry this way
                line += f" {key}: {value:.6E} |"
            line += f" loss scale: {loss_scale:.1f} |"
            if grad_norm is not None:      # nan/inf shown as such: the iteration was skipped or stopped
                line += f" grad norm: {grad_norm:.3f} |"
            line += (f" number of skipped iterations: {self.skipped:3d} |"
                     f" number of nan iterations: {self.nans:3d} |")
            print(line, flush=True)
            if self.writer is not None:
                for key, value in (("learning-rate", lr), ("lm loss", loss), ("loss-scale", loss_scale),
                                   ("grad-norm", grad_norm), ("batch-size", a.global_batch_size),
                                   ("throughput", tflops), ("tokens-per-second", tok_s),
                                   ("iteration-time", elapsed), *averages.items()):
                    if value is not None:
                        self.writer.add_scalar(key, value, iteration)
                        self.writer.add_scalar(key + " vs samples", value, consumed)
                self.writer.flush()
        if not self.memory_reported:
            self.memory_reported = True
            report_memory(iteration)
        self.reset()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def report_memory(iteration: int) -> None:
    """Megatron's memory line, on every rank with DP rank 0 (accelerator memory from the device layer; the
    process's resident set on the CPU)."""
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_rank() != 0:
        return
    from mindspeed_llm.platform import memory_stats

    rank = torch.distributed.get_rank()
    mb = 1024 * 1024
    mem = memory_stats()
    stats = (mem["allocated"] / mb, mem["max_allocated"] / mb, mem["reserved"] / mb, mem["max_reserved"] / mb)
    print(f"[Rank {rank}] (after {iteration} iterations) memory (MB) | allocated: {stats[0]:.1f} | "
          f"max allocated: {stats[1]:.1f} | reserved: {stats[2]:.1f} | max reserved: {stats[3]:.1f}", flush=True)


def validation_line(iteration: int, loss: float, metrics: Optional[dict[str, float]] = None) -> str:
    """Megatron's validation block: `KEY value: V | KEY PPL: exp(V) |` for `lm loss` and each extra metric
    (Megatron prints a PPL for every loss-dict entry, meaningful or not; kept so log parsers match)."""
    text = f" validation loss at iteration {iteration} | "
    for key, value in {"lm loss": loss, **(metrics or {})}.items():
        text += f"{key} value: {value:.6E} | {key} PPL: {math.exp(min(20.0, value)):.6E} | "
    bar = "-" * len(text)
    return f"{bar}\n{text}\n{bar}"


def print_args(args: argparse.Namespace) -> None:
    if torch.distributed.get_rank() != 0:
        return
    print("------------------------ MindSpeed-LLM Arguments ------------------------", flush=True)
    for key in sorted(vars(args)):
        print(f"  {key} {'.' * (48 - len(key))} {getattr(args, key)}")
    print("-------------------- end of MindSpeed-LLM Arguments ---------------------", flush=True)
