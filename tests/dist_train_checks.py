"""torchrun script: several fine-tuning runs and checks in one launch (the process group is kept between them).

Usage: torchrun --nproc_per_node N tests/dist_train_checks.py PLAN.json OUT.json
PLAN.json: [{"name", "kind": "train" | "pretrain" | "packed_vs_unpacked" | "disk_full", "argv": [...], ...}, ...]
("pretrain": the argv of pretrain_gpt.py)
OUT.json (written by the last rank): {name: {"losses": [...], "iteration": n, ...}} or check details.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_train(argv: list[str], pretrain: bool = False) -> dict:
    from mindspeed_llm.arguments import parse_train_args
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from mindspeed_llm.training.loop import train
    from mindspeed_llm.training.resolve_run import resolve_run

    get_moe_layer_wise_logging_tracker().clear()     # megatron's per-layer MoE tracker is sized by the first model
    result = train(resolve_run(parse_train_args(argv, pretrain=pretrain)), keep_process_group=True)
    return {"losses": result.losses, "grad_norms": result.grad_norms, "iteration": result.iteration,
            "metrics": result.metrics, "flops": result.flops}


def packed_vs_unpacked(case: dict) -> dict:
    """Per-sample loss of every segment of packed rows (THD, block-diagonal attention, restarted positions)
    against the same tokens run alone as an ordinary causal batch."""
    from mindspeed_llm.checkpoint import load_checkpoint
    from mindspeed_llm.models import build_model, load_model_config
    from mindspeed_llm.platform import init_distributed
    from mindspeed_llm.training.batching import SFTCollator, get_batch
    from mindspeed_llm.training.loss import IGNORE_INDEX, shift_labels
    from mindspeed_llm.training.sft_dataset import SFTDataOptions, build_sft_datasets

    _, cfg = load_model_config(case["hf_dir"])
    init_distributed(case["tp"], 1)
    model = build_model(cfg, params_dtype=torch.float32)[0]
    load_checkpoint([model], case["mg_dir"])
    opts = SFTDataOptions(seq_length=case["seq_length"], packed=True, neat_pack=True, shuffle=False)
    ds = build_sft_datasets(case["data"], "100,0,0", [case["rows"], 0, 0], opts)[0]
    collate = SFTCollator("packed", case["seq_length"], pad_token_id=0)
    raw = collate([ds[i] for i in range(case["rows"])])
    batch = get_batch(raw)
    worst, segments = 0.0, 0
    with torch.no_grad():
        packed_loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                            packed_seq_params=batch["packed_seq_params"]).reshape(-1)
        mask = batch["loss_mask"].reshape(-1)
        cu = raw["cu_seqlens"].tolist()
        ids_flat, labels_flat = raw["input_ids"].reshape(-1), raw["labels"].reshape(-1)
        for a, b in zip(cu[:-1], cu[1:]):
            if mask[a:b].sum() == 0:
                continue                        # padding tail
            ids = ids_flat[a:b][None]
            labels = shift_labels(labels_flat[a:b][None])
            alone = model(ids, torch.arange(b - a)[None], None, labels=labels).reshape(-1)
            m = (labels.reshape(-1) != IGNORE_INDEX).float()
            per_alone = float((alone * m).sum() / m.sum())
            per_packed = float((packed_loss[a:b] * mask[a:b]).sum() / mask[a:b].sum())
            worst = max(worst, abs(per_alone - per_packed) / abs(per_alone))
            segments += 1
    return {"max_rel_diff": worst, "segments": segments}


def disk_full(case: dict) -> dict:
    """A save that fails with ENOSPC on one rank leaves the previous checkpoint published and no temp dirs."""
    import errno

    from mindspeed_llm.checkpoint import layout
    from mindspeed_llm.errors import UserError

    real = layout.save_rank_file
    rank = torch.distributed.get_rank()

    def failing(tmp_iter_dir, rank_dir, state):
        if state.get("iteration") == case["fail_at"] and rank == 0:   # rank 0 always writes a file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tmp_iter_dir, rank_dir, state)

    layout.save_rank_file = failing
    try:
        run_train(case["argv"])
        message = ""
    except UserError as exc:
        message = str(exc)
    finally:
        layout.save_rank_file = real
    save = Path(case["save"])
    return {"message": message, "tracker": (save / layout.TRACKER).read_text(),
            "entries": sorted(p.name for p in save.iterdir())}


def main(plan_file: str, out_file: str) -> None:
    from mindspeed_llm.logs import setup_logging
    from mindspeed_llm.platform import destroy_distributed

    setup_logging()
    out = {}
    for case in json.load(open(plan_file)):
        kind = case.get("kind", "train")
        if kind in ("train", "pretrain"):
            out[case["name"]] = run_train(case["argv"], pretrain=kind == "pretrain")
        elif kind == "packed_vs_unpacked":
            out[case["name"]] = packed_vs_unpacked(case)
        elif kind == "disk_full":
            out[case["name"]] = disk_full(case)
        torch.distributed.barrier()
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        Path(out_file).write_text(json.dumps(out, indent=1))
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
