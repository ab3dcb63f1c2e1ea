"""Routing state (bins, Gaussian statistics) changes once per optimizer step, never inside a forward.

Under activation checkpointing a forward runs twice; a state update inside it used to be applied twice
(rebins twice as early, the EMA decay squared).  These tests train a SMoES layer for a few steps with and
without checkpointing and require identical buffers and weights.
"""
import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


from ds_smoes.core.config import SMoESConfig
from ds_smoes.core.step_state import UNAPPLIED_WARNING_AFTER
from ds_smoes.moe.layer import SMoESMoE
from ds_smoes.moe.updates import apply_step_updates, innermost_optimizer, register_step_updates, stateful_modules

D, E, B, T = 16, 4, 2, 8
STEPS = 6


def _layer(seed=0, **fields):
    torch.manual_seed(seed)
    cfg = SMoESConfig(**{**dict(num_experts=E, k=2, ep_size=1, num_bins=2, score_type="gaussian",
                                binning="adaptive", rebin_interval=2, rebin_freeze_step=4), **fields})
    return SMoESMoE(D, nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D)), cfg).train()


def _batches(steps=STEPS, micro=1):
    g = torch.Generator().manual_seed(1)
    labels_BT = torch.tensor([[1] * 5 + [0] * 3] * B)
    return [[(torch.randn(B, T, D, generator=g) + labels_BT.unsqueeze(-1) * 2.0, labels_BT) for _ in range(micro)]
            for _ in range(steps)]


def _train(layer, batches, mode):
    """mode: None (plain), "reentrant" or "non_reentrant" (torch.utils.checkpoint around the layer)."""
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    register_step_updates(opt, layer)
    for micro_batches in batches:
        for x_BTD, labels_BT in micro_batches:
            x_BTD = x_BTD.clone().requires_grad_(True)

            def run(x):
                out, l_aux, _ = layer(x, modality_labels=labels_BT)
                return out, l_aux
            out, l_aux = run(x_BTD) if mode is None else checkpoint(run, x_BTD,
                                                                    use_reentrant=mode == "reentrant")
            (out.pow(2).mean() + l_aux).backward()
        opt.step()
        opt.zero_grad()
    return layer


def _state(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_checkpointed_training_updates_state_as_the_plain_run(mode):
    batches = _batches()
    plain = _train(_layer(), batches, None)
    ckpt = _train(_layer(), batches, mode)
    plain_state, ckpt_state = _state(plain), _state(ckpt)
    assert plain_state.keys() == ckpt_state.keys()
    for key in plain_state:
        assert torch.equal(plain_state[key], ckpt_state[key]), key
    binning = plain.gate.binning
    # the run did something to compare: 6 steps observed (freeze at 4 stops at 4), rebins ran, statistics moved
    assert int(binning.step) == 4 and binning.frozen
    assert int(plain.scorer.count_M.sum()) == STEPS * B * T


@pytest.mark.slow
def test_deepspeed_activation_checkpointing_on_two_ranks_updates_state_as_the_plain_run(two_rank_scenarios):
    # DeepSpeed's engine and activation checkpointing, rank_once over 2 gloo ranks, the step update registered
    # on the optimizer the engine wraps: the recomputed forwards record nothing, the world sum keeps ranks alike
    reports = two_rank_scenarios.reports("step_updates_checkpointing")
    for report in reports:
        assert report["plain"] == report["checkpointed"]
        assert report["plain"]["deepspeed_moe.gate.binning.step"] == 4          # 6 steps, frozen at 4
        assert report["plain"]["deepspeed_moe.gate.binning.num_rebins"] >= 1
        assert sum(report["plain"]["scorer.count_M"]) == 2 * 6 * 2 * 6           # both ranks' tokens, 6 steps
    assert reports[0]["plain"] == reports[1]["plain"]  # different data per rank, one world-summed state


def test_state_changes_at_the_step_not_in_the_forward():
    layer = _layer(rebin_interval=1)
    before = _state(layer)
    x_BTD, labels_BT = _batches(1)[0][0]
    layer(x_BTD, modality_labels=labels_BT)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed in the forward"
    assert int(layer.gate.binning.pending_load_ME.sum()) == B * T * 2   # k = 2 routes per token, recorded
    assert int(layer.scorer.pending_MX[:, -1].sum()) == B * T           # token counts per modality
    apply_step_updates(layer)
    assert int(layer.gate.binning.step) == 1 and int(layer.scorer.count_M.sum()) == B * T
    assert int(layer.gate.binning.pending_load_ME.abs().sum()) == 0 and int(layer.scorer.pending_MX.abs().sum()) == 0


def test_gradient_accumulation_folds_every_micro_batch_into_one_update():
    # two micro-batches then one step == the same tokens as one batch (sums of loads and sufficient statistics)
    layer_two, layer_one = _layer(), _layer()
    (x1, labels), (x2, _) = _batches(1, micro=2)[0]
    with torch.no_grad():
        layer_two(x1, modality_labels=labels)
        layer_two(x2, modality_labels=labels)
        layer_one(torch.cat([x1, x2]), modality_labels=torch.cat([labels, labels]))
    apply_step_updates(layer_two)
    apply_step_updates(layer_one)
    assert int(layer_two.gate.binning.step) == 1
    torch.testing.assert_close(layer_two.gate.binning.load_ema_ME, layer_one.gate.binning.load_ema_ME)
    torch.testing.assert_close(layer_two.scorer.mean_MD, layer_one.scorer.mean_MD)
    torch.testing.assert_close(layer_two.scorer.var_MD, layer_one.scorer.var_MD)


def test_one_reduction_per_step_for_every_layer():
    model = nn.ModuleList([_layer(seed=s) for s in range(3)])
    x_BTD, labels_BT = _batches(1)[0][0]
    for layer in model:
        layer(x_BTD, modality_labels=labels_BT)
    sizes = []
    apply_step_updates(model, reduce_fn=lambda t: sizes.append(t.numel()) or t)
    # per layer: the bins' [2, E] load and the Gaussian [2, 2D + 1] statistics, in one flat tensor
    assert sizes == [3 * (2 * E + 2 * (2 * D + 1))]
    assert len(stateful_modules(model)) == 6


def test_evaluation_forwards_record_nothing():
    layer = _layer().eval()
    x_BTD, labels_BT = _batches(1)[0][0]
    layer(x_BTD, modality_labels=labels_BT)
    assert int(layer.gate.binning.pending_load_ME.abs().sum()) == 0 and int(layer.scorer.pending_MX.abs().sum()) == 0


def test_a_loop_that_never_applies_the_updates_is_warned_once(monkeypatch):
    monkeypatch.setattr("ds_smoes.core.step_state.UNAPPLIED_WARNING_AFTER", 3)
    layer = _layer(score_type="hard")
    x_BTD, labels_BT = _batches(1)[0][0]
    with pytest.warns(UserWarning, match=r"register_step_updates\(optimizer, model\)") as record:
        for _ in range(5):
            layer(x_BTD, modality_labels=labels_BT)
    assert len(record) == 1
    assert UNAPPLIED_WARNING_AFTER >= 100  # a real loop applies every few forwards (gradient accumulation)


def test_innermost_optimizer_finds_the_torch_optimizer_inside_wrappers():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=1.0)

    class Wrapper:
        def __init__(self, inner):
            self.optimizer = inner
    assert innermost_optimizer(Wrapper(Wrapper(opt))) is opt
    with pytest.raises(TypeError, match="apply_step_updates"):
        innermost_optimizer(object())


def test_loaded_checkpoint_resets_the_host_step_mirror():
    layer = _layer(rebin_interval=1, rebin_freeze_step=3)
    x_BTD, labels_BT = _batches(1)[0][0]
    for _ in range(3):
        layer(x_BTD, modality_labels=labels_BT)
        apply_step_updates(layer)
    assert layer.gate.binning.frozen
    fresh = _layer(rebin_interval=1, rebin_freeze_step=3)
    assert not fresh.gate.binning.frozen
    fresh.load_state_dict(copy.deepcopy(layer.state_dict()))
    assert fresh.gate.binning.frozen and fresh.gate.binning.host_step == 3
