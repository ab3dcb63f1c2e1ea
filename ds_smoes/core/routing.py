"""Top-k routing to DeepSpeed's sparse routes (the contract of DeepSpeed >= 0.19.4).

`MOELayer` expects, per route k and token s: the expert index (-1 = not dispatched), the slot
in that expert's capacity buffer, and the combine weight, all as [K, S] tensors, plus one
capacity shared by every expert on every expert-parallel rank.  Routing is split in two so
the caller can agree on that capacity across ranks between the steps:
`assign_slots` (local slot numbers and counts), then `finalize_routes` (apply the capacity).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class SparseRoutes:
    indices_KS: torch.Tensor    # int32, expert id or -1 (not dispatched: padding or over capacity)
    locations_KS: torch.Tensor  # int32, slot inside the expert's capacity buffer (0 when not dispatched)
    gates_KS: torch.Tensor      # float32 combine weights (0 when not dispatched)
    counts_E: torch.Tensor      # int64 selections per expert by valid tokens, before capacity drops
    selected_SE: torch.Tensor   # bool, each valid token's selected experts (before capacity drops)

    @property
    def dropped(self) -> torch.Tensor:
        """Routes over capacity (0-dim, on the device)."""
        return self.counts_E.sum() - (self.indices_KS >= 0).sum()

    @property
    def num_dropped(self) -> int:
        return int(self.dropped)


def capacity_for(num_tokens: int, num_experts: int, k: int, capacity_factor: float, min_capacity: int) -> int:
    """GShard-style capacity: ceil(tokens / experts * capacity_factor * k), at least min_capacity."""
    return max(math.ceil(num_tokens / num_experts * capacity_factor * k), min_capacity)


def assign_slots(top_idx_SK: torch.Tensor, valid_S: torch.Tensor, num_experts: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot of every (route, token) in its expert's buffer, route-major (all first choices first).

    An index of -1 in `top_idx_SK` is an unused route (tokens may select different numbers of
    experts, as LTDR's tail tokens do).  Returns (location_KS int64, counts_E int64); padding
    tokens and unused routes get no slot and are not counted.

    Slots come from a stable sort of the routes by expert (no [K, S, E] one-hot, no host sync): a route's
    slot is its position among its expert's routes in route-major order.
    """
    k, num_tokens = top_idx_SK.shape[1], top_idx_SK.shape[0]
    idx_KS = top_idx_SK.T.long()
    live_KS = valid_S.bool().unsqueeze(0) & (idx_KS >= 0)
    key_Q = torch.where(live_KS, idx_KS, num_experts).reshape(-1)   # Q = K * S routes, route-major; dead ones last
    order_Q = torch.sort(key_Q, stable=True).indices
    counts_X = torch.zeros(num_experts + 1, dtype=torch.long, device=key_Q.device).index_add_(
        0, key_Q, torch.ones_like(key_Q))                             # X = E experts + one bin for dead routes
    start_X = counts_X.cumsum(0) - counts_X
    slot_in_order_Q = torch.arange(key_Q.numel(), device=key_Q.device) - start_X.index_select(0, key_Q[order_Q])
    location_Q = torch.empty_like(key_Q).scatter_(0, order_Q, slot_in_order_Q)
    return torch.where(live_KS, location_Q.view(k, num_tokens), 0), counts_X[:num_experts]


def route_counts(top_idx_SK: torch.Tensor, valid_S: torch.Tensor, num_experts: int) -> torch.Tensor:
    """counts_E (int64): selections per expert by valid tokens, what `assign_slots` counts, without the slots
    (a dispatch with no capacity buffer, like rank_once, needs none)."""
    live_SK = valid_S.bool().unsqueeze(1) & (top_idx_SK >= 0)
    column_SK = torch.where(live_SK, top_idx_SK.long(), num_experts)  # one extra bin collects what is not counted
    column_Q = column_SK.reshape(-1)
    return torch.zeros(num_experts + 1, dtype=torch.long, device=column_Q.device).index_add_(
        0, column_Q, torch.ones_like(column_Q))[:num_experts]


def finalize_routes(probs_SE: torch.Tensor, top_idx_SK: torch.Tensor, valid_S: torch.Tensor,
                    location_KS: torch.Tensor, counts_E: torch.Tensor, capacity: int,
                    normalize: bool) -> SparseRoutes:
    """Drop routes beyond `capacity`, compute combine weights, package the sparse routes.

    normalize: renormalise the kept weights of each token to sum to 1 (only meaningful for k > 1:
    with one route the weight would be constant 1 and the router would get no task gradient).
    """
    k = top_idx_SK.shape[1]
    valid_S = valid_S.bool()
    idx_KS = top_idx_SK.T
    used_KS = idx_KS >= 0
    safe_idx_SK = top_idx_SK.clamp_min(0)
    kept_KS = valid_S.unsqueeze(0) & used_KS & (location_KS < capacity)
    gates_KS = probs_SE.gather(1, safe_idx_SK).T * kept_KS
    if normalize and k > 1:
        gates_KS = gates_KS / gates_KS.sum(0, keepdim=True).clamp_min(torch.finfo(probs_SE.dtype).eps)
    selected_SE = (torch.zeros_like(probs_SE).scatter_add_(1, safe_idx_SK, (top_idx_SK >= 0).to(probs_SE.dtype))
                   > 0) & valid_S.unsqueeze(1)
    return SparseRoutes(
        indices_KS=torch.where(kept_KS, idx_KS, torch.full_like(idx_KS, -1)).to(torch.int32),
        locations_KS=(location_KS * kept_KS).to(torch.int32),
        gates_KS=gates_KS.contiguous(),
        counts_E=counts_E.to(torch.int64),
        selected_SE=selected_SE,
    )


def bin_limited_topk(probs_SE: torch.Tensor, bin_E: torch.Tensor, num_bins: int, max_bins: int,
                     k: int) -> torch.Tensor:
    """top_idx_SK: top-k inside each token's `max_bins` bins with the most gate mass (ours, beyond
    the paper; DeepSeek-V3's group-limited routing with bins as groups).

    A bin's gate mass for token s is the sum of s's probabilities over the bin's experts.
    Needs max_bins * (experts per bin) >= k (SMoESConfig checks it).
    """
    bin_E = bin_E.to(probs_SE.device).long()
    mass_SG = probs_SE.new_zeros(probs_SE.shape[0], num_bins).index_add(1, bin_E, probs_SE)
    top_bins_SG = torch.topk(mass_SG, k=max_bins, dim=1).indices
    allowed_SG = torch.zeros_like(mass_SG, dtype=torch.bool).scatter_(1, top_bins_SG, True)
    allowed_SE = allowed_SG[:, bin_E]
    return torch.topk(probs_SE.masked_fill(~allowed_SE, float("-inf")), k=k, dim=1).indices
