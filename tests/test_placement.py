"""Expert placement: the plan by hand, migration of weights and Adam state, invariance of the layer's
function under a move, the export's slicing; expert migration on 2 real gloo ranks."""

import pytest
import torch
from torch import nn

from ds_smoes.core.config import SMoESConfig
from ds_smoes.app.export import slice_experts, supported_ep_sizes
from ds_smoes.moe.layer import SMoESMoE
from ds_smoes.core.placement import bin_ordered_physical, counts_to_physical, is_placed, plan_physical, rank_of_bin, to_physical
from ds_smoes.parallel.migration import migrate_experts


D = 8


def test_rank_of_bin():
    assert rank_of_bin(2, 2).tolist() == [0, 1]
    assert rank_of_bin(4, 2).tolist() == [0, 0, 1, 1]
    assert rank_of_bin(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_plan_moves_only_experts_on_the_wrong_rank():
    # 4 experts, 2 bins, 2 ranks (physical 0, 1 on rank 0; 2, 3 on rank 1).  Bin 0 = {e1, e3} -> rank 0,
    # bin 1 = {e0, e2} -> rank 1.  e1 and e2 are already there and keep their ids; e0 (rank 0) and e3
    # (rank 1) swap ranks, each taking the id the other frees.
    bin_E = torch.tensor([1, 0, 1, 0])
    new_E = plan_physical(bin_E, torch.arange(4), num_bins=2, ep_size=2)
    assert new_E.tolist() == [3, 1, 2, 0]
    assert is_placed(bin_E, new_E, 2, 2) and not is_placed(bin_E, torch.arange(4), 2, 2)
    # already placed: nothing moves
    assert plan_physical(bin_E, new_E, 2, 2).tolist() == [3, 1, 2, 0]


def test_plan_with_two_bins_per_rank():
    # 8 experts, 4 bins of 2, 2 ranks (bins 0, 1 -> rank 0; bins 2, 3 -> rank 1)
    bin_E = torch.tensor([3, 0, 2, 1, 0, 3, 1, 2])
    # rank of each expert's bin:      1  0  1  0  0  1  0  1 ; current rank: 0 0 0 0 1 1 1 1
    # stay: e1 (0), e3 (3), e5 (5), e7 (7); movers to rank 0: e4, e6 -> free ids 0, 2;
    # movers to rank 1: e0, e2 -> free ids 4, 6
    new_E = plan_physical(bin_E, torch.arange(8), num_bins=4, ep_size=2)
    assert new_E.tolist() == [4, 1, 6, 3, 0, 5, 2, 7]
    assert is_placed(bin_E, new_E, 4, 2)
    assert sorted(new_E.tolist()) == list(range(8))


def test_bin_order_places_bins_for_every_supported_ep_size():
    bin_E = torch.tensor([1, 0, 1, 0])
    assert bin_ordered_physical(bin_E).tolist() == [2, 0, 3, 1]  # physical 0, 1 = bin 0 (e1, e3)
    bin_E = torch.tensor([3, 0, 2, 1, 0, 3, 1, 2])
    physical_E = bin_ordered_physical(bin_E)
    for ep in supported_ep_sizes(8, 4):
        assert is_placed(bin_E, physical_E, 4, ep), ep
    assert supported_ep_sizes(8, 4) == [1, 2, 4] and supported_ep_sizes(64, 8) == [1, 2, 4, 8]


def test_routes_and_counts_in_physical_ids():
    physical_E = torch.tensor([3, 1, 2, 0])
    idx_KS = torch.tensor([[0, 3, -1], [2, -1, -1]], dtype=torch.int32)
    assert to_physical(idx_KS, physical_E).tolist() == [[3, 0, -1], [2, -1, -1]]
    assert to_physical(idx_KS, physical_E).dtype == torch.int32
    assert counts_to_physical(torch.tensor([5, 6, 7, 8]), physical_E).tolist() == [8, 6, 7, 5]


def _experts_with_adam(n: int = 4):
    torch.manual_seed(0)
    experts = nn.ModuleList(nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D)) for _ in range(n))
    opt = torch.optim.AdamW(experts.parameters(), lr=1e-2)
    (sum(e(torch.randn(3, D)).square().sum() for e in experts)).backward()
    opt.step()
    return experts, opt


def test_migration_moves_weights_with_their_adam_moments():
    experts, opt = _experts_with_adam()
    before = [[(p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone())
               for p in e.parameters()] for e in experts]
    physical_E, new_E = torch.arange(4), torch.tensor([3, 1, 2, 0])
    cost = migrate_experts(list(experts), physical_E, new_E, group=None, optimizer=opt)
    for e in range(4):  # expert e's weights and moments now live in module new_E[e]
        for (w, m, v), p in zip(before[e], experts[int(new_E[e])].parameters()):
            assert torch.equal(p, w) and torch.equal(opt.state[p]["exp_avg"], m)
            assert torch.equal(opt.state[p]["exp_avg_sq"], v)
    # one rank: nothing crosses the network; an expert is 280 parameters x (weight + 2 moments) x 4 B
    assert cost.bytes_sent == 0 and cost.experts_moved == 0 and cost.bytes_per_expert == 280 * 3 * 4


def test_migration_without_optimizer_and_with_zero_style_state_refused():
    experts, _ = _experts_with_adam()
    w0 = experts[0][0].weight.detach().clone()
    migrate_experts(list(experts), torch.arange(4), torch.tensor([1, 0, 2, 3]))
    assert torch.equal(experts[1][0].weight, w0)

    flat = torch.optim.AdamW([nn.Parameter(torch.zeros(10))], lr=1.0)  # state kept for other tensors
    flat.param_groups[0]["params"][0].grad = torch.ones(10)
    flat.step()
    with pytest.raises(ValueError, match="ZeRO stage"):
        migrate_experts(list(experts), torch.arange(4), torch.tensor([1, 0, 2, 3]), optimizer=flat)


def _layer(dispatch: str) -> SMoESMoE:
    cfg = SMoESConfig(num_experts=4, num_bins=2, k=2, score_type="hard", binning="adaptive", alpha_bal=0.5,
                      alpha_mi=0.25, dispatch=dispatch)
    torch.manual_seed(0)
    layer = SMoESMoE(D, nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D)), cfg)
    for i, expert in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
        for p in expert.parameters():
            p.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(100 + i))
    layer.gate.binning.bin_E.copy_(torch.tensor([1, 0, 1, 0]))
    return layer


def _forward_backward(layer: SMoESMoE):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, D, generator=g, requires_grad=True)
    labels = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    out, l_aux, _ = layer(x, torch.ones(2, 6, dtype=torch.bool), modality_labels=labels)
    ((out * torch.randn(out.shape, generator=g)).sum() + l_aux).backward()
    return out.detach(), l_aux.detach(), x.grad, layer.gate.wg.weight.grad


@pytest.mark.parametrize("dispatch", ["deepspeed", "rank_once"])
def test_moving_experts_leaves_the_layer_function_unchanged(dispatch):
    ref, moved = _layer(dispatch), _layer(dispatch)
    new_E = bin_ordered_physical(moved.gate.binning.bin_E)
    migrate_experts(moved.deepspeed_moe.experts.deepspeed_experts, moved.gate.physical_E, new_E)
    moved.gate.physical_E.copy_(new_E)
    a, b = _forward_backward(ref), _forward_backward(moved)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-6)
    # the expert that is logically e0 now sits at physical 2 and got e0's gradient there
    g_ref = ref.deepspeed_moe.experts.deepspeed_experts[0][0].weight.grad
    g_moved = moved.deepspeed_moe.experts.deepspeed_experts[2][0].weight.grad
    assert g_ref.abs().sum() > 0 and torch.allclose(g_ref, g_moved, atol=1e-6)
    # statistics stay in logical ids; the physical rank map follows the move
    assert moved.gate.physical_rank_of_expert(2).tolist() == [1, 0, 1, 0]


def test_placement_due_only_for_frozen_adaptive_bins_not_yet_placed():
    layer = _layer("deepspeed")
    layer.deepspeed_moe.ep_size = 2  # the plan only; nothing is moved here
    binning = layer.gate.binning
    assert not layer.placement_due()  # bins still adaptive (step 0 < freeze step)
    # buffers change through the step update or a checkpoint load, which resets the host-side answers
    _load(layer, {"deepspeed_moe.gate.binning.step": torch.tensor(binning.freeze_step)})
    assert layer.placement_due() and layer.placement_due()  # asked every step; read once
    _load(layer, {"deepspeed_moe.gate.physical_E": plan_physical(binning.bin_E, layer.gate.physical_E, 2, 2)})
    assert not layer.placement_due()
    off = SMoESMoE(D, nn.Linear(D, D), layer.config.model_copy(update={"placement": "none"}))
    off.deepspeed_moe.ep_size = 2
    _load(off, {"deepspeed_moe.gate.binning.bin_E": torch.tensor([1, 0, 1, 0]),
                "deepspeed_moe.gate.binning.step": torch.tensor(10 ** 6)})
    assert not off.placement_due()


def _load(layer, changes: dict) -> None:
    layer.load_state_dict({**layer.state_dict(), **changes})


def test_slice_experts_renumbers_each_ranks_share():
    state = {"a.weight": 0, **{f"m.deepspeed_experts.{p}.w": p for p in range(4)}}
    assert slice_experts(state, 4, 2, 1) == {"a.weight": 0, "m.deepspeed_experts.0.w": 2, "m.deepspeed_experts.1.w": 3}
    assert slice_experts(state, 4, 1, 0) == state


@pytest.mark.slow
def test_migration_on_two_gloo_ranks_keeps_training_identical(two_rank_scenarios):
    reports = two_rank_scenarios.reports("placement_parity")
    # DeepSpeed's CPU shm all-reduce segments (69 MB per rank, never unlinked) are not created (by any scenario)
    assert two_rank_scenarios.shm_segments_created == []
    for r in range(2):
        report = reports[r]
        for dispatch, rep in report.items():
            where = (r, dispatch)
            assert rep["physical_of_expert"] == [3, 1, 2, 0], where
            # each rank sends one expert: 280 params x (weight, exp_avg, exp_avg_sq) x 4 bytes
            assert rep["experts_moved"] == 2 and rep["bytes_sent"] == 3360, where
            assert rep["max_diff_after_move"] <= 1e-6, where      # same function right after the move
            assert rep["max_diff_after_training"] <= 1e-5, where  # and after 3 more Adam steps
            assert rep["loss_scale"] > 0
            # after placement each bin sits on one rank: routing stats under the physical layout
            # equal those under the bins' placement
            assert rep["cross_rank_rate_physical"] == pytest.approx(rep["cross_rank_rate_binned"]), where


def test_stacked_experts_move_row_by_row_with_their_adam_moments():
    """DeepSpeed AutoEP's layout: each parameter is [n, ...] and expert slot i is row i of every one."""
    from ds_smoes.parallel.migration import StackedExperts

    torch.manual_seed(0)
    w1, w2 = nn.Parameter(torch.randn(4, 3, D)), nn.Parameter(torch.randn(4, D, 3))
    opt = torch.optim.AdamW([w1, w2], lr=1e-2)
    (torch.einsum("nfd,ndf->", w1, w2) ** 2).backward()
    opt.step()
    before = {name: t.detach().clone() for name, t in (("w1", w1), ("w2", w2), ("m1", opt.state[w1]["exp_avg"]),
                                                         ("v2", opt.state[w2]["exp_avg_sq"]))}
    new_E = torch.tensor([2, 0, 3, 1])
    cost = migrate_experts(StackedExperts((w1, w2)), torch.arange(4), new_E, group=None, optimizer=opt)
    for e in range(4):   # expert e's rows now sit in row new_E[e] of every parameter and moment
        p = int(new_E[e])
        assert torch.equal(w1[p], before["w1"][e]) and torch.equal(w2[p], before["w2"][e])
        assert torch.equal(opt.state[w1]["exp_avg"][p], before["m1"][e])
        assert torch.equal(opt.state[w2]["exp_avg_sq"][p], before["v2"][e])
    # one expert: 2 x 3 x D weights, each with its 2 moments, in float32
    assert cost.bytes_per_expert == 2 * 3 * D * 3 * 4 and cost.experts_moved == 0
