"""The MI and bin-balance losses pinned on hand-computed cases."""
import math

import pytest
import torch

from ds_smoes.core.losses import bin_balance_loss, mutual_information_loss


def _mi(p):
    """I(m; b) of a joint table given as nested lists, computed directly from the definition."""
    pm = [sum(row) for row in p]
    pb = [sum(p[m][b] for m in range(len(p))) for b in range(len(p[0]))]
    return sum(p[m][b] * math.log(p[m][b] / (pm[m] * pb[b]))
               for m in range(len(p)) for b in range(len(p[0])) if p[m][b] > 0)


def test_mi_one_sample_two_bins_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])  # token 0 text, token 1 vision
    modality = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = mutual_information_loss(probs, modality, torch.tensor([0, 1]), torch.tensor([0, 0]))
    # S = [[0.9, 0.1], [0.2, 0.8]] (N_B = 1); P = S / 2
    expected = _mi([[0.45, 0.05], [0.10, 0.40]])
    assert math.isclose(float(loss), -expected, rel_tol=1e-6)


def test_mi_bins_of_two_experts_and_soft_scores_by_hand():
    # 4 experts, bins {0, 1} and {2, 3} (N_B = 2); two tokens with soft scores
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.3, 0.5]])
    modality = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    loss = mutual_information_loss(probs, modality, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0]))
    bin_mass = [[0.7, 0.3], [0.2, 0.8]]
    s = [[(0.75 * bin_mass[0][b] + 0.5 * bin_mass[1][b]) / (2 * 1.25) for b in range(2)],
         [(0.25 * bin_mass[0][b] + 0.5 * bin_mass[1][b]) / (2 * 0.75) for b in range(2)]]
    total = sum(map(sum, s))
    expected = _mi([[v / total for v in row] for row in s])
    assert math.isclose(float(loss), -expected, rel_tol=1e-5)


def test_mi_is_batch_mean_over_samples_and_ignores_padding():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [0.5, 0.5], [0.3, 0.7]])
    modality = torch.tensor([[1.0, 0], [0, 1.0], [1.0, 0], [0, 1.0], [0, 1.0]])
    sample = torch.tensor([0, 0, 1, 1, 1])
    valid = torch.tensor([True, True, True, True, False])  # last token is padding
    loss = mutual_information_loss(probs, modality, torch.tensor([0, 1]), sample, valid_S=valid)
    first = _mi([[0.45, 0.05], [0.10, 0.40]])
    second = 0.0  # both modalities route identically -> independent
    assert math.isclose(float(loss), -(first + second) / 2, rel_tol=1e-6)


def test_mi_of_perfect_separation_is_log_two():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = mutual_information_loss(probs, torch.eye(2), torch.tensor([0, 1]), torch.tensor([0, 0]))
    assert math.isclose(float(loss), -math.log(2), rel_tol=1e-6)


def test_mi_stays_finite_without_vision_or_text_tokens():
    logits = torch.randn(6, 4, requires_grad=True)
    probs = logits.softmax(-1)
    text_only = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3)
    sample = torch.tensor([0, 0, 0, 1, 1, 1])  # sample 0 all text, sample 1 all vision
    loss = mutual_information_loss(probs, text_only, torch.tensor([0, 0, 1, 1]), sample)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(logits.grad).all()


def test_mi_all_padding_gives_zero_with_finite_gradient():
    logits = torch.randn(3, 2, requires_grad=True)
    loss = mutual_information_loss(logits.softmax(-1), torch.eye(2)[[0, 1, 0]], torch.tensor([0, 1]),
                                   torch.tensor([0, 0, 1]), valid_S=torch.zeros(3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("nudge", [0.0, 0.1, -0.3])
def test_mi_gradient_pushes_modalities_apart(nudge):
    # 2 experts = 2 bins; token 0 (text) has logits [nudge, 0], token 1 (vision) [0, nudge], so both put
    # p = sigmoid(nudge) on "their" bin.  With q the vision token's mass on bin 1, P = S / 2 and
    #   dI/dp = 1/2 (log(p / (1 - p)) - log((p + 1 - q) / (1 - p + q))) = nudge / 2   at q = p,
    # and by symmetry dI/dq likewise.  Through the softmax dp/dz00 = -dp/dz01 = p (1 - p), so
    #   dL/dz = -(nudge / 2) p (1 - p) [[1, -1], [-1, 1]]:
    # zero at the symmetric point (I = 0 is its minimum), and otherwise a descent step raises each modality's
    # logit of its own bin when it already leans there (nudge > 0) and lowers it when it leans away (nudge < 0):
    # the loss always pushes the two modalities' bin distributions apart.
    logits = torch.tensor([[nudge, 0.0], [0.0, nudge]], requires_grad=True)
    loss = mutual_information_loss(logits.softmax(-1), torch.eye(2), torch.tensor([0, 1]), torch.tensor([0, 0]))
    loss.backward()
    p = 1 / (1 + math.exp(-nudge))
    expected = -(nudge / 2) * p * (1 - p) * torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    assert torch.allclose(logits.grad, expected, atol=1e-7)
    if nudge:  # one descent step lowers the loss and moves the modalities' gate mass further apart
        stepped = (logits - 1.0 * logits.grad).detach()
        new_loss = mutual_information_loss(stepped.softmax(-1), torch.eye(2), torch.tensor([0, 1]),
                                           torch.tensor([0, 0]))
        assert new_loss.item() < loss.item()
        # |g(text)[bin 0] - g(vision)[bin 0]|: how far apart the two modalities' routing is
        before, after = logits.detach().softmax(-1), stepped.softmax(-1)
        assert abs(after[0, 0] - after[1, 0]) > abs(before[0, 0] - before[1, 0])


def test_bin_balance_uniform_equals_num_bins():
    probs = torch.full((8, 4), 0.25)
    selected = torch.zeros(8, 4, dtype=torch.bool)
    selected[torch.arange(8), torch.arange(8) % 4] = True
    loss = bin_balance_loss(probs, selected, torch.tensor([0, 0, 1, 1]))
    assert math.isclose(float(loss), 2.0, rel_tol=1e-6)


def test_bin_balance_by_hand():
    probs = torch.tensor([[0.6, 0.2, 0.1, 0.1], [0.1, 0.1, 0.5, 0.3]])
    selected = torch.tensor([[1, 0, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)
    bins = torch.tensor([0, 0, 1, 1])
    # in-bin renormalised probs: token0 [0.75, 0.25 | 0.5, 0.5], token1 [0.5, 0.5 | 0.625, 0.375]
    p = [(0.75 + 0.5) / 2, (0.25 + 0.5) / 2, (0.5 + 0.625) / 2, (0.5 + 0.375) / 2]
    f = [1.0, 0.0, 1.0, 0.0]
    expected = 2 * sum(fi * pi for fi, pi in zip(f, p))
    assert math.isclose(float(bin_balance_loss(probs, selected, bins)), expected, rel_tol=1e-6)


def test_bin_balance_ignores_padding_and_has_gradient():
    torch.manual_seed(0)
    logits = torch.randn(4, 4, requires_grad=True)
    # both valid tokens chose e0, so f = [1, 0 | 0, 0] and the loss is 2 * P_0: it has a gradient.
    # (With f balanced inside a bin the loss is constant: in-bin probabilities sum to one.)
    selected = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    valid = torch.tensor([True, True, False, False])
    loss = bin_balance_loss(logits.softmax(-1), selected, torch.tensor([0, 0, 1, 1]), valid_S=valid)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad[2:].abs().sum() == 0 and logits.grad[:2].abs().sum() > 0
