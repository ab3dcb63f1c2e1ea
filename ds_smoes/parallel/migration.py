"""Moving experts between expert-parallel ranks: weights and optimizer state, in one exchange.

The plan (which expert goes where) is pure and lives in `ds_smoes.core.placement`; this module
carries it out with a collective.  See that module's docstring for logical and physical ids.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


# -- moving weights and optimizer state ----------------------------------------------------------------
@dataclass(frozen=True)
class MigrationCost:
    """What one layer's migration did, seen from this rank."""
    experts_moved: int      # experts (of the whole layer) whose EP rank changed
    bytes_sent: int         # weights + optimizer state this rank sent to other ranks
    bytes_per_expert: int   # one expert's weights + optimizer state
    seconds: float


def _torch_optimizer(optimizer):
    """The torch optimizer holding per-parameter state (DeepSpeed's engine hands its client optimizer
    through at ZeRO stage 0; a wrapper with an inner torch optimizer is unwrapped)."""
    if optimizer is None or isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        return inner
    raise ValueError(f"{type(optimizer).__name__} is not a torch optimizer: expert migration moves per-parameter "
                     "optimizer state and supports DeepSpeed ZeRO stage 0; set smoes.placement=none")


def _state_keys(optimizer, params: Sequence[nn.Parameter]) -> list[str]:
    """Per-parameter optimizer tensors shaped like the parameter (Adam: exp_avg, exp_avg_sq)."""
    if optimizer is None:
        return []
    keys = sorted(k for k, v in optimizer.state.get(params[0], {}).items()
                  if torch.is_tensor(v) and v.shape == params[0].shape)
    if not keys and len(optimizer.state):
        # the optimizer has state, but not keyed by these parameters: ZeRO's flat partitions
        raise ValueError("the optimizer's state is not kept per expert parameter (DeepSpeed ZeRO stage >= 1 "
                         "flattens it): expert migration supports ZeRO stage 0; set smoes.placement=none")
    for p in params:
        if sorted(k for k, v in optimizer.state.get(p, {}).items() if torch.is_tensor(v) and v.shape == p.shape) != keys:
            raise ValueError("expert parameters carry different optimizer state; cannot migrate them together")
    return keys


@dataclass(frozen=True)
class StackedExperts:
    """Local experts whose parameters are stacked: each parameter is [n, ...] and expert slot i is row i of every
    one (DeepSpeed AutoEP's `GroupedExperts`: w1, w2, w3).  Its optimizer state (Adam's moments, shaped like the
    parameters) moves row by row with the weights."""
    params: tuple[nn.Parameter, ...]

    def __len__(self) -> int:
        return self.params[0].shape[0]


def _slot_params(local_experts, i: int) -> tuple[list[torch.Tensor], int | None]:
    """(the parameters holding expert slot i, the row of slot i in them: None for a module's own parameters)."""
    if isinstance(local_experts, StackedExperts):
        return list(local_experts.params), i
    return list(local_experts[i].parameters()), None


def _slot_tensors(local_experts, i: int, optimizer, keys: list[str]) -> list[torch.Tensor]:
    """Expert slot i's weights, then its optimizer state, as tensors viewing the storage (writable)."""
    params, row = _slot_params(local_experts, i)
    tensors = [p.data for p in params] + [optimizer.state[p][k] for k in keys for p in params]
    return tensors if row is None else [t[row] for t in tensors]


def _pack(local_experts, i: int, optimizer, keys: list[str]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).float() for t in _slot_tensors(local_experts, i, optimizer, keys)])


def _unpack(row: torch.Tensor, local_experts, i: int, optimizer, keys: list[str]) -> None:
    offset = 0
    for t in _slot_tensors(local_experts, i, optimizer, keys):
        n = t.numel()
        t.copy_(row[offset:offset + n].view_as(t))
        offset += n


@torch.no_grad()
def migrate_experts(local_experts: Sequence[nn.Module] | StackedExperts, physical_E: torch.Tensor, new_physical_E: torch.Tensor,
                    group=None, optimizer=None) -> MigrationCost:
    """Move every expert e from physical id `physical_E[e]` to `new_physical_E[e]`, with its optimizer state.

    local_experts: this rank's expert modules (physical ids rank * n ... rank * n + n - 1), all of the
    same architecture, or a `StackedExperts` (slot i is row i of its stacked parameters).
    group: the EP process group (None: one rank holds every expert).
    optimizer: a torch optimizer whose state tensors shaped like the parameters (Adam's two
    moments) move with them; None moves weights only.  Rows travel with one
    `all_to_all_single` with split sizes; the rows a rank keeps never cross the network.
    Gradients are not moved: call this between optimizer steps.
    """
    t0 = time.perf_counter()
    ep_size = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
    rank = dist.get_rank(group) if ep_size > 1 else 0
    num_local = len(local_experts)
    # the plan is host-side bookkeeping, read once per placement (not per step)
    physical_E, new_physical_E = physical_E.long().cpu(), new_physical_E.long().cpu()
    if num_local * ep_size != physical_E.numel():
        raise ValueError(f"{num_local} local experts on {ep_size} ranks do not make {physical_E.numel()} experts")
    optimizer = _torch_optimizer(optimizer)
    keys = _state_keys(optimizer, _slot_params(local_experts, 0)[0])

    # Every rank knows the whole plan: expert e goes from physical id src to dst.
    src_E, dst_E = physical_E, new_physical_E
    order_E = torch.argsort(dst_E)  # rows travel in destination order
    send_rows = [e for e in order_E.tolist() if src_E[e] // num_local == rank]
    recv_rows = [e for e in order_E.tolist() if dst_E[e] // num_local == rank]
    # group by the other end (stable, so destination order holds inside a group)
    send_rows.sort(key=lambda e: int(dst_E[e] // num_local))
    recv_rows.sort(key=lambda e: int(src_E[e] // num_local))
    send_counts = [sum(1 for e in send_rows if dst_E[e] // num_local == r) for r in range(ep_size)]
    recv_counts = [sum(1 for e in recv_rows if src_E[e] // num_local == r) for r in range(ep_size)]

    packed = [_pack(local_experts, int(src_E[e] % num_local), optimizer, keys) for e in send_rows]
    row_len = packed[0].numel() if packed else _pack(local_experts, 0, optimizer, keys).numel()
    device = _slot_params(local_experts, 0)[0][0].device  # collectives run where the weights are (NCCL: the GPU)
    send_EQ = torch.stack(packed) if packed else torch.empty(0, row_len, device=device)  # Q = weights + state, flat
    if ep_size > 1:
        recv_EQ = send_EQ.new_empty(sum(recv_counts), row_len)
        dist.all_to_all_single(recv_EQ, send_EQ.contiguous(), output_split_sizes=recv_counts,
                               input_split_sizes=send_counts, group=group)
    else:
        recv_EQ = send_EQ
    for row, e in zip(recv_EQ, recv_rows):
        _unpack(row, local_experts, int(dst_E[e] % num_local), optimizer, keys)

    moved = int((src_E // num_local != dst_E // num_local).sum())
    remote_rows = sum(c for r, c in enumerate(send_counts) if r != rank)
    bytes_per_expert = row_len * 4
    return MigrationCost(moved, remote_rows * bytes_per_expert, bytes_per_expert, time.perf_counter() - t0)
