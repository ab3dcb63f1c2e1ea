"""What a router did, recorded on the side: per MoE-layer call, each token's modality, validity
and selected experts, as the layer hands them to a `ds_smoes.moe.collector.RoutingCollector` that keeps routes.

From the recorded routes, pure functions compute the router statistics the simulator needs
(`own_route_counts`) and, independently of `ds_smoes.parallel.dispatch`, the bytes each dispatch must
send (`expected_rank_once_dispatch_bytes`, `expected_stock_bytes`), which the benchmark checks against
what the layer reported (`MoECall.comm()`).

Shapes: S tokens, K routes per token, E experts, P physical expert slots, G bins, M = 2 modalities (0 text, 1 vision),
J = K + 1 own-route counts, R EP ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ds_smoes.moe.collector import RoutingCollector


@dataclass
class LayerCall:
    labels_S: torch.Tensor      # 0 text, 1 vision
    valid_S: torch.Tensor       # bool, False for padding
    indices_KS: torch.Tensor    # selected experts as the dispatch gets them (physical ids), -1 unused
    capacity: int               # the gate's (dropless: largest load, agreed over the EP group)


class RouteRecorder:
    """Records the routes of every MoE layer call made inside `with recorder:` (a RoutingCollector that keeps
    each call's routes): `calls[l]` lists layer l's calls since `clear()` as LayerCall (on the host), `moe_calls[l]`
    what the layer reported for them (`ds_smoes.moe.collector.MoECall`: statistics, bytes, CommVolume)."""

    def __init__(self, layers) -> None:
        self.layers = list(layers)
        self._collector = RoutingCollector(self.layers, stats=True, routes=True)
        self.clear()

    def __enter__(self) -> RouteRecorder:
        self._collector.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._collector.__exit__(*exc)
        for l, calls in enumerate(self._collector.take()):
            for call in calls:
                routed = call.routed
                self.calls[l].append(LayerCall(routed.inputs.labels_S.detach().cpu().long(),
                                               routed.valid_S.detach().cpu(),
                                               routed.indices_KS.detach().cpu().long(), int(routed.capacity)))
                call.routed = None   # what is needed is on the host now
                self.moe_calls[l].append(call)

    def clear(self) -> None:
        self.calls: list[list[LayerCall]] = [[] for _ in self.layers]
        self.moe_calls: list[list] = [[] for _ in self.layers]


# -- router statistics (pure) ----------------------------------------------------------------------
def modality_load(calls: list[LayerCall], num_experts: int) -> torch.Tensor:
    """load_ME: routes of valid tokens per (modality, expert id as recorded), summed over calls."""
    load_ME = torch.zeros(2, num_experts, dtype=torch.float64)
    for c in calls:
        keep_KS = (c.indices_KS >= 0) & c.valid_S.unsqueeze(0)
        for m in range(2):
            sel = c.indices_KS[keep_KS & (c.labels_S == m).unsqueeze(0)]
            load_ME[m] += torch.bincount(sel, minlength=num_experts).double()
    return load_ME


def bins_by_physical(bin_E: torch.Tensor, physical_E: torch.Tensor) -> torch.Tensor:
    """bin_of_physical_P: the bin of the expert whose weights sit at physical id p (routes reach the
    dispatch in physical ids; bins are kept per logical expert, see ds_smoes.core.placement)."""
    bin_P = torch.empty_like(bin_E.long())
    bin_P[physical_E.long()] = bin_E.long()
    return bin_P


def own_bins(load_ME: torch.Tensor, bin_E: torch.Tensor, num_bins: int) -> torch.Tensor:
    """own_MG (bool): vision owns the round(pi_v * B) bins (1 .. B - 1) with the largest share of the
    vision routes relative to the text routes (modality-normalised load); text owns the others."""
    load_MG = torch.zeros(2, num_bins, dtype=torch.float64)
    load_MG.index_add_(1, bin_E.long(), load_ME.double())
    total_M = load_MG.sum(1)
    share_MG = load_MG / total_M.clamp_min(1e-300).unsqueeze(1)
    vision_share = float(total_M[1] / total_M.sum().clamp_min(1e-300))
    n_vision = min(num_bins - 1, max(1, round(vision_share * num_bins))) if num_bins > 1 else 1
    vision_bias_G = share_MG[1] - share_MG[0]
    order_G = torch.sort(-vision_bias_G, stable=True).indices  # most vision-biased first
    own_MG = torch.zeros(2, num_bins, dtype=torch.bool)
    own_MG[1, order_G[:n_vision]] = True
    own_MG[0] = ~own_MG[1] if num_bins > 1 else True
    return own_MG


def own_route_counts(calls: list[LayerCall], bin_E: torch.Tensor, own_MG: torch.Tensor,
                     k: int) -> torch.Tensor:
    """counts_MJ: valid tokens of modality m with j of their routes in m's own bins (j = 0 .. k;
    a token with more than k routes, as LTDR's tail tokens, counts in j = k at most)."""
    counts_MJ = torch.zeros(2, k + 1, dtype=torch.float64)
    for c in calls:
        routed_KS = c.indices_KS >= 0
        bin_KS = bin_E.long()[c.indices_KS.clamp_min(0)]
        own_KS = own_MG[c.labels_S.unsqueeze(0).expand_as(bin_KS), bin_KS] & routed_KS
        j_S = own_KS.sum(0).clamp_max(k)
        for m in range(2):
            keep_S = c.valid_S & (c.labels_S == m)
            counts_MJ[m] += torch.bincount(j_S[keep_S], minlength=k + 1)[:k + 1].double()
    return counts_MJ


# -- bytes a dispatch must send, computed from the routes alone (pure) ------------------------------------
def remote_pairs(call: LayerCall, home_rank: int, experts_per_rank: int, valid_only: bool = True) -> int:
    """(token, remote rank) pairs: for every valid (or, with valid_only=False, every routed) token,
    the other ranks that hold one of its experts."""
    tokens = call.valid_S if valid_only else (call.indices_KS >= 0).any(0)
    pairs = 0
    for s in tokens.nonzero().flatten().tolist():
        ranks = {e // experts_per_rank for e in call.indices_KS[:, s].tolist() if e >= 0}
        pairs += len(ranks - {home_rank})
    return pairs


def expected_rank_once_dispatch_bytes(calls: list[LayerCall], home_rank: int, experts_per_rank: int, hidden: int,
                                      element_size: int) -> int:
    """Vectors this rank dispatches: one per (routed token, remote rank) pair.  A gate that routes
    padding (DeepSpeed's top-2 gate ignores the mask) has those tokens sent too.  Summed over the
    group the combine phase returns as many vectors, so the group's remote bytes are twice the sum
    of this over its ranks."""
    pairs = sum(remote_pairs(c, home_rank, experts_per_rank, valid_only=False) for c in calls)
    return pairs * hidden * element_size


def expected_stock_bytes(calls: list[LayerCall], num_experts: int, ep_size: int, hidden: int,
                         element_size: int) -> int:
    """The padded [E, C, D] buffer twice per call, less the own rank's [E/ep, C, D] chunk."""
    remote_experts = num_experts - num_experts // ep_size
    return sum(2 * remote_experts * c.capacity * hidden * element_size for c in calls)


# -- expert work per rank (pure) -----------------------------------------------------------------------
def expert_rows_sent(call: LayerCall, capacity_padded: bool, num_experts: int, ep_size: int) -> torch.Tensor:
    """rows_R (float64): the rows this rank's tokens put in front of each EP rank's experts in this call.

    Not `capacity_padded` (rank_once): one row per route of every routed token (padding a gate routed included,
    as it is dispatched), on the rank that holds the route's expert.  `capacity_padded` (the stock dispatch,
    `ds_smoes.moe.dispatchers`): the capacity-padded buffer,
    whatever the routing: each rank's E/ep experts run on `capacity` rows from every sender, padding
    included.  Summed over the group's ranks (`distributed.world_sum_`), rows_R is the expert work of
    each rank in the call; the busiest rank's is what the whole group waits for."""
    per_rank = num_experts // ep_size
    if not capacity_padded:
        used = call.indices_KS[call.indices_KS >= 0]
        return torch.bincount(used // per_rank, minlength=ep_size)[:ep_size].double()
    return torch.full((ep_size,), float(per_rank * call.capacity), dtype=torch.float64)


def expert_work(rows_QR: torch.Tensor) -> tuple[float, float]:
    """(busiest, mean): the group's expert rows per call, rows_QR [Q = recorded calls, R], summed over the calls, on the busiest
    rank of each call and on the average rank."""
    if rows_QR.numel() == 0:
        return 0.0, 0.0
    return float(rows_QR.max(dim=1).values.sum()), float(rows_QR.mean(dim=1).sum())
