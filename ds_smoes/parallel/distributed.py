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


def collective_device() -> torch.device:
    """The device this rank's collectives run on when no model tensor is at hand: the accelerator's current device
    (a GPU under NCCL, which rejects CPU tensors), the CPU without a process group."""
    if not is_distributed():
        return torch.device("cpu")
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def world_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks in place (identity on one process) and return it.

    The all-reduce runs on the collective device: a host-side tally (evaluation counts, a logging window's
    figures) travels there and back, since NCCL takes device tensors only; a tensor already there (the step
    updates' statistics) does not move."""
    return _world_reduce_(tensor, dist.ReduceOp.SUM) if is_distributed() else tensor


def world_max_(tensor: torch.Tensor) -> torch.Tensor:
    """`world_sum_` with the maximum (e.g. the slowest rank's timings)."""
    return _world_reduce_(tensor, dist.ReduceOp.MAX) if is_distributed() else tensor


def _world_reduce_(tensor: torch.Tensor, op) -> torch.Tensor:
    if dist.get_world_size() > 1:
        device = collective_device()
        if tensor.device == device:
            dist.all_reduce(tensor, op=op)
        else:
            on_device = tensor.to(device)
            dist.all_reduce(on_device, op=op)
            tensor.copy_(on_device)
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


def first_message(message: str | None) -> str | None:
    """Every rank's `message` (e.g. an error this rank found, or None) gathered; the lowest rank's that is not None,
    the same on every rank, so that every rank can stop with one message a rank-0 print shows.  A collective."""
    if not is_distributed() or dist.get_world_size() == 1:
        return message
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, message)
    return next((m for m in gathered if m is not None), None)
