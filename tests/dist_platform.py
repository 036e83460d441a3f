"""torchrun script (2 ranks, CPU/gloo): megatron-core training machinery through our device layer.

Checks, printing one `CHECK name: OK` line each (any failure raises, so the exit status is non-zero):
  tp2-train  GPTModel at TP=2 through `get_forward_backward_func()` (forward + backward): loss equals the
             transformers loss, gradients are finite and the TP-replicated norm grads agree across ranks;
  pp2-train  the same through the 1F1B pipeline schedule at PP=2 (loss on the last stage);
  ce-tp2     our vocab-parallel cross entropy at TP=2 equals F.cross_entropy over the whole vocabulary;
  packed     a THD packed batch (two samples in one row, `PackedSeqParams`) at TP=2 gives the logits of running
             each sample alone.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def hf_loss(hf_dir: str, ids: torch.Tensor, labels: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ids).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()


def train_step(chunks, ids, labels, micro_batches: int) -> float:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def loss_func(output):
        loss = output.float().mean()
        return loss, {"loss": loss.detach().clone()}

    def forward_step(data_iter, model):
        mb_ids, mb_labels = next(data_iter)
        pos = torch.arange(mb_ids.shape[1]).unsqueeze(0).expand_as(mb_ids)
        return model(mb_ids, pos, None, labels=mb_labels), loss_func

    for c in chunks:
        c.train()
        c.zero_grad()
    mbs = list(zip(ids.chunk(micro_batches), labels.chunk(micro_batches)))
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(mbs), model=chunks, num_microbatches=micro_batches,
        seq_length=ids.shape[1], micro_batch_size=ids.shape[0] // micro_batches, forward_only=False)
    if not ps.is_pipeline_last_stage():
        return float("nan")
    return torch.stack([d["loss"] for d in losses]).mean().item()


def check_grads(chunks) -> None:
    from megatron.core import parallel_state as ps

    for c in chunks:
        for name, p in c.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            if name.endswith("layernorm.weight") and ps.get_tensor_model_parallel_world_size() > 1 \
                    and "q_layernorm" not in name and "k_layernorm" not in name:
                other = p.grad.clone()
                torch.distributed.all_reduce(other, group=ps.get_tensor_model_parallel_group())
                assert torch.allclose(other, p.grad * ps.get_tensor_model_parallel_world_size(), atol=1e-6), name


def check_cross_entropy_tp2() -> None:
    """Our vocab-parallel cross entropy on this rank's half of the vocabulary equals F.cross_entropy over all of
    it (loss and this half's gradient), with blocks of two tokens."""
    from megatron.core import parallel_state as ps

    from mindspeed_llm.models.cross_entropy import vocab_parallel_cross_entropy

    g = torch.Generator().manual_seed(5)
    full = 4 * torch.randn(5, 2, 20, generator=g)
    target = torch.randint(0, 20, (5, 2), generator=g)
    half = slice(10 * ps.get_tensor_model_parallel_rank(), 10 * ps.get_tensor_model_parallel_rank() + 10)
    shard = full[..., half].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, target, ps.get_tensor_model_parallel_group(), block_elements=25)
    loss.sum().backward()
    ref_logits = full.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(ref_logits.flatten(0, 1), target.flatten(), reduction="none")
    ref.sum().backward()
    assert torch.allclose(loss.flatten(), ref, atol=1e-6), (loss, ref)
    assert torch.allclose(shard.grad, ref_logits.grad[..., half], atol=1e-6)
    print("CHECK ce-tp2: OK", flush=True)


def main(hf_dir: str, mg_tp2: str, mg_pp2: str) -> None:
    from megatron.core.packed_seq_params import PackedSeqParams

    from mindspeed_llm.checkpoint import load_checkpoint
    from mindspeed_llm.models import build_model, load_model_config
    from mindspeed_llm.platform import adapt_megatron_for_cpu, init_distributed

    fam, cfg = load_model_config(hf_dir)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg.vocab_size, (4, 10), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (4, 10), generator=g)
    reference = hf_loss(hf_dir, ids, labels)

    plat = init_distributed(2, 1)
    assert plat.device_type == "cpu" and plat.backend == "gloo"
    assert torch.distributed.get_backend() == "gloo"
    assert torch.zeros(2).type() == "torch.cuda.FloatTensor"
    adapt_megatron_for_cpu()   # idempotent
    chunks = build_model(cfg)
    load_checkpoint(chunks, mg_tp2)
    loss = train_step(chunks, ids, labels, micro_batches=2)
    assert abs(loss - reference) < 1e-4, (loss, reference)
    check_grads(chunks)
    print(f"CHECK tp2-train: OK loss {loss:.6f} (transformers {reference:.6f})", flush=True)
    check_cross_entropy_tp2()

    # packed THD batch vs each sample alone (TP=2, eval)
    chunks[0].eval()
    a, b = ids[0, :6], ids[1, :4]
    with torch.no_grad():
        alone = [chunks[0](x[None], torch.arange(len(x))[None], None) for x in (a, b)]
        packed_ids = torch.cat([a, b])[None]
        pos = torch.cat([torch.arange(6), torch.arange(4)])[None]
        cu = torch.tensor([0, 6, 10], dtype=torch.int32)
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=6, max_seqlen_kv=6)
        packed = chunks[0](packed_ids, pos, None, packed_seq_params=params)
    diff = max((packed[0, :6] - alone[0][0]).abs().max().item(), (packed[0, 6:] - alone[1][0]).abs().max().item())
    assert diff < 1e-5, diff
    print(f"CHECK packed: OK max-abs {diff:.2e}", flush=True)

    init_distributed(1, 2)
    chunks = build_model(cfg)
    load_checkpoint(chunks, mg_pp2)
    loss = train_step(chunks, ids, labels, micro_batches=2)
    from megatron.core import parallel_state as ps

    if ps.is_pipeline_last_stage():
        assert abs(loss - reference) < 1e-4, (loss, reference)
    check_grads(chunks)
    print(f"CHECK pp2-train: OK (rank {torch.distributed.get_rank()})", flush=True)
    torch.distributed.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:4])
