"""MSI and routing communication figures on hand-computed cases."""
import math

import torch

from ds_smoes.core.metrics import expert_modality_load, modality_specialization_index, routing_comm_stats


def test_msi_perfect_and_none():
    assert float(modality_specialization_index(torch.tensor([[10.0, 0.0]]), torch.tensor([[0.0, 7.0]]))) == 1.0
    assert float(modality_specialization_index(torch.tensor([[5.0, 5.0]]), torch.tensor([[2.0, 2.0]]))) == 0.0


def test_msi_by_hand_two_layers():
    text = torch.tensor([[6.0, 2.0, 2.0], [1.0, 1.0, 2.0]])
    vision = torch.tensor([[1.0, 1.0, 2.0], [3.0, 3.0, 2.0]])
    # layer 0: t = [.6, .2, .2], v = [.25, .25, .5]; Ct = [.6/.85, .2/.45, .2/.7]
    # layer 1: t = [.25, .25, .5], v = [.375, .375, .25]; Ct = [.25/.625, .25/.625, .5/.75]
    cts = [0.6 / 0.85, 0.2 / 0.45, 0.2 / 0.7, 0.25 / 0.625, 0.25 / 0.625, 0.5 / 0.75]
    expected = sum(2 * abs(c - 0.5) for c in cts) / 6
    assert math.isclose(float(modality_specialization_index(text, vision)), expected, rel_tol=1e-6)


def test_msi_normalises_by_modality_volume():
    # 100x more text than vision, both spread identically: no specialisation
    assert float(modality_specialization_index(torch.tensor([[100.0, 300.0]]), torch.tensor([[1.0, 3.0]]))) == 0.0


def test_msi_skips_unloaded_experts():
    text = torch.tensor([[4.0, 0.0, 0.0]])
    vision = torch.tensor([[0.0, 2.0, 0.0]])
    assert float(modality_specialization_index(text, vision)) == 1.0


def test_expert_modality_load_ignores_dropped_and_padding():
    indices = torch.tensor([[0, 1, -1, 2], [1, 2, 0, 0]])
    labels = torch.tensor([0, 1, 1, 0])
    valid = torch.tensor([True, True, True, False])
    load = expert_modality_load(indices, labels, valid, 3)
    # text token 0 -> e0, e1; vision token 1 -> e1, e2; vision token 2 -> (dropped), e0; token 3 padding
    assert load.tolist() == [[1, 1, 0], [1, 1, 1]]


def test_routing_comm_stats_by_hand():
    # 4 experts on 2 ranks: e0, e1 on rank 0; e2, e3 on rank 1. Home rank 0.
    rank_of_expert = torch.tensor([0, 0, 1, 1])
    indices = torch.tensor([[0, 2, 3, 1, 0], [1, 0, 2, -1, 3]])
    valid = torch.tensor([True, True, True, True, False])
    st = routing_comm_stats(indices, rank_of_expert, home_rank=0, valid_S=valid, ep_size=2)
    # token0 {0}, token1 {1, 0}, token2 {1}, token3 {0} (second route dropped); token4 padding
    assert math.isclose(float(st["cross_rank_rate"]), 2 / 4)
    assert math.isclose(float(st["ranks_per_token"]), (1 + 2 + 1 + 1) / 4)
    assert math.isclose(float(st["remote_pairs_per_token"]), 2 / 4)
    st1 = routing_comm_stats(indices, rank_of_expert, home_rank=1, valid_S=valid, ep_size=2)
    assert math.isclose(float(st1["cross_rank_rate"]), 3 / 4)
