"""Routes recorded by hooks, the router statistics the simulator reads, and the bytes each dispatch
must send computed from the routes alone, all on a routing worked out by hand."""
import pytest
import torch
from torch import nn

from ds_smoes.bench.comm.routes import (LayerCall, RouteRecorder, bins_by_physical, expected_rank_once_dispatch_bytes,
                                   expected_stock_bytes, expert_rows_sent, expert_work, modality_load, own_bins,
                                   own_route_counts, remote_pairs)
from ds_smoes.core.config import SMoESConfig
from ds_smoes.parallel.dispatch import rank_hits, rank_once_volume, route_ranks, send_plan, stock_alltoall_bytes
from ds_smoes.moe.layer import SMoESMoE

# rank 0 of 2, experts e0 e1 on rank 0 and e2 e3 on rank 1 (bins 0 and 1 likewise), K = 2:
#   t0 text   -> e0 e1      t1 vision -> e2 e0      t2 vision -> e3 e2
#   t3 text   -> e3 --      t4 padding, no routes
CALL = LayerCall(labels_S=torch.tensor([0, 1, 1, 0, 0]), valid_S=torch.tensor([True, True, True, True, False]),
                 indices_KS=torch.tensor([[0, 2, 3, 3, -1], [1, 0, 2, -1, -1]]), capacity=3)
BINS_E = torch.tensor([0, 0, 1, 1])


def test_remote_pairs_and_rank_once_bytes_match_the_dispatch_plan():
    # t1, t2, t3 each need rank 1 once: 3 vectors of 8 float32 = 96 B, the dispatch's own figure
    assert remote_pairs(CALL, home_rank=0, experts_per_rank=2) == 3
    assert remote_pairs(CALL, home_rank=1, experts_per_rank=2) == 2  # seen from rank 1: t0, t1 need rank 0
    assert expected_rank_once_dispatch_bytes([CALL], 0, 2, hidden=8, element_size=4) == 96
    _, _, send_counts_R = send_plan(rank_hits(route_ranks(CALL.indices_KS, 2), 2))
    assert rank_once_volume(send_counts_R.tolist(), [0, 0], 0, 8, 4, 2)[0] == 96
    # a padding token that a gate routed anyway (DeepSpeed's top-2 gate) is sent, but is no valid pair
    padded = LayerCall(CALL.labels_S, CALL.valid_S, torch.tensor([[0, 2, 3, 3, 2], [1, 0, 2, -1, -1]]), 3)
    assert remote_pairs(padded, 0, 2) == 3 and remote_pairs(padded, 0, 2, valid_only=False) == 4
    assert expected_rank_once_dispatch_bytes([padded, CALL], 0, 2, 8, 4) == 7 * 32


def test_stock_bytes_from_the_capacity():
    assert expected_stock_bytes([CALL], num_experts=4, ep_size=2, hidden=8, element_size=4) == 384
    assert expected_stock_bytes([CALL, CALL], 4, 2, 8, 4) == 2 * stock_alltoall_bytes(4, 3, 8, 2, 4)


def test_expert_rows_per_rank_by_hand():
    # rank_once: the 7 routes e0 e1 | e2 e0 | e3 e2 | e3 -> 3 rows on rank 0 (e0 e1 e0), 4 on rank 1
    assert expert_rows_sent(CALL, False, num_experts=4, ep_size=2).tolist() == [3.0, 4.0]
    # stock: each rank's 2 experts get a capacity-3 slot block from this rank, used or not
    assert expert_rows_sent(CALL, True, 4, 2).tolist() == [6.0, 6.0]
    # over the group: call 1 ranks run [3 + 5, 4 + 1] rows, call 2 [2, 2] -> busiest 8 + 2, mean 6.5 + 2
    busiest, mean = expert_work(torch.tensor([[8.0, 5.0], [2.0, 2.0]]))
    assert (busiest, mean) == (10.0, 8.5)
    assert expert_work(torch.zeros(0, 2)) == (0.0, 0.0)


def test_router_statistics_by_hand():
    load_ME = modality_load([CALL], 4)
    assert load_ME.tolist() == [[1, 1, 0, 1], [1, 0, 2, 1]]  # t4 (padding) does not count
    # per bin: text [2, 1], vision [1, 3]; normalised vision - text = [-5/12, +5/12] -> vision owns bin 1
    own_MB = own_bins(load_ME, BINS_E, 2)
    assert own_MB.tolist() == [[True, False], [False, True]]
    # t0: 2 routes in text's bin 0; t3: its one route in bin 1 -> 0; t1: one in bin 1; t2: two in bin 1
    assert own_route_counts([CALL], BINS_E, own_MB, k=2).tolist() == [[1, 0, 1], [0, 1, 1]]


def test_placed_experts_keep_their_bins():
    # logical experts 1 and 2 swapped places (physical_E = [0, 2, 1, 3]); bins [0, 1, 0, 1] by logical id
    # are then [0, 0, 1, 1] by physical id: each bin on its own rank
    bin_P = bins_by_physical(torch.tensor([0, 1, 0, 1]), torch.tensor([0, 2, 1, 3]))
    assert bin_P.tolist() == [0, 0, 1, 1]
    # the same hand routing, now in physical ids, gives the same statistics as before the move
    assert own_route_counts([CALL], bin_P, own_bins(modality_load([CALL], 4), bin_P, 2), 2).tolist() == \
        [[1, 0, 1], [0, 1, 1]]


def test_own_bins_with_more_bins_follow_the_vision_share():
    # 4 bins of one expert; vision is 1/4 of the routes -> it owns round(0.25 * 4) = 1 bin, its most biased
    load_ME = torch.tensor([[10.0, 10.0, 1.0, 9.0], [0.0, 1.0, 8.0, 1.0]])
    own_MB = own_bins(load_ME, torch.arange(4), 4)
    assert own_MB.tolist() == [[True, True, False, True], [False, False, True, False]]


@pytest.mark.parametrize("dispatch", ["deepspeed", "rank_once"])
def test_recorder_sees_what_the_layer_routed(dispatch):
    cfg = SMoESConfig(num_experts=4, k=2, num_bins=2, score_type="hard", binning="fixed", dispatch=dispatch)
    torch.manual_seed(0)
    layer = SMoESMoE(8, nn.Linear(8, 8), cfg)
    recorder = RouteRecorder([layer])
    labels = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    with recorder:
        _, _, exp_counts = layer(torch.randn(2, 5, 8), mask, modality_labels=labels)
    (call,) = recorder.calls[0]
    (reported,) = recorder.moe_calls[0]
    assert torch.equal(call.labels_S, labels.reshape(-1)) and torch.equal(call.valid_S, mask.reshape(-1))
    assert call.capacity == reported.stats.capacity
    counts_E = torch.bincount(call.indices_KS[call.indices_KS >= 0], minlength=4)
    assert torch.equal(counts_E, exp_counts.long())
    assert torch.equal(modality_load([call], 4).float(), reported.stats.load_ME.float())
    layer(torch.randn(2, 5, 8), mask, modality_labels=labels)   # outside the recorder's block: not recorded
    assert len(recorder.calls[0]) == 1
