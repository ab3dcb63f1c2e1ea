"""A SMoES layer on an accelerator: forward and backward with parameters, buffers and inputs on the device.

Tests marked `cuda` run only where torch sees a CUDA device (tests/conftest.py skips them elsewhere);
`ci/gpu-check.sh` runs them on a GPU machine.  Each is parametrized over the device, so the CPU variant
runs everywhere and shows that the test's own logic holds: on a GPU machine the two variants of a case
differ by the device alone.
"""
import copy

import pytest
import torch
from torch import nn

from ds_smoes.core.config import SMoESConfig
from ds_smoes.moe.layer import SMoESMoE

D, E = 16, 4
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _layer(score_type: str, dispatch: str, seed: int = 0) -> SMoESMoE:
    torch.manual_seed(seed)
    cfg = SMoESConfig(num_experts=E, k=2, ep_size=1, num_bins=2, score_type=score_type, dispatch=dispatch,
                      alpha_bal=0.5, alpha_mi=0.5)
    return SMoESMoE(D, nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D)), cfg).train()


def _batch(device: str, dtype: torch.dtype = torch.float32, seed: int = 1):
    """2 samples of 6 tokens, images first, the last token of sample 1 padding."""
    g = torch.Generator().manual_seed(seed)
    x_BTD = torch.randn(2, 6, D, generator=g).to(device=device, dtype=dtype)
    labels_BT = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], device=device)
    mask_BT = torch.ones(2, 6, dtype=torch.bool, device=device)
    mask_BT[1, -1] = False
    scores_BTM = torch.softmax(torch.randn(2, 6, 2, generator=g), -1).to(device)
    return x_BTD, labels_BT, mask_BT, scores_BTM


def _step(moe: SMoESMoE, x_BTD: torch.Tensor, labels_BT, mask_BT, scores_BTM):
    """One forward and backward; the output and the auxiliary loss."""
    scores = scores_BTM if moe.config.score_type == "attention" else None
    out_BTD, l_aux, _ = moe(x_BTD, mask_BT, modality_labels=labels_BT, modality_scores=scores)
    (out_BTD.float().square().mean() + l_aux).backward()
    return out_BTD, l_aux


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dispatch", ["deepspeed", "rank_once"])
@pytest.mark.parametrize("score_type", ["hard", "gaussian", "attention"])
def test_layer_runs_on_the_device(device, dispatch, score_type):
    moe = _layer(score_type, dispatch).to(device)
    x_BTD, labels_BT, mask_BT, scores_BTM = _batch(device)
    x_BTD.requires_grad_(True)
    for _ in range(2):  # a second step sees the state the first one left (statistics, bins)
        out_BTD, l_aux = _step(moe, x_BTD, labels_BT, mask_BT, scores_BTM)

    assert out_BTD.shape == x_BTD.shape and out_BTD.device.type == device
    assert torch.isfinite(out_BTD).all() and torch.isfinite(l_aux) and l_aux.device.type == device
    assert torch.equal(out_BTD[1, -1], torch.zeros(D, device=device))  # padding gets no expert
    assert x_BTD.grad is not None and x_BTD.grad.device.type == device and torch.isfinite(x_BTD.grad).all()
    for name, p in moe.named_parameters():
        assert p.device.type == device, name
        assert p.grad is not None and p.grad.device.type == device, name
        assert torch.isfinite(p.grad).all(), name
    assert moe.gate.wg.weight.grad.abs().sum() > 0  # the router learns from the losses
    for name, b in moe.named_buffers():
        assert b.device.type == device, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dispatch", ["deepspeed", "rank_once"])
def test_bf16_layer_matches_fp32_within_bf16_tolerance(device, dispatch):
    # The fp32 reference holds the bf16 layer's own weights (rounded to bf16, then widened) and the same
    # bf16-rounded inputs, so the two differ by bf16 arithmetic alone: the route choice is the same.
    moe16 = _layer("gaussian", dispatch).to(device=device, dtype=torch.bfloat16)
    moe32 = copy.deepcopy(moe16).float()
    x16_BTD, labels_BT, mask_BT, scores_BTM = _batch(device, torch.bfloat16)
    x32_BTD = x16_BTD.detach().float().requires_grad_(True)
    x16_BTD.requires_grad_(True)

    out32_BTD, l_aux32 = _step(moe32, x32_BTD, labels_BT, mask_BT, scores_BTM)
    out16_BTD, l_aux16 = _step(moe16, x16_BTD, labels_BT, mask_BT, scores_BTM)

    assert out16_BTD.dtype == torch.bfloat16 and out16_BTD.device.type == device
    torch.testing.assert_close(out16_BTD.float(), out32_BTD, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(l_aux16.float(), l_aux32, atol=1e-2, rtol=1e-2)
    assert x16_BTD.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x16_BTD.grad.float(), x32_BTD.grad, atol=3e-2, rtol=5e-2)
