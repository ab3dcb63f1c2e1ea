"""ds_smoes.compress.selection: which tokens to keep, pinned by hand-computed cases."""
import pytest
import torch
import torch.nn.functional as F

from ds_smoes.compress.selection import (gather_tokens, gumbel_noise, gumbel_topk, hard_mask, pool_matrix,
                                           pool_rows, random_indices, straight_through, straight_through_topk,
                                           topk_indices)


def test_topk_indices_keep_original_order_and_ties_go_first():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2],
                           [0.5, 0.5, 0.5, 0.1, 0.5]])
    # row 0: best are t1 (0.9), t3 (0.8), t2 (0.3) -> in token order 1, 2, 3
    # row 1: four ties at 0.5; the stable sort keeps the first three
    assert topk_indices(scores, 3).tolist() == [[1, 2, 3], [0, 1, 2]]
    assert topk_indices(scores, 5).tolist() == [[0, 1, 2, 3, 4]] * 2


@pytest.mark.parametrize("k", [0, 6])
def test_budget_out_of_range(k):
    with pytest.raises(ValueError, match="budget must be in 1..5"):
        topk_indices(torch.zeros(1, 5), k)


def test_gather_and_hard_mask():
    x = torch.arange(12.).reshape(1, 4, 3)            # token t holds 3t, 3t+1, 3t+2
    index = torch.tensor([[1, 3]])
    assert gather_tokens(x, index).tolist() == [[[3., 4., 5.], [9., 10., 11.]]]
    assert hard_mask(index, 4).tolist() == [[0., 1., 0., 1.]]


def test_straight_through_value_is_hard_gradient_is_soft():
    scores = torch.tensor([[0.0, 2.0, 1.0]], requires_grad=True)
    mask, index = straight_through_topk(scores, 2)
    assert index.tolist() == [[1, 2]] and mask.tolist() == [[0., 1., 1.]]   # exactly 0/1
    # d(sum of the kept tokens' mask)/d scores = d(p1 + p2)/d s = d(1 - p0)/d s = -p0 * (e0 - p)
    (mask * torch.tensor([[0., 1., 1.]])).sum().backward()
    p = torch.softmax(torch.tensor([0.0, 2.0, 1.0]), 0)
    expected = -p[0] * (torch.tensor([1., 0., 0.]) - p)
    assert torch.allclose(scores.grad[0], expected)


def test_straight_through_keeps_kept_values_bit_for_bit():
    x = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0))
    scores = torch.randn(2, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
    mask, index = straight_through_topk(scores, 3, tau=0.5)
    kept = gather_tokens(x, index) * mask.gather(1, index).unsqueeze(-1)
    assert torch.equal(kept, gather_tokens(x, index))
    kept.sum().backward()
    assert scores.grad.abs().sum() > 0
    assert torch.equal(straight_through(torch.ones(3), torch.tensor([0.2, 0.3, 0.5])), torch.ones(3))


def test_gumbel_topk_with_zero_noise_is_straight_through_and_noise_changes_the_draw():
    scores = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    mask, index = gumbel_topk(scores, 2, noise_BT=torch.zeros(1, 4))
    assert index.tolist() == [[1, 3]] and torch.equal(mask, straight_through_topk(scores, 2)[0])
    _, index = gumbel_topk(scores, 2, noise_BT=torch.tensor([[10.0, 0.0, 0.0, 0.0]]))
    assert index.tolist() == [[0, 1]]                  # t0 (10) and t1 (3), in token order
    g = gumbel_noise((20000,), generator=torch.Generator().manual_seed(0))
    assert abs(g.mean().item() - 0.5772) < 0.03       # the Gumbel mean is Euler's gamma


def test_random_indices_seeded_distinct_sorted():
    a = random_indices(3, 10, 4, torch.Generator().manual_seed(7))
    b = random_indices(3, 10, 4, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (3, 4)
    assert (a[:, 1:] > a[:, :-1]).all() and a.min() >= 0 and a.max() < 10


def test_pool_rows_rule():
    assert pool_rows(16, 8, 8) == [4, 4, 4, 4]        # a square budget: the 4 x 4 grid
    assert pool_rows(13, 8, 8) == [4, 3, 3, 3]        # round(sqrt(13)) = 4 bands, first takes the extra
    assert pool_rows(8, 8, 8) == [3, 3, 2]             # round(sqrt(8)) = 3
    assert pool_rows(1, 8, 8) == [1]
    assert pool_rows(64, 8, 8) == [8] * 8
    assert pool_rows(6, 2, 8) == [6]                   # wide grid: round(sqrt(6 * 2 / 8)) = 1 band
    assert pool_rows(7, 2, 4) == [4, 3]                # round(sqrt(7 * 2 / 4)) = 2 bands
    assert pool_rows(10, 1, 12) == [10]                # one row: all in it


def test_pool_matrix_by_hand_and_against_adaptive_pooling():
    # 2 x 2 grid to 1 token: the mean of the four patches
    assert pool_matrix(2, 2, 1).tolist() == [[0.25, 0.25, 0.25, 0.25]]
    # 2 x 3 grid to 3 tokens: round(sqrt(3 * 2 / 3)) = 1 band of 3: each column averaged over both rows
    w = pool_matrix(2, 3, 3)
    assert w.tolist() == [[0.5, 0, 0, 0.5, 0, 0], [0, 0.5, 0, 0, 0.5, 0], [0, 0, 0.5, 0, 0, 0.5]]
    x = torch.randn(2, 64, 5, generator=torch.Generator().manual_seed(0))      # 8 x 8 patches, D = 5
    for g in (1, 2, 3, 4, 8):
        ref = F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(2, 5, 8, 8), g).flatten(2).transpose(1, 2)
        assert torch.allclose(pool_matrix(8, 8, g * g) @ x, ref, atol=1e-6)
    for budget in (5, 7, 13, 40):
        assert torch.allclose(pool_matrix(8, 8, budget).sum(1), torch.ones(budget))
