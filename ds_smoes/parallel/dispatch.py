"""Token-once-per-rank expert-parallel dispatch, and what a dispatch really sends.

Shapes (glossary: `ds_smoes/__init__.py`): S tokens on this rank, K routes per token, D hidden, E experts,
R ranks in the expert-parallel (EP) group, Y (token, rank) rows this rank sends, Z rows it receives,
X fields of a packed row, Q (row, route) pairs; n = E / R experts per rank.

Expert ids here are physical: DeepSpeed's expert index, where the weights live.  Expert e is local
expert e % n of EP rank e // n.  The gate routes in logical ids and maps them to physical ones
before the dispatch (`ModalityGate.routes_for_dispatch`); the two are equal until placement moves
experts onto their bins' ranks.  Only `local_routes` turns them into per-rank local indices.

**rank_once** (dropless, no capacity): a token goes once to every EP rank that holds at least
one of its selected experts, however many of them live there.  That rank runs its experts on
it, sums their gate-weighted outputs and sends back ONE vector per (token, rank); the home rank
sums what comes back.  Three `all_to_all_single` calls with split sizes in the forward:

1. send counts per destination rank (a small int64 tensor; tells every rank what to expect).
   It is started asynchronously and overlaps with packing the rows;
2. the rows: each token vector [Y, D] packed with the token's routes, its K physical expert ids
   (-1 unused) and K combine weights (these carry the router's gradient), as one float32
   [Y, D + 2K] tensor (ids are small integers, exact in float32; for other dtypes the vectors
   travel in their own dtype and the routes in a second, float32, exchange).  A row is the same
   whatever rank it goes to, so it is gathered once; the receiver keeps the routes to its own
   experts (`local_routes`) and zeroes the other weights, which sends their gradient back as 0,
3. the combined vectors [Z, D] back to their home rank.

As many collectives as DeepSpeed's stock path (its gate's capacity all-reduce and two
all-to-alls); the gate skips that all-reduce for rank_once, which needs no common capacity.
The backward runs the same exchanges in reverse (splits swapped) for the packed rows and the
combined vectors.  With one EP rank nothing is exchanged.

**deepspeed** (the stock `MOELayer`): the capacity-padded [E, C, D] buffer goes through an
all-to-all twice (dispatch, combine), whatever the routing.

Accounting counts the bytes a rank *sends to other ranks* in the forward: the chunk addressed to
itself is a local copy inside `all_to_all_single` and never crosses the network.  Summed over
the group, bytes sent equal bytes received.  The backward moves the same token/combine volume
again in reverse for both dispatches; it is not counted here.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from ds_smoes.core.metrics import rank_hit_stats, routes_per_column

INDEX_BYTES = 4   # expert ids travel as float32 (exact for small integers)
WEIGHT_BYTES = 4  # combine weights travel as float32
COUNT_BYTES = 8   # split sizes travel as int64


@dataclass(frozen=True)
class CommVolume:
    """What one MoE forward call of one rank sends to the other EP ranks (bytes) and how it routed.

    dispatch_bytes / combine_bytes: token vectors sent in the dispatch / combine phase.
    metadata_bytes: split counts and the per-row routing (K physical expert ids and K gate weights,
    float32) that rank_once needs besides the vectors; 0 for the stock dispatch, whose slot positions encode
    the expert (its one-int capacity all-reduce in the gate is left out).
    cross_rank_rate: share of tokens with at least one selected expert on another rank;
    ranks_per_token: mean number of distinct ranks holding a token's selected experts;
    both over `num_tokens` (valid, or else routed, tokens of this rank).
    """
    dispatch: str
    dispatch_bytes: int
    combine_bytes: int
    metadata_bytes: int
    cross_rank_rate: float
    ranks_per_token: float
    num_tokens: int

    @property
    def remote_bytes(self) -> int:
        """Token vectors sent to other ranks, dispatch + combine."""
        return self.dispatch_bytes + self.combine_bytes

    @property
    def total_bytes(self) -> int:
        return self.remote_bytes + self.metadata_bytes


# -- pure helpers ---------------------------------------------------------------------------------
def stock_alltoall_bytes(num_experts: int, capacity: int, hidden: int, ep_size: int, element_size: int) -> int:
    """Bytes one rank sends to other ranks in DeepSpeed's MOELayer forward (dispatch + combine).

    Each all-to-all moves the [E, C, D] buffer; the own rank's [E/ep, C, D] chunk stays local.
    """
    if ep_size <= 1:
        return 0
    remote_slots = (num_experts - num_experts // ep_size) * capacity
    return 2 * remote_slots * hidden * element_size


def route_ranks(indices_KS: torch.Tensor, num_local_experts: int) -> torch.Tensor:
    """route_rank_KS: EP rank of every route's physical expert (e // n), -1 for unused routes."""
    return torch.where(indices_KS >= 0, indices_KS.long() // num_local_experts, torch.full_like(indices_KS.long(), -1))


def rank_hits(route_rank_KS: torch.Tensor, ep_size: int) -> torch.Tensor:
    """hits_SR: token s needs rank r (at least one of its routes goes there), for every token with routes,
    padding included (the dispatch sends what the gate routed; the rates count valid tokens only)."""
    return routes_per_column(route_rank_KS, None, ep_size) > 0


def send_plan(hits_SR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows this rank sends, grouped by destination rank, tokens ascending inside a group.

    Returns (token_Y, rank_Y, send_counts_R): row n carries token token_Y[n] to rank rank_Y[n].
    """
    rank_Y, token_Y = hits_SR.T.nonzero(as_tuple=True)
    return token_Y, rank_Y, hits_SR.sum(0).long()


def row_routes(indices_KS: torch.Tensor, gates_KS: torch.Tensor, token_Y: torch.Tensor) -> torch.Tensor:
    """routes_YX [Y, 2K] float32: the routes that travel with each sent row, K combine weights then K physical
    expert ids (-1 unused), gathered from the token's routes (differentiable in the weights)."""
    routes_SX = torch.cat([gates_KS.T.float(), indices_KS.T.float()], dim=1)
    return routes_SX.index_select(0, token_Y)


def local_routes(routes_ZX: torch.Tensor, home_rank: int, num_local_experts: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """What a rank does with the routes of the rows it received: (local_ZK int64, the index into this rank's
    experts of each route's physical expert, -1 where it lives elsewhere or the route is unused; weight_ZK,
    0 there)."""
    k = routes_ZX.shape[1] // 2
    local_ZK = routes_ZX[:, k:].detach().round().long() - home_rank * num_local_experts
    here_ZK = (local_ZK >= 0) & (local_ZK < num_local_experts)
    return torch.where(here_ZK, local_ZK, -1), routes_ZX[:, :k] * here_ZK


def token_rank_stats(hits_SR: torch.Tensor, home_rank: int, valid_S: torch.Tensor) -> tuple[float, float, int]:
    """(cross_rank_rate, ranks_per_token, tokens counted) over the tokens in `valid_S`."""
    st = rank_hit_stats(hits_SR, home_rank, valid_S)
    return float(st["cross_rank_rate"]), float(st["ranks_per_token"]), int(st["num_tokens"])


def rank_once_volume(send_counts_R: Sequence[int], recv_counts_R: Sequence[int], home_rank: int, hidden: int,
                     element_size: int, num_routes: int) -> tuple[int, int, int]:
    """(dispatch_bytes, combine_bytes, metadata_bytes) this rank sends to other ranks.

    Dispatch: one vector per (token, remote rank) pair it sends; combine: one vector back per
    pair it received from another rank; metadata: the counts exchange (one int64 per remote
    rank) and each dispatched row's routing (num_routes expert ids + num_routes weights, 4 bytes each).
    """
    ep_size = len(send_counts_R)
    sent_rows = sum(int(c) for r, c in enumerate(send_counts_R) if r != home_rank)
    returned_rows = sum(int(c) for r, c in enumerate(recv_counts_R) if r != home_rank)
    metadata = (ep_size - 1) * COUNT_BYTES + sent_rows * num_routes * (INDEX_BYTES + WEIGHT_BYTES)
    return sent_rows * hidden * element_size, returned_rows * hidden * element_size, metadata


def stock_volume(num_experts: int, capacity: int, hidden: int, ep_size: int, element_size: int,
                 cross_rank_rate: float, ranks_per_token: float, num_tokens: int) -> CommVolume:
    """CommVolume of DeepSpeed's stock dispatch for one call (the rates come from the routing)."""
    half = stock_alltoall_bytes(num_experts, capacity, hidden, ep_size, element_size) // 2
    return CommVolume("deepspeed", half, half, 0, cross_rank_rate, ranks_per_token, num_tokens)


# -- autograd-aware exchange ------------------------------------------------------------------------
class _AllToAllSingle(torch.autograd.Function):
    """all_to_all_single with split sizes; its backward is the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x, send_counts, recv_counts, group):
        ctx.send_counts, ctx.recv_counts, ctx.group = send_counts, recv_counts, group
        return _exchange(x, send_counts, recv_counts, group)

    @staticmethod
    def backward(ctx, grad):
        return _AllToAllSingle.apply(grad, ctx.recv_counts, ctx.send_counts, ctx.group), None, None, None


def _exchange(x: torch.Tensor, send_counts: list[int], recv_counts: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv_counts, input_split_sizes=send_counts,
                           group=group)
    return out


def all_to_all_rows(x: torch.Tensor, send_counts: list[int], recv_counts: list[int], group) -> torch.Tensor:
    """Exchange rows of `x` (send_counts[r] rows to rank r), differentiable in `x`."""
    return _AllToAllSingle.apply(x, send_counts, recv_counts, group)


def start_count_exchange(send_counts_R: torch.Tensor, group) -> tuple[torch.Tensor, object]:
    """(recv_counts_R, work): how many rows each rank will send here, filled once `work.wait()` returns."""
    recv_counts_R = torch.empty_like(send_counts_R)
    work = dist.all_to_all_single(recv_counts_R, send_counts_R.contiguous(), group=group, async_op=True)
    return recv_counts_R, work


def exchange_rows(x_YD: torch.Tensor, routes_YX: torch.Tensor, send_counts: list[int], recv_counts: list[int],
                  group) -> tuple[torch.Tensor, torch.Tensor]:
    """Send each row's vector and routes; returns the received (x_ZD, routes_ZX), differentiable in x and
    the weights.  float32 vectors travel packed with their routes in one exchange ([Y, D + 2K]); other dtypes
    in two."""
    d = x_YD.shape[1]
    if x_YD.dtype == torch.float32:
        recv_ZX = all_to_all_rows(torch.cat([x_YD, routes_YX], dim=1), send_counts, recv_counts, group)
        return recv_ZX[:, :d], recv_ZX[:, d:]
    return (all_to_all_rows(x_YD, send_counts, recv_counts, group),
            all_to_all_rows(routes_YX, send_counts, recv_counts, group))


# -- expert side --------------------------------------------------------------------------------------
def run_local_experts(x_ZD: torch.Tensor, local_ZK: torch.Tensor, weight_ZK: torch.Tensor,
                      experts: Sequence[nn.Module]) -> torch.Tensor:
    """combined_ZD (float32): per received row, the gate-weighted sum of its local experts' outputs.

    The (row, route) pairs are sorted by local expert, so one gather builds every expert's
    contiguous input and one scatter-add sums the weighted outputs back (as DeepSpeed's padded
    buffer does, without padding).  Every expert runs, on zero rows if nothing reached it, so its
    parameters always get a gradient (zeros rather than None, as with DeepSpeed's padded buffer).
    """
    num_local, k = len(experts), local_ZK.shape[1]
    key_Q = torch.where(local_ZK >= 0, local_ZK.long(), num_local).reshape(-1)  # Q = Z * K (row, route) pairs; unused routes last
    order_Q = torch.argsort(key_Q, stable=True)
    sizes = torch.bincount(key_Q, minlength=num_local + 1).tolist()
    pair_Q = order_Q[:sum(sizes[:num_local])]           # the used (row, route) pairs, grouped by expert
    row_Q = torch.div(pair_Q, k, rounding_mode="floor")
    outs = []
    for expert, chunk_QD in zip(experts, x_ZD.index_select(0, row_Q).split(sizes[:num_local])):
        out_QD = expert(chunk_QD)
        outs.append(out_QD[0] if isinstance(out_QD, tuple) else out_QD)
    weighted_QD = torch.cat(outs).float() * weight_ZK.reshape(-1).index_select(0, pair_Q).unsqueeze(1)
    return x_ZD.new_zeros(x_ZD.shape, dtype=torch.float32).index_add_(0, row_Q, weighted_QD)


# -- the dispatch -----------------------------------------------------------------------------------
def rank_once_moe(x_SD: torch.Tensor, indices_KS: torch.Tensor, gates_KS: torch.Tensor,
                  local_experts: Sequence[nn.Module], num_experts: int, group=None,
                  valid_S: torch.Tensor | None = None) -> tuple[torch.Tensor, CommVolume]:
    """MoE output [S, D] (x's dtype) of the token-once-per-rank dispatch, and its CommVolume.

    indices_KS / gates_KS: the gate's sparse routes (physical expert id or -1; combine weights).
    local_experts: this rank's experts, physical ids rank * n ... rank * n + n - 1.
    group: the EP process group; None (or a 1-rank group) runs everything locally.
    valid_S: the tokens the rates average over (default: tokens with at least one route).
    Tokens without routes get zeros, as in DeepSpeed.
    """
    out_SD, volume = rank_once_dispatch(x_SD, indices_KS, gates_KS, local_experts, num_experts, group, valid_S)
    return out_SD, volume()


@dataclass
class RankOncePlan:
    """Where this rank's rows go, with the count exchange already under way (`plan_rank_once`)."""
    hits_SR: torch.Tensor        # token s needs EP rank r
    token_Y: torch.Tensor        # the token of each row sent, grouped by destination rank
    send_counts_R: torch.Tensor
    recv_counts_R: torch.Tensor  # filled once `counts()` has returned
    _pending: object = None

    def counts(self) -> tuple[list[int], list[int]]:
        """(send, recv) split sizes; waits for the count exchange."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
        return self.send_counts_R.tolist(), self.recv_counts_R.tolist()


def plan_rank_once(indices_KS: torch.Tensor, num_local_experts: int, group=None) -> RankOncePlan:
    """The send plan of the routes `indices_KS` (physical expert ids); starts the count exchange without waiting,
    so that whatever the caller computes next overlaps with it."""
    ep_size = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
    hits_SR = rank_hits(route_ranks(indices_KS, num_local_experts), ep_size)
    token_Y, _, send_counts_R = send_plan(hits_SR)
    if ep_size == 1:
        return RankOncePlan(hits_SR, token_Y, send_counts_R, send_counts_R)
    recv_counts_R, pending = start_count_exchange(send_counts_R, group)
    return RankOncePlan(hits_SR, token_Y, send_counts_R, recv_counts_R, pending)


def rank_once_dispatch(x_SD: torch.Tensor, indices_KS: torch.Tensor, gates_KS: torch.Tensor,
                       local_experts: Sequence[nn.Module], num_experts: int, group=None,
                       valid_S: torch.Tensor | None = None, plan: RankOncePlan | None = None
                       ) -> tuple[torch.Tensor, Callable[[], CommVolume]]:
    """`rank_once_moe` with its CommVolume deferred: returns a function that computes it when called
    (the byte counts are known already; the routing rates cost a few ops and host syncs).

    plan: `plan_rank_once(indices_KS, ...)` started earlier (the layer starts it from inside the gate, so
    the count exchange overlaps with the gate's losses); made here when None."""
    ep_size = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
    home = dist.get_rank(group) if ep_size > 1 else 0
    num_local = len(local_experts)
    if num_local * ep_size != num_experts:
        raise ValueError(f"{num_local} local experts on each of {ep_size} EP ranks do not make the gate's "
                         f"{num_experts} experts")
    if plan is None:
        plan = plan_rank_once(indices_KS, num_local, group)
    token_Y = plan.token_Y
    send_x_YD, routes_YX = x_SD.index_select(0, token_Y), row_routes(indices_KS, gates_KS, token_Y)
    send, recv = plan.counts()
    if ep_size > 1:
        recv_x_ZD, recv_routes_ZX = exchange_rows(send_x_YD, routes_YX, send, recv, group)
        combined_ZD = run_local_experts(recv_x_ZD, *local_routes(recv_routes_ZX, home, num_local), local_experts)
        back_YD = all_to_all_rows(combined_ZD.to(x_SD.dtype), recv, send, group)
    else:
        back_YD = run_local_experts(send_x_YD, *local_routes(routes_YX, 0, num_local), local_experts)

    out_SD = x_SD.new_zeros(x_SD.shape, dtype=torch.float32).index_add_(0, token_Y, back_YD.float())
    volume = partial(_rank_once_comm, send, recv, home, x_SD.shape[1], x_SD.element_size(), indices_KS.shape[0],
                     plan.hits_SR, valid_S)
    return out_SD.to(x_SD.dtype), volume


def _rank_once_comm(send: list[int], recv: list[int], home: int, hidden: int, element_size: int, num_routes: int,
                    hits_SR: torch.Tensor, valid_S: torch.Tensor | None) -> CommVolume:
    dispatch_b, combine_b, meta_b = rank_once_volume(send, recv, home, hidden, element_size, num_routes)
    rate, ranks, n = token_rank_stats(hits_SR, home, hits_SR.any(1) if valid_S is None else valid_S)
    return CommVolume("rank_once", dispatch_b, combine_b, meta_b, rate, ranks, n)
