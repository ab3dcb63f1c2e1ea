"""Expert placement: move every bin's experts onto the bin's expert-parallel rank.

docs/method.md, "Expert bins": bin b's experts must live on EP rank b * ep_size // N_bins before the
communication a bin saves is real.  Two numbers name an expert here:

- its **logical id** e: what the router's weight rows, the bins, the losses and the metrics use;
- its **physical id** p: where its weights live, in DeepSpeed's layout: physical expert p is
  local expert p % n of EP rank p // n (n = E / ep_size experts per rank).

`physical_E[e]` maps one to the other; it starts as the identity.  The gate computes routes on
logical ids and hands DeepSpeed's dispatch (stock or rank_once) physical ids, so moving an expert
means moving its weights and optimizer state and updating `physical_E`; router rows, bins and
statistics stay where they are.

**When** (our choice, see docs/dispatch.md): adaptive bins are re-cut every `rebin_interval`
steps until `rebin_freeze_step`; the experts are placed **once, when the bins freeze**.  Moving
them at every re-cut would ship weights and both Adam moments of up to all experts every
`rebin_interval` steps while the bins are still settling; freezing first pays that once, and
the bins that count for communication from then on are the final ones.  `migrate_experts`
reports what the move cost (experts moved, bytes sent to other ranks, seconds).

Shapes: E experts (logical ids), P physical expert slots, G bins, R EP ranks; n = E / R experts per rank.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


# -- pure planning ----------------------------------------------------------------------------------
def rank_of_bin(num_bins: int, ep_size: int) -> torch.Tensor:
    """rank_G: the EP rank bin b is placed on, b * ep_size // num_bins."""
    return torch.arange(num_bins) * ep_size // num_bins


def plan_physical(bin_E: torch.Tensor, physical_E: torch.Tensor, num_bins: int, ep_size: int) -> torch.Tensor:
    """new_physical_E: every expert on its bin's rank, moving as few experts as possible.

    An expert already on its bin's rank keeps its physical id; the others take the free ids of their
    target rank in ascending order, in logical-id order.  Every rank ends with exactly n experts
    because each holds num_bins / ep_size bins of E / num_bins experts.
    """
    num_experts = bin_E.numel()
    per_rank = num_experts // ep_size
    target_E = rank_of_bin(num_bins, ep_size)[bin_E.long().cpu()]
    physical_E = physical_E.long().cpu()
    stays_E = physical_E // per_rank == target_E
    new_physical_E = torch.where(stays_E, physical_E, torch.full_like(physical_E, -1))
    for r in range(ep_size):
        taken = set(new_physical_E[stays_E & (target_E == r)].tolist())
        free = [p for p in range(r * per_rank, (r + 1) * per_rank) if p not in taken]
        movers = ((~stays_E) & (target_E == r)).nonzero().squeeze(1).tolist()
        if len(movers) != len(free):
            raise ValueError(f"bins put {len(movers) + len(taken)} experts on EP rank {r}, which has {per_rank} "
                             "experts: every bin must hold num_experts / num_bins experts")
        for e, p in zip(movers, free):
            new_physical_E[e] = p
    return new_physical_E


def bin_ordered_physical(bin_E: torch.Tensor) -> torch.Tensor:
    """physical_E sorted by bin (ties by logical id): bin b takes physical ids [b*N_B, (b+1)*N_B).

    This layout places every bin on its rank for *any* ep_size that divides num_bins, so an
    exported checkpoint can be loaded at a different expert-parallel degree."""
    order_P = torch.sort(bin_E.long().cpu(), stable=True).indices  # physical p holds expert order_P[p]
    physical_E = torch.empty_like(order_P)
    physical_E[order_P] = torch.arange(order_P.numel())
    return physical_E


def is_placed(bin_E: torch.Tensor, physical_E: torch.Tensor, num_bins: int, ep_size: int) -> bool:
    """Every expert sits on its bin's rank."""
    per_rank = bin_E.numel() // ep_size
    target_E = rank_of_bin(num_bins, ep_size)[bin_E.long().cpu()]
    return bool((physical_E.long().cpu() // per_rank == target_E).all())


def to_physical(indices_KS: torch.Tensor, physical_E: torch.Tensor) -> torch.Tensor:
    """Routes in logical ids -> routes in physical ids (-1, an unused route, stays -1)."""
    physical_E = physical_E.to(indices_KS.device)
    moved_KS = physical_E.index_select(0, indices_KS.clamp_min(0).long().reshape(-1)).view(indices_KS.shape)
    return torch.where(indices_KS >= 0, moved_KS.to(indices_KS.dtype), indices_KS)


def counts_to_physical(counts_E: torch.Tensor, physical_E: torch.Tensor) -> torch.Tensor:
    """Per-expert counts in logical order -> in physical order."""
    out_P = torch.zeros_like(counts_E)
    out_P[physical_E.to(counts_E.device).long()] = counts_E
    return out_P


