"""Thin helpers over torch.distributed that degrade to no-ops on a single process."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks in place (identity on one process) and return it."""
    if is_distributed() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def group_max_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Maximum of `tensor` over a process group, in place (itself without one); on the tensor's device, as
    NCCL requires."""
    if group is not None and is_distributed() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


def group_rank(group=None) -> int:
    if not is_distributed():
        return 0
    return dist.get_rank(group) if group is not None else dist.get_rank()


def barrier() -> None:
    if is_distributed():
        dist.barrier()
