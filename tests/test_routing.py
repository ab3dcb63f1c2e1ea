"""Sparse routes: slots, capacity, weights."""
import torch

from ds_smoes.core.routing import assign_slots, capacity_for, finalize_routes, route_counts


def test_assign_slots_route_major():
    top_idx = torch.tensor([[0, 1], [1, 0], [0, 2]])  # [S=3, K=2]
    valid = torch.tensor([True, True, True])
    loc, counts = assign_slots(top_idx, valid, 3)
    # first choices: t0->e0 slot0, t1->e1 slot0, t2->e0 slot1; second: t0->e1 slot1, t1->e0 slot2, t2->e2 slot0
    assert loc.tolist() == [[0, 0, 1], [1, 2, 0]]
    assert counts.tolist() == [3, 2, 1]


def test_route_counts_without_slots_by_hand():
    # what rank_once's gate counts instead of assigning slots: padding (t1) and unused routes (-1) do not count
    top_idx = torch.tensor([[0, 1], [1, 0], [2, -1], [0, 2]])
    valid = torch.tensor([True, False, True, True])
    assert route_counts(top_idx, valid, 4).tolist() == [2, 1, 2, 0]
    assert torch.equal(route_counts(top_idx.clamp_min(0), valid, 4), assign_slots(top_idx.clamp_min(0), valid, 4)[1])


def test_padding_gets_no_slot():
    loc, counts = assign_slots(torch.tensor([[0], [0], [0]]), torch.tensor([True, False, True]), 2)
    assert loc.tolist() == [[0, 0, 1]] and counts.tolist() == [2, 0]


def test_capacity_drops_are_minus_one_and_weights_renormalised():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.7, 0.2, 0.1]])
    top_idx = probs.topk(2, dim=1).indices
    valid = torch.ones(3, dtype=torch.bool)
    loc, counts = assign_slots(top_idx, valid, 3)
    r = finalize_routes(probs, top_idx, valid, loc, counts, capacity=2, normalize=True)
    # every token picks e0 then e1; token 2 lands in slot 2 of both, beyond capacity 2: both routes dropped
    assert r.indices_KS.tolist() == [[0, 0, -1], [1, 1, -1]]
    assert r.num_dropped == 2
    assert torch.allclose(r.gates_KS[:, 0], torch.tensor([0.6 / 0.9, 0.3 / 0.9]))
    assert torch.allclose(r.gates_KS[:, 2], torch.tensor([0.0, 0.0]))
    # a larger capacity keeps everything
    r3 = finalize_routes(probs, top_idx, valid, loc, counts, capacity=3, normalize=True)
    assert r3.num_dropped == 0 and torch.allclose(r3.gates_KS[:, 2], torch.tensor([0.7 / 0.9, 0.2 / 0.9]))
    assert r.indices_KS.dtype == torch.int32 and r.locations_KS.dtype == torch.int32


def test_k1_keeps_raw_probability_so_the_router_learns():
    logits = torch.tensor([[2.0, 0.0]], requires_grad=True)
    probs = logits.softmax(-1)
    top_idx = probs.topk(1, dim=1).indices
    loc, counts = assign_slots(top_idx, torch.tensor([True]), 2)
    r = finalize_routes(probs, top_idx, torch.tensor([True]), loc, counts, capacity=4, normalize=True)
    assert torch.allclose(r.gates_KS, probs[:, :1].T)
    r.gates_KS.sum().backward()
    assert logits.grad.abs().sum() > 0


def test_capacity_for():
    assert capacity_for(10, 4, 2, 1.0, 1) == 5
    assert capacity_for(10, 4, 2, 1.0, 8) == 8


def test_variable_k_routes_with_unused_rows():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]])
    top_idx = torch.tensor([[0, 1, 2], [0, -1, -1]])  # token 0 uses 3 experts, token 1 only one
    valid = torch.ones(2, dtype=torch.bool)
    loc, counts = assign_slots(top_idx, valid, 3)
    assert counts.tolist() == [2, 1, 1] and loc.tolist() == [[0, 1], [0, 0], [0, 0]]
    r = finalize_routes(probs, top_idx, valid, loc, counts, capacity=4, normalize=True)
    assert r.indices_KS.tolist() == [[0, 0], [1, -1], [2, -1]]
    assert torch.allclose(r.gates_KS[:, 0], torch.tensor([0.5, 0.3, 0.2]))
    assert torch.allclose(r.gates_KS[:, 1], torch.tensor([1.0, 0.0, 0.0]))
    assert r.selected_SE.tolist() == [[True, True, True], [True, False, False]]
    assert r.num_dropped == 0


def test_bin_limited_topk_by_hand():
    from ds_smoes.core.routing import bin_limited_topk

    probs = torch.tensor([[0.30, 0.02, 0.20, 0.18, 0.16, 0.14],
                          [0.05, 0.05, 0.10, 0.10, 0.40, 0.30]])
    contiguous = torch.tensor([0, 0, 1, 1, 2, 2])
    # bin mass: token 0 -> b0 .32, b1 .38, b2 .30; token 1 -> b0 .10, b1 .20, b2 .70
    one_bin = bin_limited_topk(probs, contiguous, num_bins=3, max_bins=1, k=2)
    assert [sorted(r) for r in one_bin.tolist()] == [[2, 3], [4, 5]]  # global top-2 of token 0 would be {0, 2}
    two_bins = bin_limited_topk(probs, contiguous, num_bins=3, max_bins=2, k=3)
    assert sorted(two_bins[0].tolist()) == [0, 2, 3]
    t1 = sorted(two_bins[1].tolist())  # bins 2 and 1; e2 and e3 tie for the third place
    assert t1[1:] == [4, 5] and t1[0] in (2, 3)
    # adaptive bins need not be contiguous: b0 = {e1, e2} .22, b1 = {e0, e4} .46, b2 = {e3, e5} .32
    scattered = bin_limited_topk(probs[:1], torch.tensor([1, 0, 0, 2, 1, 2]), num_bins=3, max_bins=1, k=2)
    assert sorted(scattered[0].tolist()) == [0, 4]
    # max_bins = num_bins is plain global top-k
    assert torch.equal(bin_limited_topk(probs, contiguous, 3, 3, 2), probs.topk(2, dim=1).indices)
