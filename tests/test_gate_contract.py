"""SMoESGate under DeepSpeed's own MOELayer: the sparse-route contract of the pinned version."""
import deepspeed
import pytest
import torch
from deepspeed.moe.experts import Experts
from deepspeed.moe.sharded_moe import MOELayer, TopKGate
from torch import nn

from ds_smoes.moe.updates import apply_step_updates
from ds_smoes.core.config import SMoESConfig
from ds_smoes.moe.collector import RoutingCollector
from ds_smoes.moe.gate import RoutingInputs, SMoESGate
from ds_smoes.moe.layer import SMoESMoE
from ds_smoes.core.losses import bin_balance_loss, mutual_information_loss
from moelayer import GateWithInputs

D, E, S = 8, 8, 12


def test_deepspeed_is_the_pinned_version():
    # The gate targets 0.19.8's contract (MOELayer calls gate(x, used_token, True, use_tutel)).
    assert deepspeed.__version__ == "0.19.8"
    assert issubclass(SMoESGate, TopKGate)


def _inputs(labels, valid=None):
    n = len(labels)
    return RoutingInputs(torch.nn.functional.one_hot(labels, 2).float(), labels, torch.arange(n) // 4,
                         torch.ones(n, dtype=torch.bool) if valid is None else valid)


def _layer(k, drop_tokens=False):
    torch.manual_seed(k)
    cfg = SMoESConfig(num_experts=E, k=k, ep_size=1, num_bins=4, score_type="hard", drop_tokens=drop_tokens,
                      alpha_bal=0.5, alpha_mi=0.25)
    gate = SMoESGate(D, cfg)
    expert = nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D))
    experts = Experts(expert, E, "ep_size_1")
    for i, ex in enumerate(experts.deepspeed_experts):  # distinct experts
        for p in ex.parameters():
            p.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(100 + i))
    return MOELayer(GateWithInputs(gate), experts, "ep_size_1", 1, E), gate, experts


@pytest.mark.parametrize("k", [1, 2, 4])
def test_moelayer_output_matches_reference_and_contract(k):
    layer, gate, experts = _layer(k)
    x = torch.randn(S, D, requires_grad=True)
    labels = torch.tensor([0, 1] * (S // 2))
    valid = torch.ones(S, dtype=torch.bool)
    valid[-2:] = False  # padding
    layer.gate.inputs = _inputs(labels, valid)
    out = layer(x, None)

    # contract, called the way MOELayer calls it
    l_aux, capacity, num_experts, idx, loc, gates, counts = gate(x, None, True, False,
                                                                 inputs=_inputs(labels, valid))
    assert num_experts == E and int(capacity) >= 1
    assert idx.shape == loc.shape == gates.shape == (k, S)
    assert idx.dtype == torch.int32 and loc.dtype == torch.int32 and gates.dtype == torch.float32
    assert (idx[:, -2:] == -1).all() and (gates[:, -2:] == 0).all()
    assert int(counts.sum()) == k * (S - 2)
    assert (loc < int(capacity)).all()

    # independent reference: global softmax, global top-k, weights renormalised for k > 1
    with torch.no_grad():
        probs = torch.softmax(x @ gate.wg.weight.T, dim=-1)
        val, top = probs.topk(k, dim=1)
        w = val / val.sum(1, keepdim=True) if k > 1 else val
        ref = torch.zeros(S, D)
        for s in range(S - 2):
            for j in range(k):
                ref[s] += w[s, j] * experts.deepspeed_experts[int(top[s, j])](x[s])
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.equal(out[-2:], torch.zeros(2, D))

    # l_aux = alpha_bal * L_bal + alpha_mi * L_MI of the same routing
    selected = torch.zeros(S, E, dtype=torch.bool).scatter_(1, top, True) & valid.unsqueeze(1)
    bins = gate.binning.bin_E
    expected = 0.5 * bin_balance_loss(probs, selected, bins, valid) + 0.25 * mutual_information_loss(
        probs, torch.nn.functional.one_hot(labels, 2).float(), bins, torch.arange(S) // 4, valid)
    assert torch.allclose(l_aux, expected, atol=1e-6)

    (out.sum() + l_aux).backward()
    assert gate.wg.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in experts.parameters())


def test_capacity_limited_routing_drops_instead_of_overflowing():
    layer, gate, _ = _layer(2, drop_tokens=True)
    gate.capacity_factor = 0.25
    gate.config = gate.config.model_copy(update={"capacity_factor": 0.25, "min_capacity": 1})
    x = torch.randn(S, D)
    _, capacity, _, idx, loc, _, counts = gate(x, None, True, False,
                                               inputs=_inputs(torch.zeros(S, dtype=torch.long)))
    kept = idx >= 0
    assert int(capacity) == 1
    assert int(kept.sum()) < int(counts.sum())
    assert (loc[kept] < 1).all()


def test_gate_without_modality_information_says_how_to_fix():
    _, gate, _ = _layer(1)
    with pytest.raises(RuntimeError, match="inputs=RoutingInputs"):
        gate(torch.randn(S, D), None, True, False)


def test_dense_contract_is_refused_with_a_clear_message():
    _, gate, _ = _layer(1)
    with pytest.raises(RuntimeError, match="sparse-route"):
        gate(torch.randn(S, D), None, False, False, inputs=_inputs(torch.zeros(S, dtype=torch.long)))


@pytest.mark.parametrize("score_type", ["attention", "gaussian", "hard"])
def test_layer_state_dict_carries_smoes_buffers(score_type):
    cfg = SMoESConfig(num_experts=4, k=2, ep_size=1, num_bins=2, score_type=score_type, rebin_interval=1)
    moe = SMoESMoE(D, nn.Linear(D, D), cfg)
    x = torch.randn(2, 6, D)
    labels = torch.tensor([[1, 1, 1, 0, 0, 0]] * 2)
    scores = torch.nn.functional.one_hot(labels, 2).float() if score_type == "attention" else None
    with RoutingCollector([moe]) as collector:
        out, l_aux, _ = moe(x, modality_labels=labels, modality_scores=scores)
    assert out.shape == x.shape and torch.isfinite(l_aux)
    keys = set(moe.state_dict())
    assert {"deepspeed_moe.gate.binning.bin_E", "deepspeed_moe.gate.binning.load_ema_ME"} <= keys
    assert not any("pending" in k for k in keys)  # records between steps are not checkpointed
    if score_type == "gaussian":
        assert {"scorer.mean_MD", "scorer.var_MD"} <= keys
        assert moe.scorer.count_M.tolist() == [0.0, 0.0]   # recorded, applied at the optimizer step
        apply_step_updates(moe)
        assert moe.scorer.count_M.tolist() == [6.0, 6.0]
    [[call]] = collector.take()
    assert call.stats.num_tokens == 12 and call.stats.load_ME.sum() == 24


def test_attention_score_type_requires_scores():
    moe = SMoESMoE(D, nn.Linear(D, D), SMoESConfig(num_experts=4, k=1, num_bins=2, score_type="attention"))
    with pytest.raises(ValueError, match="modality_scores"):
        moe(torch.randn(1, 3, D), modality_labels=torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("score_type", ["attention", "gaussian"])
def test_baseline_gates_neither_need_nor_compute_soft_scores(score_type):
    # only SMoES reads the soft score: a top-k layer needs no attention score and fits no Gaussian statistics
    cfg = SMoESConfig(num_experts=4, k=2, ep_size=1, num_bins=2, score_type=score_type, gate="topk")
    assert not cfg.uses_soft_scores and SMoESConfig(num_experts=4, num_bins=2).uses_soft_scores
    moe = SMoESMoE(D, nn.Linear(D, D), cfg)
    out, _, _ = moe(torch.randn(2, 3, D), modality_labels=torch.tensor([[1, 0, 0], [1, 1, 0]]))
    assert out.shape == (2, 3, D)
    if score_type == "gaussian":
        assert moe.scorer.count_M.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("gate, tracked", [("smoes", True), ("topk", False), ("ltdr", False)])
def test_model_tracks_the_attention_score_only_for_a_gate_that_reads_it(gate, tracked, monkeypatch):
    from ds_smoes.model import TinyMoEVLM
    from ds_smoes.model.attention import SelfAttention
    from ds_smoes.model.config import ModelConfig

    asked = []
    forward = SelfAttention.forward
    monkeypatch.setattr(SelfAttention, "forward",
                        lambda self, x, mask=None, valid=None, modality=None: asked.append(modality is not None)
                        or forward(self, x, mask, valid, modality))
    cfg = SMoESConfig(num_experts=4, k=2, ep_size=1, num_bins=2, score_type="attention", gate=gate)
    model = TinyMoEVLM(ModelConfig(d_model=16, n_layers=2, n_heads=2, patch_size=4, vision_dim=16, vision_layers=0,
                                   max_len=16), vocab_size=10, image_token_id=9, smoes=cfg)
    ids = torch.tensor([[9, 9, 9, 9, 1, 2]])
    out = model(ids, torch.ones_like(ids), (ids == 9).long(), torch.randn(1, 1, 8, 8), torch.tensor([True]))
    assert torch.isfinite(out.logits_BTV).all()
    assert asked == [tracked, tracked]  # the two decoder blocks


@pytest.mark.parametrize("score_type", ["attention", "gaussian", "hard"])
def test_samples_without_image_or_text_keep_losses_finite(score_type):
    cfg = SMoESConfig(num_experts=4, k=2, ep_size=1, num_bins=2, score_type=score_type, alpha_mi=1.0, alpha_bal=1.0)
    moe = SMoESMoE(D, nn.Linear(D, D), cfg)
    x = torch.randn(3, 5, D, requires_grad=True)
    labels = torch.tensor([[0] * 5, [1] * 5, [0] * 5])        # text only, vision only, padding only
    mask = torch.tensor([[True] * 5, [True] * 5, [False] * 5])
    scores = torch.nn.functional.one_hot(labels, 2).float() if score_type == "attention" else None
    with RoutingCollector([moe]) as collector:
        out, l_aux, _ = moe(x, mask, modality_labels=labels, modality_scores=scores)
    (out.sum() + l_aux).backward()
    assert torch.isfinite(l_aux) and torch.isfinite(x.grad).all()
    assert torch.isfinite(moe.gate.wg.weight.grad).all()
    assert collector.last()[0].stats.num_tokens == 10


def test_adaptive_bins_stop_observing_once_frozen():
    # Each optimizer step all-reduces the recorded modality loads over the world (one collective for every
    # layer): once the bins are frozen the gate records nothing and the step reduces nothing, so a long run
    # pays that collective for freeze_step steps only.
    cfg = SMoESConfig(num_experts=E, k=2, ep_size=1, num_bins=4, score_type="hard", binning="adaptive",
                      rebin_interval=2, rebin_freeze_step=4)
    gate = SMoESGate(D, cfg).train()
    reduced = []
    reduce_fn = lambda t: reduced.append(t.clone()) or t   # noqa: E731  (the world sum of one rank: the identity)
    labels = torch.tensor([0, 1] * (S // 2))
    for _ in range(7):
        gate(torch.randn(S, D), None, True, False, inputs=_inputs(labels))
        apply_step_updates(gate, reduce_fn)
    assert len(reduced) == 4 and int(gate.binning.step) == 4 and gate.binning.frozen
    assert all(int(r.sum()) == 2 * S for r in reduced)  # load_ME: k routes of every token, by modality
    frozen_bins = gate.binning.bin_E.clone()
    gate(torch.randn(S, D), None, True, False, inputs=_inputs(labels))
    assert int(gate.binning.pending_load_ME.sum()) == 0   # frozen: nothing recorded
    apply_step_updates(gate, reduce_fn)
    assert torch.equal(gate.binning.bin_E, frozen_bins) and len(reduced) == 4
