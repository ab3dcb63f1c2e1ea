"""The fused SMoES losses (one autograd node each) against the reference forms of ds_smoes.losses,
whose values are pinned by hand in test_losses.py: same values, same gradients, and a float64
gradcheck of the analytic backwards."""
import pytest
import torch

from ds_smoes.core import fused_losses, losses


def _case(seed: int, num_tokens=60, num_experts=8, num_bins=2, num_samples=5, dtype=torch.float64):
    """Soft scores and padding; sample 1 is all padding, sample 2 has text only."""
    g = torch.Generator().manual_seed(seed)
    logits_SE = torch.randn(num_tokens, num_experts, generator=g, dtype=dtype, requires_grad=True)
    vision_S = torch.rand(num_tokens, generator=g, dtype=dtype)
    modality_SM = torch.stack([1 - vision_S, vision_S], 1)
    sample_S = torch.randint(0, num_samples, (num_tokens,), generator=g)
    valid_S = torch.rand(num_tokens, generator=g) > 0.2
    valid_S[sample_S == 1] = False
    modality_SM[sample_S == 2] = torch.tensor([1.0, 0.0], dtype=dtype)
    bin_E = torch.randperm(num_experts, generator=g) % num_bins
    return logits_SE, modality_SM, sample_S, valid_S, bin_E


@pytest.mark.parametrize("seed,num_experts,num_bins", [(0, 8, 2), (1, 4, 2), (2, 16, 4), (3, 6, 3)])
def test_fused_mi_equals_the_reference_in_value_and_gradient(seed, num_experts, num_bins):
    logits_SE, modality_SM, sample_S, valid_S, bin_E = _case(seed, num_experts=num_experts, num_bins=num_bins)
    probs_SE = logits_SE.softmax(-1)
    out = []
    for module in (losses, fused_losses):
        value = module.mutual_information_loss(probs_SE, modality_SM, bin_E, sample_S, valid_S, num_bins)
        out.append((value, torch.autograd.grad(value, logits_SE, retain_graph=True)[0]))
    (ref, ref_grad), (fused, fused_grad) = out
    assert ref.item() < 0 and torch.allclose(fused, ref, rtol=1e-12, atol=1e-15)
    assert ref_grad.abs().sum() > 0 and torch.allclose(fused_grad, ref_grad, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("seed,num_experts,num_bins", [(0, 8, 2), (2, 16, 4), (3, 6, 3)])
def test_fused_bin_balance_equals_the_reference_in_value_and_gradient(seed, num_experts, num_bins):
    logits_SE, _, _, valid_S, bin_E = _case(seed, num_experts=num_experts, num_bins=num_bins)
    probs_SE = logits_SE.softmax(-1)
    selected_SE = torch.zeros_like(probs_SE, dtype=torch.bool).scatter_(1, probs_SE.topk(2, 1).indices, True)
    out = []
    for module in (losses, fused_losses):
        value = module.bin_balance_loss(probs_SE, selected_SE, bin_E, valid_S, num_bins)
        out.append((value, torch.autograd.grad(value, logits_SE, retain_graph=True)[0]))
    (ref, ref_grad), (fused, fused_grad) = out
    assert torch.allclose(fused, ref, rtol=1e-12)
    assert ref_grad.abs().sum() > 0 and torch.allclose(fused_grad, ref_grad, rtol=1e-9, atol=1e-15)


def test_analytic_backwards_pass_gradcheck():
    logits_SE, modality_SM, sample_S, valid_S, bin_E = _case(4, num_tokens=24, num_experts=4, num_samples=4)
    selected_SE = torch.zeros(24, 4, dtype=torch.bool).scatter_(1, logits_SE.topk(2, 1).indices, True)
    assert torch.autograd.gradcheck(
        lambda z: fused_losses.mutual_information_loss(z.softmax(-1), modality_SM, bin_E, sample_S, valid_S, 2),
        (logits_SE,))
    assert torch.autograd.gradcheck(
        lambda z: fused_losses.bin_balance_loss(z.softmax(-1), selected_SE, bin_E, valid_S, 2), (logits_SE,))


def test_all_padding_gives_zero_losses_with_zero_gradient():
    logits_SE, modality_SM, sample_S, _, bin_E = _case(5)
    none_S = torch.zeros(len(sample_S), dtype=torch.bool)
    probs_SE = logits_SE.softmax(-1)
    selected_SE = torch.ones_like(probs_SE, dtype=torch.bool)
    for value in (fused_losses.mutual_information_loss(probs_SE, modality_SM, bin_E, sample_S, none_S, 2),
                  fused_losses.bin_balance_loss(probs_SE, selected_SE, bin_E, none_S, 2)):
        grad = torch.autograd.grad(value, logits_SE, retain_graph=True)[0]
        assert value.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
