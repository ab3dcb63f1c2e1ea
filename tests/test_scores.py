"""Soft modality scores pinned on hand-computed cases."""
import math

import torch

from ds_smoes.core.scores import (GaussianModalityStats, attention_score_update, ema_welford_update,
                                  gaussian_log_likelihood, gaussian_scores, hard_scores)


def test_hard_scores_are_one_hot():
    assert hard_scores(torch.tensor([0, 1, 1])).tolist() == [[1, 0], [0, 1], [0, 1]]


def test_attention_update_by_hand():
    # token 0 (text) attends only to itself; token 1 (vision) attends 0.25 / 0.75 to tokens 0 / 1.
    m = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    a = torch.tensor([[[1.0, 0.0], [0.25, 0.75]]])
    attn_norm = torch.tensor([[2.0, 3.0]])
    res_norm = torch.tensor([[2.0, 1.0]])
    out = attention_score_update(m, a, attn_norm, res_norm)
    # token 1: M~ = [0.25, 0.75]; M' = (3 * [0.25, 0.75] + 1 * [0, 1]) / 4 = [0.1875, 0.8125]
    assert torch.allclose(out[0, 0], torch.tensor([1.0, 0.0]))
    assert torch.allclose(out[0, 1], torch.tensor([0.1875, 0.8125]))
    assert torch.allclose(out.sum(-1), torch.ones(1, 2))


def test_attention_update_with_zero_norms_keeps_the_previous_score():
    # token 1 attends only to token 0, so A @ M alone would move it to [0.8, 0.2]; but |attn_out| + |x| is 0
    # for it: no weight to mix by, so it keeps its own score exactly (not 0/0 = NaN, not a row of zeros).
    # token 0 mixes as usual: M~ = 0.5 [0.8, 0.2] + 0.5 [0.25, 0.75] = [0.525, 0.475], M' = (M~ + M) / 2.
    m = torch.tensor([[[0.8, 0.2], [0.25, 0.75]]])
    a = torch.tensor([[[0.5, 0.5], [1.0, 0.0]]])
    out = attention_score_update(m, a, torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]))
    assert out[0, 1].tolist() == [0.25, 0.75]
    assert torch.allclose(out[0, 0], torch.tensor([0.6625, 0.3375]))


def test_gaussian_log_likelihood_by_hand():
    x = torch.tensor([[1.0, 2.0]])
    mean = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    var = torch.tensor([[1.0, 4.0], [2.0, 0.5]])
    ll = gaussian_log_likelihood(x, mean, var)
    text = -0.5 * (math.log(1) + math.log(4) + 1 / 1 + 4 / 4)
    vision = -0.5 * (math.log(2) + math.log(0.5) + 0 / 2 + 1 / 0.5)
    assert torch.allclose(ll, torch.tensor([[text, vision]]), atol=1e-6)


def test_gaussian_scores_softmax_with_temperature():
    x = torch.tensor([[1.0, 2.0]])
    mean = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    var = torch.tensor([[1.0, 4.0], [2.0, 0.5]])
    tau = 0.5 * 2  # 0.5 * D
    text = -0.5 * (math.log(4) + 2.0)
    vision = -0.5 * (0.0 + 2.0)
    p_text = math.exp(text / tau) / (math.exp(text / tau) + math.exp(vision / tau))
    s = gaussian_scores(x, mean, var, tau)
    assert torch.allclose(s, torch.tensor([[p_text, 1 - p_text]]), atol=1e-6)


def test_ema_welford_update_by_hand():
    mean, var = ema_welford_update(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([2.0]),
                                   torch.tensor([0.5]), beta=0.9)
    # a = 0.1: mean = 0 + 0.1 * 2 = 0.2; var = 0.9 * (1 + 0.1 * 4) + 0.1 * 0.5 = 1.31
    assert torch.allclose(mean, torch.tensor([0.2]))
    assert torch.allclose(var, torch.tensor([1.31]))


def test_gaussian_stats_first_update_initialises_then_ema():
    stats = GaussianModalityStats(hidden_size=1, beta=0.9)
    x = torch.tensor([[1.0], [3.0], [10.0], [5.0]])
    labels = torch.tensor([0, 0, 1, 1])
    valid = torch.tensor([True, True, True, False])  # the last (padding) token is ignored
    stats.update(x, labels, valid)
    assert stats.mean_MD.tolist() == [[2.0], [10.0]]
    assert torch.allclose(stats.var_MD, torch.tensor([[1.0], [1e-4]]))  # vision var 0 floored
    assert stats.count_M.tolist() == [2.0, 1.0]
    stats.update(torch.tensor([[4.0]]), torch.tensor([0]), torch.tensor([True]))
    # text: delta = 2, mean = 2.2, var = 0.9 * (1 + 0.1 * 4) + 0 = 1.26
    assert torch.allclose(stats.mean_MD[0], torch.tensor([2.2]))
    assert torch.allclose(stats.var_MD[0], torch.tensor([1.26]))
    assert stats.mean_MD[1].tolist() == [10.0]  # untouched without vision tokens


def test_gaussian_stats_are_in_state_dict_and_reload():
    a = GaussianModalityStats(hidden_size=3)
    a.update(torch.randn(10, 3), torch.tensor([0, 1] * 5), torch.ones(10, dtype=torch.bool))
    b = GaussianModalityStats(hidden_size=3)
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == {"mean_MD", "var_MD", "count_M"}
    for k in a.state_dict():
        assert torch.equal(a.state_dict()[k], b.state_dict()[k])


def test_gaussian_scores_separate_two_clusters():
    stats = GaussianModalityStats(hidden_size=4)
    text = torch.randn(200, 4) + 3.0
    vision = torch.randn(200, 4) - 3.0
    stats.update(torch.cat([text, vision]), torch.tensor([0] * 200 + [1] * 200), torch.ones(400, dtype=torch.bool))
    s = stats(torch.cat([text[:5], vision[:5]]))
    assert (s[:5, 0] > 0.9).all() and (s[5:, 1] > 0.9).all()
