"""Invariants of the method core, as property tests (hypothesis): random small routings, each test
derandomized (the same examples on every run) and bounded (a few dozen examples, no deadline).

- slots: for every expert, the slots of the routes sent to it are exactly 0..count-1, in route-major order;
- combine weights: with `normalize`, the kept weights of a token sum to 1 (0 when all its routes dropped);
- placement: a plan is a permutation putting every bin on its rank, keeping experts already there;
- mutual information: 0 <= I_i <= log 2 per sample, and the fused loss equals the reference;
- rank_once: the dispatch (one process, and the pure pieces of R ranks simulated) equals a loop over routes.

The hand-computed cases of the same functions are in test_routing, test_placement, test_losses,
test_fused_losses and test_dispatch.
"""
from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from ds_smoes.core import fused_losses, losses
from ds_smoes.core.placement import (bin_ordered_physical, counts_to_physical, is_placed, plan_physical, rank_of_bin,
                                     to_physical)
from ds_smoes.core.routing import assign_slots, finalize_routes, route_counts
from ds_smoes.parallel.dispatch import (local_routes, rank_hits, rank_once_moe, route_ranks, row_routes,
                                        run_local_experts, send_plan)

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
FEW = settings(PROPERTY, max_examples=25)  # the ones that run modules (experts, autograd)

LOGIT = st.floats(-4.0, 4.0, allow_nan=False, width=32)


# -- strategies -----------------------------------------------------------------------------------------
@st.composite
def routings(draw, max_tokens=10, max_experts=5, max_routes=3, unused=True):
    """(top_idx_SK int64 with -1 = unused route, valid_S bool, num_experts)."""
    num_experts = draw(st.integers(1, max_experts))
    k = draw(st.integers(1, max_routes))
    num_tokens = draw(st.integers(0, max_tokens))
    low = -1 if unused else 0
    idx = draw(st.lists(st.lists(st.integers(low, num_experts - 1), min_size=k, max_size=k),
                        min_size=num_tokens, max_size=num_tokens))
    valid = draw(st.lists(st.booleans(), min_size=num_tokens, max_size=num_tokens))
    top_idx_SK = torch.tensor(idx, dtype=torch.int64).reshape(num_tokens, k)
    return top_idx_SK, torch.tensor(valid, dtype=torch.bool), num_experts


@st.composite
def probs(draw, num_tokens: int, num_experts: int, dtype=torch.float32):
    """A router softmax [S, E] from bounded logits (so no probability is below float32's eps)."""
    logits = draw(st.lists(LOGIT, min_size=num_tokens * num_experts, max_size=num_tokens * num_experts))
    return torch.tensor(logits, dtype=dtype).reshape(num_tokens, num_experts).softmax(-1)


@st.composite
def layouts(draw):
    """(bin_E with every bin holding the same number of experts, num_bins, ep_size)."""
    ep_size = draw(st.integers(1, 4))
    num_bins = ep_size * draw(st.integers(1, 3))
    per_bin = draw(st.integers(1, 3))
    order = draw(st.permutations(range(num_bins * per_bin)))
    bin_E = torch.empty(num_bins * per_bin, dtype=torch.int64)
    bin_E[torch.tensor(order)] = torch.arange(num_bins * per_bin) // per_bin
    return bin_E, num_bins, ep_size


# -- routing: slots and combine weights -------------------------------------------------------------------
@PROPERTY
@given(routings())
def test_slots_are_a_permutation_per_expert_in_route_major_order(routing):
    top_idx_SK, valid_S, num_experts = routing
    location_KS, counts_E = assign_slots(top_idx_SK, valid_S, num_experts)
    idx_KS = top_idx_SK.T
    live_KS = valid_S.unsqueeze(0) & (idx_KS >= 0)
    for e in range(num_experts):
        # route-major: all first choices, then all second choices, ...; flattened (k, s) order
        slots = location_KS[live_KS & (idx_KS == e)].tolist()
        assert slots == list(range(len(slots)))
        assert int(counts_E[e]) == len(slots)
    assert (location_KS[~live_KS] == 0).all()  # padding and unused routes take no slot
    assert torch.equal(route_counts(top_idx_SK, valid_S, num_experts), counts_E)


@st.composite
def capacity_cases(draw):
    num_experts = draw(st.integers(1, 5))
    k = draw(st.integers(1, num_experts))
    num_tokens = draw(st.integers(0, 10))
    probs_SE = draw(probs(num_tokens, num_experts))
    # k distinct experts per token (as top-k gives), in any order, so that capacity drops hit some routes of a token
    top_idx_SK = torch.tensor([draw(st.permutations(range(num_experts)))[:k] for _ in range(num_tokens)],
                              dtype=torch.int64).reshape(num_tokens, k)
    unused = draw(st.lists(st.lists(st.booleans(), min_size=k, max_size=k), min_size=num_tokens,
                           max_size=num_tokens))
    if num_tokens:  # some routes left unused (LTDR's variable k), never a token's first one
        unused_SK = torch.tensor(unused, dtype=torch.bool)
        unused_SK[:, 0] = False
        top_idx_SK = top_idx_SK.masked_fill(unused_SK, -1)
    valid_S = torch.tensor(draw(st.lists(st.booleans(), min_size=num_tokens, max_size=num_tokens)), dtype=torch.bool)
    capacity = draw(st.integers(1, max(1, num_tokens)))
    return probs_SE, top_idx_SK, valid_S, capacity


@PROPERTY
@given(capacity_cases(), st.booleans())
def test_kept_combine_weights_sum_to_one_per_token(case, normalize):
    probs_SE, top_idx_SK, valid_S, capacity = case
    num_experts, k = probs_SE.shape[1], top_idx_SK.shape[1]
    location_KS, counts_E = assign_slots(top_idx_SK, valid_S, num_experts)
    routes = finalize_routes(probs_SE, top_idx_SK, valid_S, location_KS, counts_E, capacity, normalize)
    kept_KS = routes.indices_KS >= 0
    # a route is kept iff its token is valid, the route is used and its slot is inside the capacity
    expected_kept_KS = valid_S.unsqueeze(0) & (top_idx_SK.T >= 0) & (location_KS < capacity)
    assert torch.equal(kept_KS, expected_kept_KS)
    assert torch.equal(routes.indices_KS[kept_KS].long(), top_idx_SK.T[kept_KS])
    assert (routes.locations_KS[kept_KS] < capacity).all()
    assert (routes.gates_KS[~kept_KS] == 0).all() and (routes.locations_KS[~kept_KS] == 0).all()
    assert (routes.gates_KS >= 0).all()
    any_kept_S = kept_KS.any(0)
    sums_S = routes.gates_KS.sum(0)
    if normalize and k > 1:
        assert torch.allclose(sums_S[any_kept_S], torch.ones(int(any_kept_S.sum())), atol=1e-5)
    else:  # the router's own probabilities
        gathered_KS = probs_SE.gather(1, top_idx_SK.clamp_min(0)).T
        assert torch.equal(routes.gates_KS[kept_KS], gathered_KS[kept_KS])
    assert (sums_S[~any_kept_S] == 0).all()
    assert routes.num_dropped == int(counts_E.sum()) - int(kept_KS.sum())


# -- placement --------------------------------------------------------------------------------------------
@PROPERTY
@given(layouts(), st.data())
def test_a_placement_plan_is_a_permutation_that_puts_every_bin_on_its_rank(layout, data):
    bin_E, num_bins, ep_size = layout
    num_experts = bin_E.numel()
    per_rank = num_experts // ep_size
    physical_E = torch.tensor(data.draw(st.permutations(range(num_experts))))
    rank_B = rank_of_bin(num_bins, ep_size)
    assert torch.equal(torch.bincount(rank_B, minlength=ep_size), torch.full((ep_size,), num_bins // ep_size))
    new_E = plan_physical(bin_E, physical_E, num_bins, ep_size)
    assert sorted(new_E.tolist()) == list(range(num_experts))
    assert torch.equal(new_E // per_rank, rank_B[bin_E])
    assert is_placed(bin_E, new_E, num_bins, ep_size)
    stays_E = physical_E // per_rank == rank_B[bin_E]
    assert torch.equal(new_E[stays_E], physical_E[stays_E])  # as few moves as possible
    assert torch.equal(plan_physical(bin_E, new_E, num_bins, ep_size), new_E)  # placed: nothing moves
    assert is_placed(bin_E, physical_E, num_bins, ep_size) == bool(stays_E.all())


@PROPERTY
@given(layouts())
def test_bin_ordered_layout_is_placed_for_every_ep_size_dividing_the_bins(layout):
    bin_E, num_bins, _ = layout
    physical_E = bin_ordered_physical(bin_E)
    assert sorted(physical_E.tolist()) == list(range(bin_E.numel()))
    order_P = torch.argsort(physical_E)  # the expert at each physical id
    assert (bin_E[order_P].diff() >= 0).all()
    for ep_size in (d for d in range(1, num_bins + 1) if num_bins % d == 0):
        assert is_placed(bin_E, physical_E, num_bins, ep_size)


@PROPERTY
@given(routings(), st.data())
def test_routes_and_counts_move_to_physical_ids_together(routing, data):
    top_idx_SK, valid_S, num_experts = routing
    physical_E = torch.tensor(data.draw(st.permutations(range(num_experts))))
    indices_KS = top_idx_SK.T.to(torch.int32)
    moved_KS = to_physical(indices_KS, physical_E)
    assert torch.equal(moved_KS < 0, indices_KS < 0) and moved_KS.dtype == indices_KS.dtype
    counts_E = route_counts(top_idx_SK, valid_S, num_experts)
    assert torch.equal(counts_to_physical(counts_E, physical_E),
                       route_counts(moved_KS.T.long(), valid_S, num_experts))


# -- mutual information ------------------------------------------------------------------------------------
@st.composite
def mi_cases(draw):
    num_bins = draw(st.integers(1, 3))
    num_experts = num_bins * draw(st.integers(1, 3))
    num_tokens = draw(st.integers(1, 12))
    num_samples = draw(st.integers(1, min(4, num_tokens)))  # sample ids number the batch's samples: < tokens
    probs_SE = draw(probs(num_tokens, num_experts, torch.float64))
    soft = draw(st.booleans())
    # soft scores are 0 or at least 1e-6: a sample whose modality mass is positive but below 1e-30 gets a full
    # row in the reference table and a vanishing one in the fused form (its clamp at 1e-30); both degenerate
    vision = draw(st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1.0)) if soft else st.sampled_from([0.0, 1.0]),
                           min_size=num_tokens, max_size=num_tokens))
    vision_S = torch.tensor(vision, dtype=torch.float64)
    sample_S = torch.tensor(draw(st.lists(st.integers(0, num_samples - 1), min_size=num_tokens,
                                          max_size=num_tokens)))
    valid_S = torch.tensor(draw(st.lists(st.booleans(), min_size=num_tokens, max_size=num_tokens)))
    bin_E = torch.tensor(draw(st.permutations(range(num_experts)))) % num_bins
    return probs_SE, torch.stack([1 - vision_S, vision_S], 1), bin_E, sample_S, valid_S, num_bins


@PROPERTY
@given(mi_cases())
def test_per_sample_mutual_information_lies_between_0_and_log_2(case):
    probs_SE, modality_SM, bin_E, sample_S, valid_S, num_bins = case
    mi_N, has_tokens_N = losses.per_sample_mutual_information(probs_SE, modality_SM, bin_E, sample_S, valid_S,
                                                              num_bins)
    assert torch.isfinite(mi_N).all()
    assert (mi_N >= -1e-12).all() and (mi_N <= math.log(2) + 1e-12).all()
    assert (mi_N[~has_tokens_N] == 0).all()


@PROPERTY
@given(mi_cases())
def test_fused_mutual_information_equals_the_reference(case):
    probs_SE, modality_SM, bin_E, sample_S, valid_S, num_bins = case
    leaf_SE = probs_SE.clone().requires_grad_(True)
    out = []
    for module in (losses, fused_losses):
        value = module.mutual_information_loss(leaf_SE, modality_SM, bin_E, sample_S, valid_S, num_bins)
        out.append((value.detach(), torch.autograd.grad(value, leaf_SE, allow_unused=True)[0]))
    (ref, ref_grad), (fused, fused_grad) = out
    assert -math.log(2) - 1e-12 <= float(ref) <= 1e-12
    assert torch.allclose(fused, ref, rtol=1e-9, atol=1e-12)
    ref_grad = torch.zeros_like(probs_SE) if ref_grad is None else ref_grad
    fused_grad = torch.zeros_like(probs_SE) if fused_grad is None else fused_grad
    assert torch.allclose(fused_grad, ref_grad, rtol=1e-7, atol=1e-10)


# -- rank_once dispatch -------------------------------------------------------------------------------------
D = 3


def _experts(num_experts: int) -> nn.ModuleList:
    torch.manual_seed(0)
    return nn.ModuleList(nn.Linear(D, D) for _ in range(num_experts))


def _loop_over_routes(x_SD, indices_KS, gates_KS, experts):
    """out[s] = sum_k gate[k, s] * expert_{idx[k, s]}(x[s]), route by route."""
    out = [torch.zeros(D) for _ in range(x_SD.shape[0])]
    for k in range(indices_KS.shape[0]):
        for s in range(x_SD.shape[0]):
            e = int(indices_KS[k, s])
            if e >= 0:
                out[s] = out[s] + gates_KS[k, s] * experts[e](x_SD[s])
    return torch.stack(out) if out else torch.zeros(0, D)


@st.composite
def dispatch_cases(draw):
    top_idx_SK, _, num_experts = draw(routings(max_tokens=8, max_experts=4, max_routes=3))
    num_tokens, k = top_idx_SK.shape
    gates = draw(st.lists(st.floats(0.0, 1.0, width=32), min_size=num_tokens * k, max_size=num_tokens * k))
    x = draw(st.lists(LOGIT, min_size=num_tokens * D, max_size=num_tokens * D))
    indices_KS = top_idx_SK.T.contiguous().to(torch.int32)
    gates_KS = torch.tensor(gates).reshape(num_tokens, k).T.contiguous() * (indices_KS >= 0)
    return torch.tensor(x).reshape(num_tokens, D), indices_KS, gates_KS, num_experts


@FEW
@given(dispatch_cases())
def test_rank_once_equals_a_loop_over_routes(case):
    x_SD, indices_KS, gates_KS, num_experts = case
    experts = _experts(num_experts)
    x_SD, gates_KS = x_SD.requires_grad_(True), gates_KS.requires_grad_(True)
    out_SD, comm = rank_once_moe(x_SD, indices_KS, gates_KS, list(experts), num_experts)
    ref_SD = _loop_over_routes(x_SD, indices_KS, gates_KS, experts)
    assert torch.allclose(out_SD, ref_SD, atol=1e-5)
    assert comm.num_tokens == int((indices_KS >= 0).any(0).sum()) and comm.total_bytes == 0
    if (indices_KS >= 0).any():  # and the same gradients for the tokens and the router's weights
        probe_SD = torch.linspace(-1, 1, out_SD.numel()).reshape(out_SD.shape)
        for a, b in zip(_grads((out_SD * probe_SD).sum(), [x_SD, gates_KS]),
                        _grads((ref_SD * probe_SD).sum(), [x_SD, gates_KS])):
            assert torch.allclose(a, b, atol=1e-5)


def _grads(value, inputs):
    return [torch.zeros_like(t) if g is None else g
            for t, g in zip(inputs, torch.autograd.grad(value, inputs, allow_unused=True))]


@FEW
@given(dispatch_cases(), st.sampled_from([1, 2, 4]))
def test_rank_once_pieces_on_simulated_ranks_equal_a_loop_over_routes(case, ep_size):
    """One home rank's tokens through the pure pieces of an R-rank dispatch, each destination rank's local
    experts run in turn: a token travels at most once to each rank, and the sum of what comes back is the
    loop over routes."""
    x_SD, indices_KS, gates_KS, num_experts = case
    num_experts = math.lcm(num_experts, ep_size)  # every rank holds the same number of experts
    per_rank = num_experts // ep_size
    experts = _experts(num_experts)
    token_N, rank_N, send_counts_R = send_plan(rank_hits(route_ranks(indices_KS, per_rank), ep_size))
    pairs = list(zip(token_N.tolist(), rank_N.tolist()))
    assert len(set(pairs)) == len(pairs) and send_counts_R.sum() == len(pairs)
    needed = {(s, int(indices_KS[k, s]) // per_rank) for k in range(indices_KS.shape[0])
              for s in range(indices_KS.shape[1]) if indices_KS[k, s] >= 0}
    assert set(pairs) == needed  # exactly the ranks holding a selected expert
    routes_NX = row_routes(indices_KS, gates_KS, token_N)
    out_SD = torch.zeros(x_SD.shape)
    for r in range(ep_size):
        rows_N = (rank_N == r).nonzero().flatten()
        local_MK, weight_MK = local_routes(routes_NX[rows_N], r, per_rank)
        combined_MD = run_local_experts(x_SD[token_N[rows_N]], local_MK, weight_MK,
                                        list(experts[r * per_rank:(r + 1) * per_rank]))
        out_SD.index_add_(0, token_N[rows_N], combined_MD)
    assert torch.allclose(out_SD, _loop_over_routes(x_SD, indices_KS, gates_KS, experts).detach(), atol=1e-5)
