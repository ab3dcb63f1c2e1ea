"""Baseline gates pinned on hand-computed cases, and every gate under DeepSpeed's MOELayer."""
import math

import pytest
import torch
from deepspeed.moe.experts import Experts
from deepspeed.moe.sharded_moe import MOELayer, topkgating
from torch import nn

from ds_smoes.moe.baselines import DeepSpeedTopKGate, LTDRGate, ltdr_tail_tokens, modality_expert_mask
from ds_smoes.core.config import SMoESConfig
from ds_smoes.moe.gate import RoutingInputs
from ds_smoes.core.losses import band_penalty, bin_kl_band_loss, gshard_balance_loss, modality_kl_band_loss, symmetric_kl
from ds_smoes.moe.registry import GATES, build_gate
from moelayer import GateWithInputs


def _inputs(labels, sample=None, valid=None):
    n = len(labels)
    return RoutingInputs(torch.nn.functional.one_hot(labels, 2).float(), labels,
                         torch.zeros(n, dtype=torch.long) if sample is None else sample,
                         torch.ones(n, dtype=torch.bool) if valid is None else valid)


# -- hard / hybrid ----------------------------------------------------------------------------------
def test_hard_masks_t2_v2_of_4():
    mask = modality_expert_mask(torch.tensor([0, 1]), 4, 2, 2)
    assert mask.tolist() == [[True, True, False, False], [False, False, True, True]]


def test_hybrid_masks_with_shared_experts():
    mask = modality_expert_mask(torch.tensor([0, 1]), 6, 2, 2)  # experts 4, 5 shared
    assert mask.tolist() == [[True, True, False, False, True, True], [False, False, True, True, True, True]]


def test_hard_gate_routes_each_modality_inside_its_experts_with_renormalised_softmax():
    cfg = SMoESConfig(gate="hard", num_experts=4, k=1, num_bins=2, score_type="hard")
    gate = build_gate(3, cfg)
    gate.wg.weight.data = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0, 2.0]])
    x = torch.tensor([[0.1, 0.0, 5.0], [0.1, 0.0, 5.0]])  # both prefer experts 2, 3 globally
    _, _, _, idx, _, gates, _ = gate(x, None, True, False, inputs=_inputs(torch.tensor([0, 1])))
    assert idx.tolist() == [[0, 3]]  # the text token cannot reach 2/3; it falls back inside [0, 2)
    # text token: softmax over logits (0.1, 0); vision: softmax over (5, 10)
    text_p = math.exp(0.1) / (math.exp(0.1) + 1.0)
    assert torch.allclose(gates[0], torch.tensor([text_p, math.exp(10) / (math.exp(5) + math.exp(10))]))


def test_modality_split_rejects_impossible_layouts():
    from ds_smoes.core.config import validate
    from ds_smoes.core.errors import ConfigError

    with pytest.raises(ConfigError, match="k=3 exceeds the experts a token may use"):
        validate(SMoESConfig, {"gate": "hard", "num_experts": 4, "k": 3, "num_bins": 2})
    with pytest.raises(ConfigError, match="needs shared_experts"):
        validate(SMoESConfig, {"gate": "hybrid", "num_experts": 4, "k": 1, "num_bins": 2})
    with pytest.raises(ConfigError, match="only applies to gate 'hybrid'"):
        validate(SMoESConfig, {"gate": "smoes", "num_experts": 4, "num_bins": 2, "shared_experts": 1})


# -- LTDR --------------------------------------------------------------------------------------------
def test_ltdr_tail_tokens_by_hand():
    probs = torch.tensor([
        [0.25, 0.25, 0.25, 0.25],  # vision, var 0
        [0.70, 0.10, 0.10, 0.10],  # vision, var 0.0675
        [0.40, 0.20, 0.20, 0.20],  # vision, var 0.0075
        [0.97, 0.01, 0.01, 0.01],  # text: never tail
        [0.97, 0.01, 0.01, 0.01],  # vision of another sample alone: var == its mean, not tail
    ])
    labels = torch.tensor([1, 1, 1, 0, 1])
    sample = torch.tensor([0, 0, 0, 0, 1])
    # sample 0 vision mean variance = (0 + 0.0675 + 0.0075) / 3 = 0.025: only token 1 exceeds it
    tail = ltdr_tail_tokens(probs, labels, sample, torch.ones(5, dtype=torch.bool))
    assert tail.tolist() == [False, True, False, False, False]


def test_ltdr_gate_gives_tail_tokens_top_a_with_renormalised_weights():
    cfg = SMoESConfig(gate="ltdr", num_experts=4, k=1, num_bins=2, ltdr_top_a=3, score_type="hard")
    gate = build_gate(4, cfg)
    assert isinstance(gate, LTDRGate) and gate.num_routes == 3
    gate.wg.weight.data = torch.eye(4)
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [3.0, 1.0, 0.5, 0.0], [1.0, 0.5, 0.0, 0.0]])
    _, _, _, idx, _, gates, counts = gate(logits, None, True, False, inputs=_inputs(torch.tensor([1, 1, 0])))
    probs = logits.softmax(-1)
    # vision variances: token 0 is 0, token 1 > 0 -> token 1 is the tail; text token 2 keeps top-1
    assert idx[:, 1].tolist() == [0, 1, 2]
    assert idx[1:, 0].tolist() == [-1, -1] and idx[1:, 2].tolist() == [-1, -1]
    top3 = probs[1, :3]
    assert torch.allclose(gates[:, 1], top3 / top3.sum())
    assert int(counts.sum()) == 1 + 3 + 1
    _, named = gate.losses(gate.route(logits, _inputs(torch.tensor([1, 1, 0]))))   # the router's calls, one by one
    assert math.isclose(float(named["tail_share"]), 0.5)


def test_ltdr_balance_loss_sees_text_tokens_only():
    cfg = SMoESConfig(gate="ltdr", num_experts=4, k=1, num_bins=2, ltdr_top_a=2, score_type="hard", alpha_bal=1.0)
    gate = build_gate(4, cfg)
    gate.wg.weight.data = torch.eye(4)
    text = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0]])
    for vision in (torch.tensor([[0, 0, 5.0, 0]]), torch.tensor([[0, 0, 0, -3.0]])):
        l_aux = gate(torch.cat([text, vision]), None, True, False, inputs=_inputs(torch.tensor([0, 0, 1])))[0]
        probs = text.softmax(-1)
        expected = gshard_balance_loss(probs, torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool))
        assert torch.allclose(l_aux, expected)


# -- KL band (SMAR, and the SMoES KL ablation) --------------------------------------------------------
def test_symmetric_kl_and_band_by_hand():
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])
    kl = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1) + 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert math.isclose(float(symmetric_kl(p, q)), kl, rel_tol=1e-5)
    assert float(band_penalty(torch.tensor(0.5), 0.2, 1.0)) == 0.0
    assert math.isclose(float(band_penalty(torch.tensor(0.05), 0.2, 1.0)), 0.15, rel_tol=1e-6)
    assert math.isclose(float(band_penalty(torch.tensor(1.5), 0.2, 1.0)), 0.5, rel_tol=1e-6)


def test_smar_loss_uses_mean_routing_of_each_modality():
    probs = torch.tensor([[0.6, 0.4], [0.4, 0.6], [0.9, 0.1], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    loss, kl = modality_kl_band_loss(probs, labels, torch.ones(4, dtype=torch.bool), 0.2, 1.0)
    assert float(kl) == pytest.approx(0.0, abs=1e-6)  # both means are (0.5, 0.5)
    assert float(loss) == pytest.approx(0.2, abs=1e-6)  # below the band by 0.2
    only_text, _ = modality_kl_band_loss(probs, torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.bool),
                                         0.2, 1.0)
    assert float(only_text) == 0.0


def test_bin_kl_ablation_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    loss, kl = bin_kl_band_loss(probs, torch.eye(2), torch.tensor([0, 1]), torch.tensor([0, 0]), 0.0, 1.0)
    expected = 0.7 * math.log(0.9 / 0.2) + 0.7 * math.log(0.8 / 0.1)  # sym KL of (0.9, 0.1) vs (0.2, 0.8)
    assert math.isclose(float(kl), expected, rel_tol=1e-5)
    assert math.isclose(float(loss), expected - 1.0, rel_tol=1e-5)


# -- topk: DeepSpeed's gate, untouched -------------------------------------------------------------
def test_topk_gate_is_deepspeeds_routing_scaled_by_alpha():
    cfg = SMoESConfig(gate="topk", num_experts=8, k=4, num_bins=2, alpha_bal=0.5, drop_tokens=True,
                      capacity_factor=1.0, min_capacity=1)
    gate = build_gate(6, cfg)
    assert isinstance(gate, DeepSpeedTopKGate)
    x = torch.randn(16, 6)
    l_aux, cap, _, idx, loc, gates, counts = gate(x, None, True, False,
                                                  inputs=_inputs(torch.zeros(16, dtype=torch.long)))
    ref = topkgating(torch.nn.functional.linear(x, gate.wg.weight), 4, 1.0, 1, True, None, sparse_routes=True)
    assert torch.equal(idx, ref[3]) and torch.equal(loc, ref[4]) and torch.allclose(gates, ref[5])
    assert torch.allclose(l_aux, 0.5 * ref[0]) and int(cap) == int(ref[1])


# -- every gate through DeepSpeed's MOELayer -------------------------------------------------------------
GATE_CONFIGS = {
    "smoes": {}, "topk": {}, "hard": {}, "hybrid": {"num_experts": 6, "shared_experts": 2},
    "ltdr": {"ltdr_top_a": 3}, "smar": {}, "smoes-kl": {"gate": "smoes", "bin_objective": "kl"},
}


@pytest.mark.parametrize("name", sorted(GATE_CONFIGS))
@pytest.mark.parametrize("k", [1, 2])
def test_every_gate_under_moelayer_matches_its_routes(name, k):
    torch.manual_seed(0)
    kw = {"gate": name, "num_experts": 4, "k": k, "num_bins": 2, "score_type": "hard"}
    kw.update(GATE_CONFIGS[name])
    cfg = SMoESConfig(**kw)
    gate = build_gate(8, cfg)
    e = cfg.num_experts
    experts = Experts(nn.Linear(8, 8), e, "ep_size_1")
    for i, ex in enumerate(experts.deepspeed_experts):
        ex.weight.data.normal_(generator=torch.Generator().manual_seed(i))
    layer = MOELayer(GateWithInputs(gate), experts, "ep_size_1", 1, e)
    layer.eval()  # no Gumbel sampling of DeepSpeed's 2nd expert in eval, so both calls route alike
    x = torch.randn(10, 8, requires_grad=True)
    labels = torch.tensor([0, 1] * 5)
    valid = torch.ones(10, dtype=torch.bool)
    valid[-1] = False
    layer.gate.inputs = _inputs(labels, torch.arange(10) // 5, valid)
    out = layer(x, None)
    l_aux, cap, _, idx, loc, gates, _ = gate(x, None, True, False, inputs=_inputs(labels, torch.arange(10) // 5, valid))
    ref = torch.zeros(10, 8)
    for r in range(idx.shape[0]):
        for s in range(10):
            if idx[r, s] >= 0:
                ref[s] += gates[r, s] * experts.deepspeed_experts[int(idx[r, s])](x[s])
    assert torch.allclose(out, ref, atol=1e-5)
    assert (idx[:, -1] == -1).all() or name == "topk"  # DeepSpeed's top-2 routes padding too
    if name in ("hard", "hybrid"):
        text, vision = cfg.modality_split
        allowed = modality_expert_mask(labels, e, text, vision)
        for r in range(idx.shape[0]):
            used = idx[r] >= 0
            assert allowed[used.nonzero().squeeze(-1), idx[r][used].long()].all()
    (out.sum() + l_aux).backward()
    assert torch.isfinite(x.grad).all() and gate.wg.weight.grad is not None


def test_topk_samples_second_expert_in_training_only():
    cfg = SMoESConfig(gate="topk", num_experts=8, k=2, num_bins=2)
    gate = build_gate(6, cfg)
    x = torch.randn(64, 6)
    routes = {}
    for mode in ("eval", "train"):
        getattr(gate, mode)()
        seen = []
        for _ in range(2):
            seen.append(gate(x, None, True, False, inputs=_inputs(torch.zeros(64, dtype=torch.long)))[3])
        routes[mode] = seen
    assert torch.equal(routes["eval"][0], routes["eval"][1])          # deterministic evaluation
    assert not torch.equal(routes["train"][0][1], routes["train"][1][1])  # DeepSpeed's Gumbel 2nd choice
    assert gate.top2_2nd_expert_sampling  # the configured value is left as DeepSpeed's default


def test_registry_names_every_config_gate():
    from typing import get_args

    from ds_smoes.core.config import GateType

    assert set(GATES) == set(get_args(GateType))
