"""Megatron's training log line (MindSpeed-LLM format), the validation line, FLOP counting and TensorBoard."""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from mindspeed_llm.training.run_config import RunConfig


# The parallel linears of a transformer layer (megatron names) and the module names on their paths, which
# --lora-modules-to-save may name to train them in full.
_LAYER_LINEAR_PATHS = {"linear_qkv": ("decoder", "layers", "self_attention", "linear_qkv"),
                       "linear_proj": ("decoder", "layers", "self_attention", "linear_proj"),
                       "linear_fc1": ("decoder", "layers", "mlp", "linear_fc1"),
                       "linear_fc2": ("decoder", "layers", "mlp", "linear_fc2")}


def _layer_linear_shapes(cfg, swiglu: bool) -> dict[str, tuple[int, int]]:
    """(input, output) features of each linear of one layer, over all TP ranks."""
    h, ffn, N, G, kv = (cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads, cfg.num_query_groups,
                        cfg.kv_channels)
    return {"linear_qkv": (h, kv * (N + 2 * G)), "linear_proj": (kv * N, h),
            "linear_fc1": (h, ffn * (2 if swiglu else 1)), "linear_fc2": (ffn, h)}


def flops_per_token(cfg, length: int, rho: float, swiglu: bool = True, lora=None) -> float:
    """Megatron's count of one token's training FLOPs (fwd + bwd) in a row of `length` with attention density rho.

    A matmul with weights W costs 2|W| forward, 2|W| for the input gradient and 2|W| for the weight gradient:
    6|W| for trained weights, 4|W| for frozen ones (`lora`, a `models.lora.LoraSpec`: the base is frozen except
    --lora-modules-to-save; each adapter adds 6 r (in + out)). Attention scores and values cost 2 x 2 x length x
    rho x kv x N forward and twice that backward (gradients of activations only). Without LoRA this is
    12*L*h*ffn*g + 12*L*h^2*(1 + G/N + (S/h)*2*rho)*(kv*N/h) + 6*h*V (g = 1.5 with SwiGLU)."""
    L = cfg.num_layers - len(getattr(cfg, "noop_layers", ()))       # noop layers cost nothing
    h, V = cfg.hidden_size, cfg.vocab_size
    shapes = _layer_linear_shapes(cfg, swiglu)
    saved = set(lora.modules_to_save) if lora is not None else set()
    if cfg.tie_word_embeddings and saved & {"word_embeddings", "output_layer"}:
        saved |= {"word_embeddings", "output_layer"}      # tied: one matrix, trained through either name

    def trained(path: tuple[str, ...]) -> bool:
        return lora is None or bool(saved & set(path))

    matmuls = [(n_in * n_out * L, trained(_LAYER_LINEAR_PATHS[name])) for name, (n_in, n_out) in shapes.items()]
    matmuls.append((h * V, trained(("output_layer",))))
    flops = sum((6 if is_trained else 4) * weights for weights, is_trained in matmuls)
    if lora is not None:
        flops += 6 * L * sum(lora.r * (n_in + n_out) for name, (n_in, n_out) in shapes.items()
                             if name in lora.targets)
    return flops + 12 * L * length * rho * 2 * cfg.kv_channels * cfg.num_attention_heads


def flops_per_iteration(cfg, terms: list[tuple[int, int, float]], swiglu: bool = True, lora=None) -> float:
    """`flops_per_token` summed over micro-batches (rows, length, attention density rho): rho = 0.5 for causal
    attention; packed rows use 0.5 * sum(len_i^2) / S^2."""
    return sum(rows * length * flops_per_token(cfg, length, rho, swiglu, lora) for rows, length, rho in terms)


class TrainLog:
    """Accumulates per-iteration values between log lines; prints on the last rank only."""

    def __init__(self, run: RunConfig) -> None:
        self.run = run
        self.is_last = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
        self.reset()
        self.mark = time.time()
        self.writer = None
        self.memory_reported = False
        tensorboard_dir = run.loop.tensorboard_dir
        if tensorboard_dir and self.is_last:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=tensorboard_dir, max_queue=1000)
            except ImportError:
                print(f"WARNING: --tensorboard-dir {tensorboard_dir}: tensorboard is not installed "
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
        run = self.run
        world = torch.distributed.get_world_size()
        # Each TP/PP rank of a replica counted the same batches; flops/tokens are summed over DP already.
        tflops = self.flops / max(self.iters, 1) / (elapsed * 1e12 * world) if elapsed > 0 else 0.0
        tok_s = self.tokens / max(self.iters, 1) / elapsed if elapsed > 0 else 0.0
        loss = sum(self.losses) / len(self.losses) if self.losses else 0.0
        if self.is_last:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            line = (f" [{stamp}] iteration {iteration:8d}/{run.loop.train_iters:8d} |"
                    f" consumed samples: {consumed:12d} | elapsed time per iteration (ms): {elapsed * 1000:.1f} |")
            if run.loop.log_throughput:      # counted from each micro-batch's real shape, padded or not
                rho = 100 * sum(self.rho) / max(len(self.rho), 1)
                line += f" throughput per GPU (TFLOP/s/GPU): {tflops:.1f} | core attn ratio (%): {rho:.1f} |"
            line += f" tokens per second: {tok_s:.1f} |"
            line += f" learning rate: {lr:.6E} | global batch size: {run.batch.global_batch_size:5d} |"
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
                                   ("grad-norm", grad_norm), ("batch-size", run.batch.global_batch_size),
                                   ("throughput", tflops if run.loop.log_throughput else None),
                                   ("tokens-per-second", tok_s),
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


def tracks_load_balancing_loss(config) -> bool:
    """Whether the routers of a model with megatron-core TransformerConfig `config` add (and log) the aux loss."""
    return (getattr(config, "num_moe_experts", None) is not None
            and config.moe_router_load_balancing_type == "aux_loss" and config.moe_aux_loss_coeff > 0)


def load_balancing_loss(cfg, num_microbatches: int) -> float:
    """Megatron's `load_balancing_loss` of the iteration just run: megatron-core's MoE tracker (each router's aux
    loss without its coefficient, from the `ModelConfig` `cfg`'s MoE layers) reduced over the pipeline and data-parallel ranks, summed over the MoE layers,
    divided by their number and by the micro-batch count; the tracker is cleared. Collective: every rank calls it."""
    from megatron.core.transformer.moe.moe_utils import track_moe_metrics

    totals: dict[str, torch.Tensor] = {}
    track_moe_metrics(loss_scale=1.0 / num_microbatches, iteration=0, total_loss_dict=totals, force_initialize=True,
                      track_names=["load_balancing_loss"], num_layers=cfg.num_layers,
                      moe_layer_freq=[int(cfg.is_moe_layer(i)) for i in range(cfg.num_layers)])
    return float(totals["load_balancing_loss"])


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
    """Megatron's validation block: `KEY value: V | KEY PPL: exp(V) |` for `lm loss` and each extra metric. A
    perplexity means something only for a loss (a mean negative log-likelihood), so rewards, log-probabilities and
    accuracies (DPO) get their value alone."""
    text = f" validation loss at iteration {iteration} | "
    for key, value in {"lm loss": loss, **(metrics or {})}.items():
        text += f"{key} value: {value:.6E} | "
        if key.endswith("loss"):
            text += f"{key} PPL: {math.exp(min(20.0, value)):.6E} | "
    bar = "-" * len(text)
    return f"{bar}\n{text}\n{bar}"


def print_args(run: RunConfig) -> None:
    """Megatron's argument dump (rank 0), of the flags only: the parser's destinations, with the values the run
    resolved (the model's shape included)."""
    from mindspeed_llm.arguments import build_train_parser

    if torch.distributed.get_rank() != 0:
        return
    parser = build_train_parser(pretrain=run.stage == "pretrain")
    flags = {action.dest for action in parser._actions if action.dest != "help"}
    values = vars(run.saved_args())
    print("------------------------ MindSpeed-LLM Arguments ------------------------", flush=True)
    for key in sorted(k for k in values if k in flags):
        print(f"  {key} {'.' * (48 - len(key))} {values[key]}")
    print("-------------------- end of MindSpeed-LLM Arguments ---------------------", flush=True)
