"""Collectives generation needs: pipeline activations, token broadcast inside a model replica, rank agreement."""
from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist

from mindspeed_llm.errors import UserError

T = TypeVar("T")


def world_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_first_stage() -> bool:
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_rank() == 0


def is_last_stage() -> bool:
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_rank() == ps.get_pipeline_model_parallel_world_size() - 1


def recv_from_prev(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    from mindspeed_llm.platform import device_empty

    buf = device_empty(shape, dtype)
    dist.recv(buf, src=ps.get_pipeline_model_parallel_prev_rank())
    return buf.to(device)


def send_to_next(tensor: torch.Tensor) -> None:
    from megatron.core import parallel_state as ps

    from mindspeed_llm.platform import to_comm_device

    dist.send(to_comm_device(tensor.contiguous()), dst=ps.get_pipeline_model_parallel_next_rank())


def replica_group():
    """The ranks that decode the same tokens in step (one model replica): the model-parallel group (TP x PP), or
    with experts split over data-parallel ranks (EP > 1) the expert tensor x expert x pipeline group, which holds
    EP such groups: a MoE layer shares the replica's tokens out over its tensor x expert ranks."""
    from megatron.core import parallel_state as ps

    if ps.get_expert_model_parallel_world_size() > 1:
        return ps.get_expert_tensor_model_pipeline_parallel_group()
    return ps.get_model_parallel_group()


def replica_count_and_index() -> tuple[int, int]:
    """(how many replicas, this rank's replica): the replicas share batches of prompts out."""
    from megatron.core import parallel_state as ps

    if ps.get_expert_model_parallel_world_size() > 1:
        return ps.get_expert_data_parallel_world_size(), ps.get_expert_data_parallel_rank()
    return ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()


class ReplicaBroadcast:
    """Broadcasts from the sampling rank (last pipeline stage, tensor rank 0) to every rank of its model replica
    (`replica_group`).

    Only that rank samples, so TP ranks never have to agree on random draws (the reference relied on identical
    seeds instead) and every rank of the replica holds the same token buffer.
    """

    def __init__(self) -> None:
        from megatron.core import parallel_state as ps

        from mindspeed_llm.platform import device_tensor

        self.group = replica_group()
        self.size = dist.get_world_size(self.group)
        samples = is_last_stage() and ps.get_tensor_model_parallel_rank() == 0
        mark = device_tensor([world_rank() if samples else -1], torch.long, self.group)
        if self.size > 1:
            dist.all_reduce(mark, op=dist.ReduceOp.MAX, group=self.group)
        self.src = int(mark.item())
        self.is_src = self.src == world_rank()      # one of them where the replica spans EP model-parallel groups

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place: `tensor` (the same shape on every rank) takes the sampling rank's value."""
        if self.size > 1:
            from mindspeed_llm.platform import to_comm_device

            buf = to_comm_device(tensor, self.group)
            dist.broadcast(buf, src=self.src, group=self.group)
            if buf is not tensor:
                tensor.copy_(buf)
        return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Python object from global rank `src` to all ranks (world of one: unchanged)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def agree(fn: Callable[[], T]) -> T:
    """Run `fn` on every rank; if it raised a UserError on any rank, raise the first such error on all ranks.

    Keeps the ranks in step when only some of them hit bad input (a missing rank file, say), so nobody waits in
    a collective for a rank that has already exited.
    """
    result: Optional[T] = None
    message: Optional[str] = None
    try:
        result = fn()
    except UserError as exc:
        message = str(exc)
    if dist.is_initialized() and dist.get_world_size() > 1:
        messages: list[Optional[str]] = [None] * dist.get_world_size()
        dist.all_gather_object(messages, message)
        message = next((m for m in messages if m is not None), None)
    if message is not None:
        error = UserError(message)
        error.shared = True     # every rank raises it: rank 0 alone reports it
        raise error
    return result  # type: ignore[return-value]
