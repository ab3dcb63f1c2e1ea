"""Token-once-per-rank expert-parallel dispatch, and what a dispatch really sends.

Shapes (glossary: `ds_smoes/__init__.py`): S tokens on this rank, K routes per token, D hidden, E experts,
R ranks in the expert-parallel (EP) group, Y (token, rank) rows this rank sends, Z rows it receives,
X fields of a packed row, Q (row, route) or (rank, token) pairs; n = E / R experts per rank.

Expert ids here are physical: DeepSpeed's expert index, where the weights live.  Expert e is local
expert e % n of EP rank e // n.  The gate routes in logical ids and maps them to physical ones
before the dispatch (`ModalityGate.routes_for_dispatch`); the two are equal until placement moves
experts onto their bins' ranks.  Only `local_routes` turns them into per-rank local indices.

**rank_once** (dropless, no capacity): a token goes once to every EP rank that holds at least
one of its selected experts, however many of them live there.  That rank runs its experts on
it, sums their gate-weighted outputs and sends back ONE vector per (token, rank); the home rank
sums what comes back.  Three `all_to_all_single` calls with split sizes in the forward:

1. send counts per destination rank (a small int64 tensor; tells every rank what to expect).
   It is started asynchronously (`plan_rank_once`; the layer starts it between the router's routes and
   its losses, so it overlaps with the losses);
2. the rows: each token vector [Y, D] packed with the token's routes, its K physical expert ids
   (-1 unused) and K combine weights (these carry the router's gradient), in ONE tensor of the
   vectors' dtype.  The routes are float32 (ids are small integers, exact in float32) and travel as
   their bytes: `pack_rows` reinterprets the [Y, 2K] float32 routes as 8K / element_size columns of
   the vectors' dtype ([Y, D + 2K] in float32, [Y, D + 4K] in bf16 or fp16), `unpack_rows` recovers
   them bit-exactly.  The exchange is one autograd function (`exchange_rows`) whose backward sends
   the float32 gradient of the weights back the same way, so the router's gradient is that of the
   float32 weights whatever the vectors' dtype.  A row is the same whatever rank it goes to, so it is
   gathered once; the receiver keeps the routes to its own experts (`local_routes`) and zeroes the
   other weights, which sends their gradient back as 0,
3. the combined vectors [Z, D] back to their home rank.

As many collectives as DeepSpeed's stock path (its gate's capacity all-reduce and two
all-to-alls); the gate skips that all-reduce for rank_once, which needs no common capacity.
The backward runs the same exchanges in reverse (splits swapped) for the packed rows and the
combined vectors.  With one EP rank nothing is exchanged, and the experts run on the tokens themselves
(no gather of rows, no packing, no scatter back: the same pairs in the same order, bit-identical).

Host syncs (each stalls a GPU stream; `ds_smoes.testing.host_syncs` counts them): only sizes are read on
the host, the split sizes of the exchanges and, for expert modules of no recognised kind, how many (row, route)
pairs each local expert runs (those run in a loop over host-sized chunks).  Recognised experts (the built-in mlp,
Hugging Face's GatedExpert) run as one grouped matmul per projection whose offsets stay on the device
(`ds_smoes.parallel.grouped_experts`).  Rows are ordered by a sort and sliced with the row count the split sizes
give, counts are sums and scatter-adds, so a forward + backward reads the host once with one EP rank (send counts
and experts' sizes in one read) and, with several, once for grouped experts (send and recv counts in one read)
and twice for a loop over modules (the experts' sizes of the received rows too, known only once they have
arrived).  The backward reads nothing.

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
from ds_smoes.parallel import expert_kernels
from ds_smoes.parallel.grouped_experts import GroupedExperts

INDEX_BYTES = 4   # expert ids travel as float32 bits (exact for small integers), whatever the vectors' dtype
WEIGHT_BYTES = 4  # combine weights travel as float32 bits, whatever the vectors' dtype
COUNT_BYTES = 8   # split sizes travel as int64


@dataclass(frozen=True)
class CommVolume:
    """What one MoE forward call of one rank sends to the other EP ranks (bytes) and how it routed.

    dispatch_bytes / combine_bytes: token vectors sent in the dispatch / combine phase.
    metadata_bytes: split counts and the per-row routing (K physical expert ids and K gate weights, float32
    bits packed into the row whatever its dtype) that rank_once needs besides the vectors; 0 for the stock
    dispatch, whose slot positions encode the expert (its one-int capacity all-reduce in the gate is left out).
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


def send_order(hits_SR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (rank, token) pair, the rows to send first, without reading anything on the host.

    Returns (token_Q, rank_Q, send_counts_R), Q = R * S pairs: the first sum(send_counts_R) are the rows this
    rank sends, grouped by destination rank, tokens ascending inside a group (a stable sort of "not sent"
    over the rank-major pairs); the pairs not sent follow.  The caller slices with the row count it reads
    together with the split sizes (`nonzero` would read it on its own)."""
    num_tokens = hits_SR.shape[0]
    order_Q = torch.argsort((~hits_SR.T).reshape(-1).to(torch.uint8), stable=True)  # Q = R * S, rank-major
    return order_Q % max(num_tokens, 1), torch.div(order_Q, max(num_tokens, 1), rounding_mode="floor"), \
        hits_SR.sum(0).long()


def send_plan(hits_SR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows this rank sends, grouped by destination rank, tokens ascending inside a group.

    Returns (token_Y, rank_Y, send_counts_R): row n carries token token_Y[n] to rank rank_Y[n].
    Reads the row count on the host (one sync); the dispatch uses `send_order` and reads it with the split sizes.
    """
    token_Q, rank_Q, send_counts_R = send_order(hits_SR)
    num_rows = int(send_counts_R.sum())
    return token_Q[:num_rows], rank_Q[:num_rows], send_counts_R


def row_routes(indices_KS: torch.Tensor, gates_KS: torch.Tensor, token_Y: torch.Tensor) -> torch.Tensor:
    """routes_YX [Y, 2K] float32: the routes that travel with each sent row, K combine weights then K physical
    expert ids (-1 unused), gathered from the token's routes (differentiable in the weights)."""
    routes_SX = torch.cat([gates_KS.T.float(), indices_KS.T.float()], dim=1)
    return routes_SX.index_select(0, token_Y)


def pack_rows(x_YD: torch.Tensor, routes_YX: torch.Tensor) -> torch.Tensor:
    """packed_YX [Y, D + 8K / element_size] in x's dtype: each vector followed by the bytes of its float32 routes
    ([Y, 2K]) reinterpreted as x's dtype ([Y, D + 2K] for float32, [Y, D + 4K] for bf16 / fp16).  Bit-exact and
    not differentiable (a dtype reinterpretation): `exchange_rows` carries the gradient."""
    return torch.cat([x_YD, routes_YX.float().contiguous().view(x_YD.dtype)], dim=1)


def unpack_rows(packed_ZX: torch.Tensor, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_ZD, routes_ZX float32 [Z, 2K]): the inverse of `pack_rows`, the routes' bits unchanged."""
    return packed_ZX[:, :hidden], packed_ZX[:, hidden:].contiguous().view(torch.float32)


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


class _ExchangeRows(torch.autograd.Function):
    """Vectors and their float32 routes in one all_to_all_single (`pack_rows`), differentiable in both.

    The packed tensor never reaches autograd: nothing can add to its reinterpreted columns (an accumulated
    gradient would add bf16 numbers that are really halves of float32 ones).  The backward is the same
    exchange with the splits swapped, the routes' float32 gradient packed the same way, so the weights get
    exactly the float32 gradient the receiver computed, whatever the vectors' dtype (and double backward works).
    """

    @staticmethod
    def forward(ctx, x_YD, routes_YX, send_counts, recv_counts, group):
        ctx.send_counts, ctx.recv_counts, ctx.group = send_counts, recv_counts, group
        return unpack_rows(_exchange(pack_rows(x_YD, routes_YX), send_counts, recv_counts, group), x_YD.shape[1])

    @staticmethod
    def backward(ctx, grad_x_ZD, grad_routes_ZX):
        grad_x_YD, grad_routes_YX = _ExchangeRows.apply(grad_x_ZD, grad_routes_ZX, ctx.recv_counts, ctx.send_counts,
                                                        ctx.group)
        return grad_x_YD, grad_routes_YX, None, None, None


def exchange_rows(x_YD: torch.Tensor, routes_YX: torch.Tensor, send_counts: list[int], recv_counts: list[int],
                  group) -> tuple[torch.Tensor, torch.Tensor]:
    """Send each row's vector and float32 routes in ONE exchange, whatever x's dtype; returns the received
    (x_ZD in x's dtype, routes_ZX float32), differentiable in x and the weights."""
    return _ExchangeRows.apply(x_YD, routes_YX.float(), send_counts, recv_counts, group)


# -- expert side --------------------------------------------------------------------------------------
def expert_pair_counts(local_ZK: torch.Tensor, num_local_experts: int) -> torch.Tensor:
    """[n + 1] int64: how many (row, route) pairs go to each local expert, unused routes (-1) last; a scatter-add,
    no host sync (`bincount` would size its output on the host)."""
    key_Q = torch.where(local_ZK >= 0, local_ZK.long(), num_local_experts).reshape(-1)  # Q = Z * K (row, route) pairs
    return torch.zeros(num_local_experts + 1, dtype=torch.long, device=local_ZK.device).index_add_(
        0, key_Q, torch.ones_like(key_Q))


@dataclass(frozen=True)
class ExpertRunner:
    """Local experts that run as one module on rows grouped by expert: `run(x_QD, sizes) -> out_QD`, rows of
    expert i being the i-th of `sizes` (host ints) contiguous groups.  How experts laid out elsewhere than as
    modules (DeepSpeed AutoEP's stacked `GroupedExperts`, `ds_smoes.moe.autoep`) take part in the dispatch."""
    num_local: int
    run: Callable[[torch.Tensor, list[int]], torch.Tensor]

    def __len__(self) -> int:
        return self.num_local


def _run_with_runner(x_ZD: torch.Tensor, local_ZK: torch.Tensor, weight_ZK: torch.Tensor, runner: ExpertRunner,
                     sizes: Sequence[int] | None) -> torch.Tensor:
    """`run_local_experts` for an ExpertRunner: the used (row, route) pairs, grouped by expert, in one call."""
    num_local, k = runner.num_local, local_ZK.shape[1]
    key_Q = torch.where(local_ZK >= 0, local_ZK.long(), num_local).reshape(-1)
    order_Q = torch.argsort(key_Q, stable=True)
    if sizes is None:
        sizes = expert_pair_counts(local_ZK, num_local)[:num_local].tolist()  # host sync: the experts' sizes
    sizes = [int(n) for n in sizes[:num_local]]
    order_Q = order_Q[:sum(sizes)]
    row_Q = torch.div(order_Q, k, rounding_mode="floor")
    out_QD = runner.run(x_ZD.index_select(0, row_Q), sizes)
    weighted_QD = out_QD.float() * weight_ZK.reshape(-1).index_select(0, order_Q).unsqueeze(1)
    return x_ZD.new_zeros(x_ZD.shape, dtype=torch.float32).index_add_(0, row_Q, weighted_QD)


def run_local_experts(x_ZD: torch.Tensor, local_ZK: torch.Tensor, weight_ZK: torch.Tensor,
                      experts: Sequence[nn.Module] | ExpertRunner, sizes: Sequence[int] | None = None,
                      kernel: str = "auto") -> torch.Tensor:
    """combined_ZD (float32): per received row, the gate-weighted sum of its local experts' outputs.

    The (row, route) pairs are sorted by local expert, so one gather builds every expert's
    contiguous input and one scatter-add sums the weighted outputs back (as DeepSpeed's padded
    buffer does, without padding).  Every expert runs, on zero rows if nothing reached it, so its
    parameters always get a gradient (zeros rather than None, as with DeepSpeed's padded buffer).

    kernel: how the experts run (`ds_smoes.parallel.expert_kernels`: grouped, segments, modules, or "auto", the
    fastest measured for this device, dtype and shape).  The grouped kernel needs no host read of its own (the
    offsets are the cumsum of the on-device counts); segments and modules need the experts' sizes on the host.
    sizes: the pairs each local expert gets (`expert_pair_counts(local_ZK, n)[:n]`) when the caller has read
    them already (then only the used pairs are gathered); else the kernels that need them read them here (the
    one host sync of this function) and the grouped kernel runs on every pair, the unused ones masked.
    experts: an `ExpertRunner` runs its experts its own way, on the used pairs (sizes read here if not given).
    """
    if isinstance(experts, ExpertRunner):
        return _run_with_runner(x_ZD, local_ZK, weight_ZK, experts, sizes)
    num_local, k = len(experts), local_ZK.shape[1]
    key_Q = torch.where(local_ZK >= 0, local_ZK.long(), num_local).reshape(-1)  # Q = Z * K (row, route) pairs; unused routes last
    order_Q = torch.argsort(key_Q, stable=True)
    grouped = GroupedExperts.of(experts)
    counts_E = expert_pair_counts(local_ZK, num_local)[:num_local]
    options = expert_kernels.applicable(None if grouped is None else grouped.kind,
                                        grouped is not None and grouped.native(x_ZD))
    key = expert_kernels.probe_key(x_ZD, None if grouped is None else grouped.kind, experts)
    choice = expert_kernels.known(kernel, key, options)
    if sizes is None and choice != "grouped":
        sizes = counts_E.tolist()  # host sync: the experts' sizes (segments, modules, or the probe of all three)
    if sizes is not None:
        sizes = list(sizes[:num_local])
        order_Q = order_Q[:sum(sizes)]             # the used (row, route) pairs, grouped by expert
    sorted_key_Q = key_Q.index_select(0, order_Q)
    expert_Q = sorted_key_Q.clamp(max=num_local - 1)
    row_Q = torch.div(order_Q, k, rounding_mode="floor")
    runners = {
        # every pair when the sizes are unknown: the used ones first, rows past them masked
        "grouped": lambda x_QD: grouped(x_QD, counts_E, expert_Q,
                                        None if sizes is not None else (sorted_key_Q < num_local).unsqueeze(1)),
        "segments": lambda x_QD: grouped(x_QD, counts_E, expert_Q, host_counts=sizes),
        "modules": lambda x_QD: _module_loop(experts, x_QD, sizes),
    }
    x_QD = x_ZD.index_select(0, row_Q)
    if choice is None:
        choice = expert_kernels.probe(key, x_QD, experts, {name: runners[name] for name in options})
    out_QD = runners[choice](x_QD)
    weighted_QD = out_QD.float() * weight_ZK.reshape(-1).index_select(0, order_Q).unsqueeze(1)
    return x_ZD.new_zeros(x_ZD.shape, dtype=torch.float32).index_add_(0, row_Q, weighted_QD)


def _module_loop(experts: Sequence[nn.Module], x_QD: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Each expert module on its rows (`sizes` of them, in order)."""
    outs = []
    for expert, chunk_QD in zip(experts, x_QD.split(list(sizes))):
        out_QD = expert(chunk_QD)
        outs.append(out_QD[0] if isinstance(out_QD, tuple) else out_QD)
    return torch.cat(outs)


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
    """Where this rank's rows go, with the count exchange already under way (`plan_rank_once`).

    Its host values are read together, in one sync, on first use: the send and recv split sizes (the same
    list with one EP rank) and, with one EP rank, how many (row, route) pairs each expert runs."""
    hits_SR: torch.Tensor        # token s needs EP rank r
    token_Q: torch.Tensor | None  # Q = R * S (rank, token) pairs, the rows to send first (`send_order`); with
                                  # one EP rank made on first use only (the dispatch there sends no rows)
    send_counts_R: torch.Tensor
    recv_counts_R: torch.Tensor  # filled once the count exchange is done (`counts()` waits for it)
    expert_pairs_E: torch.Tensor | None = None  # one EP rank: the (row, route) pairs of each expert
    _pending: object = None
    _host: tuple | None = None   # (send, recv, expert sizes or None), once read

    def _read(self) -> tuple[list[int], list[int], list[int] | None]:
        if self._host is None:
            if self._pending is not None:
                self._pending.wait()
                self._pending = None
            own = self.recv_counts_R is self.send_counts_R  # one EP rank: nothing exchanged, read once
            parts = [self.send_counts_R, *([] if own else [self.recv_counts_R]),
                     *([] if self.expert_pairs_E is None else [self.expert_pairs_E])]
            values = torch.cat(parts).tolist()  # host sync: every size the dispatch needs before its exchange
            r = self.send_counts_R.shape[0]
            send, rest = values[:r], values[r:]
            recv, rest = (send, rest) if own else (rest[:r], rest[r:])
            self._host = (send, recv, rest if self.expert_pairs_E is not None else None)
        return self._host

    def counts(self) -> tuple[list[int], list[int]]:
        """(send, recv) split sizes; waits for the count exchange (read on the host once, with `expert_sizes`)."""
        send, recv, _ = self._read()
        return send, recv

    def expert_sizes(self) -> list[int] | None:
        """With one EP rank, the (row, route) pairs each expert runs (read with the split sizes); else None."""
        return self._read()[2]

    @property
    def token_Y(self) -> torch.Tensor:
        """The token of each row sent, grouped by destination rank (sliced with the row count the split sizes give)."""
        if self.token_Q is None:
            self.token_Q = send_order(self.hits_SR)[0]
        return self.token_Q[:sum(self.counts()[0])]


def plan_rank_once(indices_KS: torch.Tensor, num_local_experts: int, group=None) -> RankOncePlan:
    """The send plan of the routes `indices_KS` (physical expert ids); starts the count exchange without waiting,
    so that whatever the caller computes next overlaps with it.  Reads nothing on the host."""
    ep_size = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
    hits_SR = rank_hits(route_ranks(indices_KS, num_local_experts), ep_size)
    if ep_size == 1:  # every expert is local: their input sizes are known now and read with the send counts
        expert_pairs_E = expert_pair_counts(indices_KS, num_local_experts)[:num_local_experts]
        send_counts_R = hits_SR.sum(0).long()   # what `send_order` counts, without its sort of the rows
        return RankOncePlan(hits_SR, None, send_counts_R, send_counts_R, expert_pairs_E)
    token_Q, _, send_counts_R = send_order(hits_SR)
    recv_counts_R, pending = start_count_exchange(send_counts_R, group)
    return RankOncePlan(hits_SR, token_Q, send_counts_R, recv_counts_R, None, pending)


def rank_once_dispatch(x_SD: torch.Tensor, indices_KS: torch.Tensor, gates_KS: torch.Tensor,
                       local_experts: Sequence[nn.Module] | ExpertRunner, num_experts: int, group=None,
                       valid_S: torch.Tensor | None = None, plan: RankOncePlan | None = None,
                       kernel: str = "auto") -> tuple[torch.Tensor, Callable[[], CommVolume]]:
    """`rank_once_moe` with its CommVolume deferred: returns a function that computes it when called
    (the byte counts are known already; the routing rates cost a few ops and host syncs).

    plan: `plan_rank_once(indices_KS, ...)` started earlier (the layer starts it between the router's routes and
    its losses, so the count exchange overlaps with the losses); made here when None.
    kernel: how the local experts run (`run_local_experts`)."""
    ep_size = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
    home = dist.get_rank(group) if ep_size > 1 else 0
    num_local = len(local_experts)
    if num_local * ep_size != num_experts:
        raise ValueError(f"{num_local} local experts on each of {ep_size} EP ranks do not make the gate's "
                         f"{num_experts} experts")
    if plan is None:
        plan = plan_rank_once(indices_KS, num_local, group)
    send, recv = plan.counts()  # host sync 1: the split sizes (with one EP rank, the experts' sizes too)
    volume = partial(_rank_once_comm, send, recv, home, x_SD.shape[1], x_SD.element_size(), indices_KS.shape[0],
                     plan.hits_SR, valid_S)
    if ep_size == 1:
        # every expert is local and nothing is exchanged: the experts run on the tokens themselves, without the
        # rows' gather, packing and scatter back (the same pairs in the same order: bit-identical)
        out_SD = run_local_experts(x_SD, indices_KS.T, gates_KS.T, local_experts, plan.expert_sizes(), kernel)
        return out_SD.to(x_SD.dtype), volume
    token_Y = plan.token_Y
    send_x_YD, routes_YX = x_SD.index_select(0, token_Y), row_routes(indices_KS, gates_KS, token_Y)
    recv_x_ZD, recv_routes_ZX = exchange_rows(send_x_YD, routes_YX, send, recv, group)
    # host sync 2 (segment or module loop only): the sizes of the received rows' experts, known once they arrived
    combined_ZD = run_local_experts(recv_x_ZD, *local_routes(recv_routes_ZX, home, num_local), local_experts,
                                    kernel=kernel)
    back_YD = all_to_all_rows(combined_ZD.to(x_SD.dtype), recv, send, group)
    out_SD = x_SD.new_zeros(x_SD.shape, dtype=torch.float32).index_add_(0, token_Y, back_YD.float())
    return out_SD.to(x_SD.dtype), volume


def _rank_once_comm(send: list[int], recv: list[int], home: int, hidden: int, element_size: int, num_routes: int,
                    hits_SR: torch.Tensor, valid_S: torch.Tensor | None) -> CommVolume:
    dispatch_b, combine_b, meta_b = rank_once_volume(send, recv, home, hidden, element_size, num_routes)
    rate, ranks, n = token_rank_stats(hits_SR, home, hits_SR.any(1) if valid_S is None else valid_S)
    return CommVolume("rank_once", dispatch_b, combine_b, meta_b, rate, ranks, n)
