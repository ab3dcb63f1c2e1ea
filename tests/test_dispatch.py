"""Token-once-per-rank dispatch: the plan and its bytes by hand, parity with DeepSpeed's MOELayer
on one process, and forward + backward on 2 real gloo ranks against a 1-process reference; bf16 rows
packed with their float32 routes in one exchange, and the dispatch's host-sync budget."""
import contextlib
import copy
from pathlib import Path

import pytest
import torch
from deepspeed.moe.sharded_moe import MOELayer
from moelayer import GateWithInputs
from torch import nn

from ds_smoes.core.config import SMoESConfig
from ds_smoes.testing.host_syncs import count_host_syncs
from ds_smoes.parallel.dispatch import (INDEX_BYTES, WEIGHT_BYTES, CommVolume, exchange_rows, expert_pair_counts,
                                        local_routes, pack_rows, plan_rank_once, rank_hits, rank_once_dispatch,
                                        rank_once_moe, rank_once_volume, route_ranks, row_routes, send_order, send_plan,
                                        stock_alltoall_bytes, stock_volume, token_rank_stats, unpack_rows)
from ds_smoes.core.scores import hard_scores
from ds_smoes.moe.collector import RoutingCollector
from ds_smoes.moe.gate import RoutingInputs, SMoESGate
from ds_smoes.moe.layer import SMoESMoE
from ds_smoes.core.metrics import routing_comm_stats


D = 8

# 2 EP ranks, 4 experts (rank 0: e0 e1, rank 1: e2 e3), this is rank 0; 5 tokens, K = 2 routes:
#   t0 -> e0 e1    rank 0 only
#   t1 -> e2 e0    ranks 1 and 0
#   t2 -> e3 e2    rank 1 only: two experts there, the token travels once
#   t3 -> e3 --    rank 1 (one unused route)
#   t4 -> -- --    padding
INDICES_KS = torch.tensor([[0, 2, 3, 3, -1],
                           [1, 0, 2, -1, -1]], dtype=torch.int32)
GATES_KS = torch.tensor([[0.6, 0.7, 0.5, 1.0, 0.0],
                         [0.4, 0.3, 0.5, 0.0, 0.0]])
VALID_S = torch.tensor([True, True, True, True, False])


def test_send_plan_by_hand():
    route_rank_KS = route_ranks(INDICES_KS, num_local_experts=2)
    assert route_rank_KS.tolist() == [[0, 1, 1, 1, -1], [0, 0, 1, -1, -1]]
    hits_SR = rank_hits(route_rank_KS, ep_size=2)
    assert hits_SR.tolist() == [[True, False], [True, True], [False, True], [False, True], [False, False]]
    token_N, rank_N, send_counts_R = send_plan(hits_SR)
    # grouped by destination: rank 0 gets t0 t1, rank 1 gets t1 t2 t3
    assert token_N.tolist() == [0, 1, 1, 2, 3] and rank_N.tolist() == [0, 0, 1, 1, 1]
    assert send_counts_R.tolist() == [2, 3]
    # every row carries its token's weights, then its physical expert ids (the same row whatever the rank)
    routes_NX = row_routes(INDICES_KS, GATES_KS, token_N)
    assert torch.allclose(routes_NX, torch.tensor([[0.6, 0.4, 0, 1], [0.7, 0.3, 2, 0], [0.7, 0.3, 2, 0],
                                                   [0.5, 0.5, 3, 2], [1.0, 0.0, 3, -1]]))
    # rank 0 receives rows 0-1 and keeps the routes to e0 e1 (local 0 1); rank 1 rows 2-4, e2 e3 -> local 0 1
    local_0, weight_0 = local_routes(routes_NX[:2], home_rank=0, num_local_experts=2)
    local_1, weight_1 = local_routes(routes_NX[2:], home_rank=1, num_local_experts=2)
    assert torch.cat([local_0, local_1]).tolist() == [[0, 1], [-1, 0], [0, -1], [1, 0], [1, -1]]
    assert torch.allclose(torch.cat([weight_0, weight_1]),
                          torch.tensor([[0.6, 0.4], [0.0, 0.3], [0.7, 0.0], [0.5, 0.5], [1.0, 0.0]]))


def test_bytes_and_rates_by_hand():
    # rank 0 sends t1 t2 t3 to rank 1 (3 vectors of 8 float32 = 96 B); rank 1 sent us 4 rows (recv [2, 4]),
    # which go back combined (4 * 32 = 128 B); its own 2 rows never leave the rank.  Metadata: one int64
    # count to rank 1 (8 B) and, per row sent to rank 1, 2 expert ids + 2 weights (float32 each) = 48 B.
    assert rank_once_volume([2, 3], [2, 4], home_rank=0, hidden=D, element_size=4, num_routes=2) == (96, 128, 56)
    # the same counts seen from rank 1 (its own chunk is the second)
    assert rank_once_volume([4, 1], [3, 5], home_rank=1, hidden=D, element_size=2, num_routes=2) == (64, 48, 72)
    hits_SR = rank_hits(route_ranks(INDICES_KS, 2), 2)
    # valid t0..t3: t1, t2, t3 have an expert on rank 1 -> 3/4; ranks per token (1 + 2 + 1 + 1) / 4
    assert token_rank_stats(hits_SR, 0, VALID_S) == (0.75, 1.25, 4)
    ref = routing_comm_stats(INDICES_KS, torch.tensor([0, 0, 1, 1]), 0, VALID_S, 2)
    assert float(ref["cross_rank_rate"]) == 0.75 and float(ref["ranks_per_token"]) == 1.25


def test_stock_alltoall_bytes_by_hand():
    # [E=4, C=3, D=8] float32 = 384 B per all-to-all, own [2, 3, 8] chunk (192 B) stays: 192 B, twice
    assert stock_alltoall_bytes(4, 3, 8, 2, 4) == 384
    # 64 experts on 8 ranks, capacity 10, D 4096, bf16: 2 * 56 * 10 * 4096 * 2
    assert stock_alltoall_bytes(64, 10, 4096, 8, 2) == 9_175_040
    assert stock_alltoall_bytes(4, 3, 8, 1, 4) == 0


def test_rank_once_bytes_on_four_ranks_by_hand():
    # rank 1 of 4 sends [2, 3, 0, 1] rows (its own 3 stay) and received [1, 4, 2, 0] (its own 4 stay):
    # 3 vectors out, 3 back; metadata: 3 int64 counts + 3 rows x 2 routes x (float32 id + float32 weight)
    assert rank_once_volume([2, 3, 0, 1], [1, 4, 2, 0], home_rank=1, hidden=8, element_size=4,
                            num_routes=2) == (96, 96, 3 * 8 + 3 * 2 * 8)
    # a rank that sends nothing still announces its (zero) counts
    assert rank_once_volume([5, 0, 0, 0], [5, 1, 0, 0], 0, 8, 4, 2) == (0, 32, 24)


def test_comm_volume_of_the_stock_dispatch_by_hand():
    vol = stock_volume(4, 3, 8, 2, 4, cross_rank_rate=0.5, ranks_per_token=1.5, num_tokens=10)
    assert vol == CommVolume("deepspeed", 192, 192, 0, 0.5, 1.5, 10)  # half of 384 B each way
    assert vol.remote_bytes == vol.total_bytes == 384
    assert CommVolume("rank_once", 96, 128, 56, 0.75, 1.25, 4).total_bytes == 280


def test_rank_once_matches_a_loop_over_routes_with_gradients():
    torch.manual_seed(0)
    experts = nn.ModuleList(nn.Linear(D, D) for _ in range(4))
    x = torch.randn(5, D, requires_grad=True)
    gates = GATES_KS.clone().requires_grad_(True)
    out, comm = rank_once_moe(x, INDICES_KS, gates, list(experts), num_experts=4)
    ref = torch.zeros(5, D)
    for k in range(2):
        for s in range(5):
            e = int(INDICES_KS[k, s])
            if e >= 0:
                ref[s] = ref[s] + gates[k, s] * experts[e](x[s])
    assert torch.allclose(out, ref, atol=1e-6) and torch.equal(out[4], torch.zeros(D))
    probe = torch.randn(5, D)
    grads = torch.autograd.grad((out * probe).sum(), [x, gates, *experts.parameters()])
    ref_grads = torch.autograd.grad((ref * probe).sum(), [x, gates, *experts.parameters()])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, ref_grads))
    assert comm.remote_bytes == comm.metadata_bytes == 0 and comm.num_tokens == 4 and comm.ranks_per_token == 1.0


def _layer(dispatch: str, use_residual: bool = False, **fields) -> SMoESMoE:
    cfg = SMoESConfig(**{"num_experts": 4, "num_bins": 2, "score_type": "hard", "binning": "fixed", "alpha_bal": 0.5,
                         "alpha_mi": 0.25, "dispatch": dispatch, **fields})
    torch.manual_seed(0)
    layer = SMoESMoE(D, nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D)), cfg, use_residual=use_residual)
    for i, expert in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
        for p in expert.parameters():
            p.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(100 + i))
    return layer


def _run(layer: SMoESMoE, collector: RoutingCollector | None = None):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, D, generator=g, requires_grad=True)
    labels = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, -1] = False
    with collector or contextlib.nullcontext():
        out, l_aux, counts = layer(x, mask, modality_labels=labels)
    ((out * torch.randn(out.shape, generator=g)).sum() + l_aux).backward()
    expert_grads = [p.grad for p in layer.deepspeed_moe.experts.parameters()]
    return out, l_aux, counts, x.grad, layer.gate.wg.weight.grad, expert_grads


@pytest.mark.parametrize("fields", [{"k": 1}, {"k": 2}, {"k": 2, "drop_tokens": True, "capacity_factor": 0.5,
                                                           "min_capacity": 1}], ids=["k1", "k2", "k2_capacity_drops"])
def test_stock_dispatcher_is_deepspeeds_moelayer_forward(fields):
    # the stock dispatcher runs DeepSpeed's own encode / all-to-all / decode in MOELayer.forward's order (the layer
    # calls the gate with its modality inputs first); DeepSpeed's MOELayer.forward on the same gate and experts
    layer = _layer("deepspeed", **fields)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, D, generator=g)
    labels = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, -1] = False
    probe = torch.randn(2, 6, D, generator=g)
    moe = layer.deepspeed_moe
    reference = MOELayer(GateWithInputs(moe.gate), moe.experts, "ep_size_1", 1, moe.num_local_experts)
    reference.gate.inputs = RoutingInputs(hard_scores(labels.reshape(-1)), labels.reshape(-1),
                                          torch.arange(2).repeat_interleave(6), mask.reshape(-1))
    results = []
    for run in (lambda x: layer(x, mask, modality_labels=labels)[0], lambda x: reference(x, None)):
        x_in = x.clone().requires_grad_(True)
        out = run(x_in)
        grads = torch.autograd.grad((out * probe).sum(), [x_in, *moe.experts.parameters()])
        results.append((out, grads))
    (out, grads), (ref_out, ref_grads) = results
    assert torch.equal(out, ref_out) and out.abs().sum() > 0
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


@pytest.mark.parametrize("fields", [{"k": 1}, {"k": 2}, {"gate": "ltdr", "k": 1, "ltdr_top_a": 3},
                                    {"k": 2, "drop_tokens": True, "capacity_factor": 0.5, "min_capacity": 1},
                                    {"k": 2, "use_residual": True}],
                         ids=["k1", "k2", "ltdr_variable_k", "k2_capacity_drops", "k2_residual"])
def test_rank_once_equals_deepspeed_moelayer_on_one_rank(fields):
    stock, mine = _run(_layer("deepspeed", **fields)), _run(_layer("rank_once", **fields))
    out, l_aux, counts, x_grad, wg_grad, expert_grads = mine
    assert out.shape == (2, 6, D)
    assert torch.allclose(out, stock[0], atol=1e-5) and torch.equal(l_aux, stock[1]) and torch.equal(counts, stock[2])
    assert torch.allclose(x_grad, stock[3], atol=1e-5)
    assert wg_grad.abs().sum() > 0 and torch.allclose(wg_grad, stock[4], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(expert_grads, stock[5]))


def test_variable_k_gate_really_sends_extra_routes():
    layer = _layer("rank_once", gate="ltdr", k=1, ltdr_top_a=3)
    collector = RoutingCollector([layer])
    counts = _run(layer, collector)[2]
    [[call]] = collector.take()
    assert call.comm().ranks_per_token == 1.0  # one rank holds every expert
    assert int(counts.sum()) > 11  # some tail token used more than k = 1 expert


def test_both_dispatches_report_their_volume_to_a_collector_only():
    for dispatch in ("deepspeed", "rank_once"):
        layer = _layer(dispatch, k=2)
        _run(layer)   # no collector: nothing is kept
        assert not any(name.startswith("last_") for name in vars(layer)) and layer.routing_collector is None
        collector = RoutingCollector([layer])
        _run(layer, collector)
        assert layer.routing_collector is None   # detached when the block ends
        [[call]] = collector.take()
        comm = call.comm()
        assert comm.dispatch == dispatch and comm.num_tokens == 11 and comm.total_bytes == 0  # one rank: nothing leaves
        assert call.remote_bytes == 0
        stats = call.stats.comm_physical
        assert comm.cross_rank_rate == float(stats["cross_rank_rate"]) == 0.0
        assert comm.ranks_per_token == float(stats["ranks_per_token"]) == 1.0


def test_statistics_are_those_of_their_forward_even_when_read_later():
    # a call's statistics are computed in its forward: a placement made before they are read cannot change them
    for dispatch in ("deepspeed", "rank_once"):
        read_at_once, read_later = _layer(dispatch, k=2), _layer(dispatch, k=2)
        first, later = RoutingCollector([read_at_once]), RoutingCollector([read_later])
        _run(read_at_once, first)
        _run(read_later, later)
        [[expected]] = first.take()
        read_later.gate.physical_E.copy_(torch.tensor([3, 2, 1, 0]))
        read_later.gate.binning.bin_E.copy_(torch.tensor([1, 1, 0, 0]))
        [[call]] = later.take()
        assert call.stats.bin_E.tolist() == [0, 0, 1, 1]  # the bins of the forward (fixed bins), not the new ones
        assert torch.equal(call.stats.load_ME, expected.stats.load_ME)
        assert call.stats.comm_physical == expected.stats.comm_physical
        assert call.comm() == expected.comm() and call.comm().num_tokens == 11


def test_evaluation_computes_no_losses_unless_asked():
    layer = _layer("rank_once", k=2).eval()
    l_aux = _run(layer)[1]
    assert float(l_aux) == 0.0
    collector = RoutingCollector([layer], losses=True)
    l_aux = _run(layer, collector)[1]
    [[call]] = collector.take()
    assert float(l_aux) > 0 and set(call.stats.losses) == {"bin_balance", "mi"}
    layer.train()
    assert float(_run(layer)[1]) == float(l_aux)   # training always computes them (same routes and losses)


def test_rank_once_without_ep_group_says_how_to_fix():
    layer = _layer("rank_once", k=2, ep_size=2)
    with pytest.raises(RuntimeError, match="deepspeed.initialize"):
        layer(torch.randn(1, 3, D), modality_labels=torch.zeros(1, 3, dtype=torch.long))


def test_bin_limited_gate_keeps_each_token_in_one_bin():
    cfg = SMoESConfig(num_experts=8, k=2, num_bins=4, score_type="hard", binning="fixed", max_bins_per_token=1)
    gate = SMoESGate(D, cfg)
    s = 16
    labels = torch.arange(s) % 2
    inputs = RoutingInputs(torch.nn.functional.one_hot(labels, 2).float(), labels, torch.zeros(s, dtype=torch.long),
                           torch.ones(s, dtype=torch.bool))
    idx_KS = gate(torch.randn(s, D), None, True, False, inputs=inputs)[3]
    bin_KS = gate.binning.bin_E[idx_KS.long()]
    assert (idx_KS >= 0).all() and (bin_KS[0] == bin_KS[1]).all()


@pytest.mark.slow
def test_rank_once_on_two_gloo_ranks_matches_one_process_reference(two_rank_scenarios):
    reports = two_rank_scenarios.reports("rank_once_parity")
    for r in range(2):
        report = reports[r]
        assert set(report) == {"smoes_k2", "smoes_k1", "ltdr_variable_k", "bin_limited", "rank1_only_padding",
                               "topk_k1", "module_loop_k2"}
        for case, rep in report.items():
            where = (r, case)
            for name in ("out", "x_grad", "wg_grad", "expert_grad"):
                assert rep[f"{name}_diff"] <= 1e-5 * max(1.0, rep[f"{name}_scale"]), (where, name, rep)
            assert rep["expert_grad_scale"] > 0, where
            assert rep["wg_grad_scale"] > 0 or where == (1, "rank1_only_padding"), where  # no token, no router grad
            # measured bytes = the hand formula from the tokens each rank sends to the other
            for part in ("dispatch", "combine", "metadata"):
                assert rep[f"{part}_bytes"] == rep[f"expected_{part}_bytes"], (where, part, rep)
            assert rep["cross_rank_rate"] == pytest.approx(rep["gate_cross_rank_rate"])
            assert rep["ranks_per_token"] == pytest.approx(rep["gate_ranks_per_token"])
            assert rep["all_reduces"] == 0, where  # no gate, DeepSpeed's top-k included, agrees a capacity
            # the layer's mlp experts run grouped on a zero-copy stacked view; the opaque ones in the loop
            assert (rep["grouped"], rep["stacked"]) == ((False, False) if case == "module_loop_k2" else (True, True))
        assert report["bin_limited"]["ranks_per_token"] == 1.0  # one bin per token, bins aligned with ranks
        if r == 0:
            assert report["ltdr_variable_k"]["max_routes"] == 3  # a tail token used a = 3 experts
    padded = reports[1]["rank1_only_padding"]
    assert padded["num_tokens"] == 0 and padded["dispatch_bytes"] == 0 and padded["combine_bytes"] > 0


# -- rows packed with their float32 routes, whatever the rows' dtype -------------------------------------------
def _float32_from_bits(bits: list[list[int]]) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


# float32 routes whose 16-bit halves read as bf16 NaN (0x7FC1, 0x7FC0), -inf (0xFF80) and subnormals (0x0001)
ODD_BITS_YX = [[0x3F807FC1, 0x7FC00001], [0xFF800001 - 2**32, 0x00010000]]


def test_send_order_needs_no_host_read_and_starts_with_the_send_plan():
    hits_SR = rank_hits(route_ranks(INDICES_KS, num_local_experts=2), ep_size=2)
    with count_host_syncs() as syncs:
        token_Q, rank_Q, send_counts_R = send_order(hits_SR)
    assert syncs.total == 0
    # Q = 2 ranks x 5 tokens: the 5 rows (rank 0: t0 t1; rank 1: t1 t2 t3), then the 5 pairs not sent in the
    # same rank-major order (rank 0: t2 t3 t4; rank 1: t0 t4)
    assert token_Q.tolist() == [0, 1, 1, 2, 3, 2, 3, 4, 0, 4]
    assert rank_Q.tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 1, 1] and send_counts_R.tolist() == [2, 3]
    token_Y, rank_Y, _ = send_plan(hits_SR)
    assert token_Y.tolist() == token_Q[:5].tolist() and rank_Y.tolist() == rank_Q[:5].tolist()
    assert send_order(torch.zeros(0, 2, dtype=torch.bool))[0].tolist() == []  # no tokens


def test_expert_pair_counts_by_hand():
    # rank 0 of the hand case gets rows t0 (e0 e1) and t1 (e2 e0: e2 elsewhere) -> local [[0, 1], [-1, 0]]
    local_ZK = torch.tensor([[0, 1], [-1, 0]])
    with count_host_syncs() as syncs:
        pairs_Q = expert_pair_counts(local_ZK, 2)  # Q = 2 local experts + the unused routes
    assert syncs.total == 0 and pairs_Q.tolist() == [2, 1, 1]  # e0 twice, e1 once, one unused route last
    assert expert_pair_counts(INDICES_KS, 4).tolist() == [2, 1, 2, 2, 3]  # one process: every expert local


@pytest.mark.parametrize("dtype, width", [(torch.float32, D + 2 * 2), (torch.bfloat16, D + 4 * 2),
                                          (torch.float16, D + 4 * 2)], ids=["float32", "bf16", "fp16"])
def test_pack_rows_carries_float32_routes_bit_exactly_in_the_rows_dtype(dtype, width):
    routes_YX = _float32_from_bits(ODD_BITS_YX)  # K = 1: one weight, one id per row
    routes_YX = torch.cat([routes_YX, torch.tensor([[0.1, 3.0], [1 / 3, -1.0]])], dim=1)[:, [0, 2, 1, 3]]  # K = 2
    x_YD = torch.randn(2, D).to(dtype)
    packed_YX = pack_rows(x_YD, routes_YX)
    assert packed_YX.dtype == dtype and packed_YX.shape == (2, width)
    # what one packed row really weighs is what the accounting says: D vectors + K ids + K weights (float32 bits)
    assert width * packed_YX.element_size() == D * x_YD.element_size() + 2 * (INDEX_BYTES + WEIGHT_BYTES)
    x_back_YD, routes_back_YX = unpack_rows(packed_YX, D)
    assert torch.equal(x_back_YD, x_YD) and routes_back_YX.dtype == torch.float32
    assert torch.equal(routes_back_YX.view(torch.int32), routes_YX.view(torch.int32))  # NaN payloads included


def _identity_all_to_all(calls: list):
    """dist.all_to_all_single of one rank (its whole input comes back), recording (dtype, shape) of each call."""
    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        calls.append((input.dtype, tuple(input.shape)))
        output.copy_(input)
    return all_to_all_single


@pytest.mark.parametrize("dtype, width", [(torch.bfloat16, D + 4 * 2), (torch.float16, D + 4 * 2),
                                          (torch.float32, D + 2 * 2)], ids=["bf16", "fp16", "float32"])
def test_exchange_rows_is_one_all_to_all_each_way_with_float32_weight_gradients(monkeypatch, dtype, width):
    calls = []
    monkeypatch.setattr(torch.distributed, "all_to_all_single", _identity_all_to_all(calls))
    x_YD = torch.randn(3, D).to(dtype).requires_grad_(True)
    gates_KS = torch.tensor([[0.6, 0.7, 1 / 3], [0.4, 0.3, 2 / 3]], requires_grad=True)
    routes_YX = row_routes(torch.tensor([[0, 2, 3], [1, 0, -1]]), gates_KS, torch.arange(3))
    x_ZD, routes_ZX = exchange_rows(x_YD, routes_YX, [3], [3], group=None)
    assert calls == [(dtype, (3, width))]  # vectors and routes: ONE exchange
    assert x_ZD.dtype == dtype and torch.equal(x_ZD, x_YD)
    assert routes_ZX.dtype == torch.float32 and torch.equal(routes_ZX, routes_YX)
    # float32 gradient probes that bf16 could not hold (1/3, 1 + 2^-20): they must come back bit for bit
    probe_ZX = torch.tensor([[1 / 3, 1 + 2**-20], [-1 / 7, 5.0], [2**-30, -0.1]])
    probe_ZD = torch.randn(3, D).to(dtype)
    ((x_ZD.float() * probe_ZD.float()).sum() + (routes_ZX[:, :2] * probe_ZX).sum()).backward()
    assert calls[1:] == [(dtype, (3, width))]  # the backward: one exchange too
    assert torch.equal(x_YD.grad, probe_ZD)
    assert torch.equal(gates_KS.grad, probe_ZX.T)  # the weights' gradient is float32, unrounded


def test_exchange_rows_supports_double_backward(monkeypatch):
    monkeypatch.setattr(torch.distributed, "all_to_all_single", _identity_all_to_all([]))
    x_YD = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16, requires_grad=True)
    routes_YX = torch.tensor([[0.5, 1.0]], requires_grad=True)
    x_ZD, routes_ZX = exchange_rows(x_YD, routes_YX, [1], [1], None)
    (grad_x_YD,) = torch.autograd.grad((x_ZD.float() ** 2).sum() * routes_ZX[0, 0], x_YD, create_graph=True)
    assert grad_x_YD.tolist() == [[1.0, 2.0]]  # 2 x w with w = 0.5
    grad_x_YD.float().sum().backward()  # d/dw of sum(2 x w) = 2 (1 + 2)
    assert routes_YX.grad.tolist() == [[6.0, 0.0]]


def _bf16_case():
    torch.manual_seed(0)
    experts = [nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D)) for _ in range(4)]
    x_SD = torch.randn(5, D).bfloat16().float()  # the same input for both precisions
    return experts, x_SD, torch.linspace(-1, 1, 5 * D).reshape(5, D)


def test_bf16_rank_once_matches_the_float32_reference_on_one_process():
    experts, x_SD, probe_SD = _bf16_case()
    runs = []
    for dtype in (torch.float32, torch.bfloat16):
        x = x_SD.to(dtype, copy=True).requires_grad_(True)
        gates = GATES_KS.clone().requires_grad_(True)
        mine = [copy.deepcopy(e).to(dtype) for e in experts]
        out, _ = rank_once_moe(x, INDICES_KS, gates, mine, num_experts=4)
        (out.float() * probe_SD).sum().backward()
        expert_grads = [p.grad.float() for e in mine for p in e.parameters()]
        runs.append((out.detach().float(), x.grad.float(), gates.grad, expert_grads, out.dtype))
    ref, bf16 = runs
    assert bf16[4] == torch.bfloat16 and torch.equal(bf16[0][4], torch.zeros(D))  # padding token t4: zeros
    for got, want in zip(bf16[:3], ref[:3]):  # output, x's and the gates' gradients: within bf16 precision
        assert (got - want).abs().max() <= 2e-2 * max(1.0, float(want.abs().max()))
    assert float(ref[2][0, 0]) != 0.0 and (bf16[2] == 0).tolist() == (ref[2] == 0).tolist()  # unused routes: 0
    assert all((g - w).abs().max() <= 2e-2 * max(1.0, float(w.abs().max())) for g, w in zip(bf16[3], ref[3]))


# -- host syncs ------------------------------------------------------------------------------------------------
def test_rank_once_dispatch_reads_the_host_once_on_one_process():
    """The budget: the send counts and the experts' sizes in ONE read (forward); nothing in the backward.
    A second read anywhere in the dispatch (a nonzero, a bincount, a .tolist() of its own) fails this."""
    experts = [nn.Linear(D, D) for _ in range(4)]
    x = torch.randn(5, D, requires_grad=True)
    gates = GATES_KS.clone().requires_grad_(True)
    with count_host_syncs() as syncs:
        plan = plan_rank_once(INDICES_KS, 4)
        assert syncs.total == 0  # planning reads nothing
        out, volume = rank_once_dispatch(x, INDICES_KS, gates, experts, 4, None, VALID_S, plan)
        forward = syncs.total
        (out * torch.randn(5, D)).sum().backward()
    assert forward == 1 and syncs.total == 1, syncs.report()
    assert dict(syncs.by_op) == {"tolist": 1}
    assert plan.counts() == ([4], [4]) and plan.expert_sizes() == [2, 1, 2, 2]  # t0..t3; e0 e1 e2 e3 by hand
    assert plan.token_Y.tolist() == [0, 1, 2, 3]
    assert volume().num_tokens == 4  # the deferred statistics still work (they may read, on logging steps)


def test_the_dispatch_lines_of_a_whole_moe_layer_read_the_host_once():
    """Through SMoESMoE (gate + dispatch, forward + backward): only one sync comes from dispatch.py; the gate's
    own syncs are not this module's budget."""
    layer = _layer("rank_once", k=2)
    with count_host_syncs() as syncs:
        _run(layer)
    mine = {where: n for (op, where), n in syncs.where.items() if "parallel/dispatch.py" in where}
    assert sum(mine.values()) == 1, syncs.report()


@pytest.mark.slow
def test_bf16_rank_once_on_two_gloo_ranks_packs_routes_into_one_exchange(two_rank_scenarios):
    reports = two_rank_scenarios.reports("rank_once_bf16")
    hidden, k = 16, 2  # the script's D and K
    for r in range(2):
        report = reports[r]
        for case, dtype, tol, width, elem in (("bf16", "torch.bfloat16", 2e-2, hidden + 4 * k, 2),
                                              ("float32", "torch.float32", 1e-5, hidden + 2 * k, 4)):
            rep, where = report[case], (r, case)
            assert rep["out_dtype"] == dtype, where
            for name in ("out", "x_grad", "gates_grad", "expert_grad"):  # against the float32 single process
                assert rep[f"{name}_diff"] <= tol * max(1.0, rep[f"{name}_scale"]), (where, name, rep)
                assert rep[f"{name}_scale"] > 0, (where, name)
            # forward: the counts, the rows packed with their routes (ONE exchange), the combined vectors;
            # backward: the combined vectors' and the packed rows' gradients
            assert [(c[0], c[1][1:]) for c in rep["forward_all_to_all"]] == \
                [("torch.int64", []), (dtype, [width]), (dtype, [hidden])], where
            assert [(c[0], c[1][1:]) for c in rep["backward_all_to_all"]] == [(dtype, [hidden]), (dtype, [width])]
            # host syncs, forward + backward: the send/recv split sizes once; the script's mlp experts run grouped
            # (ds_smoes.parallel.grouped_experts), which reads no sizes of the received rows' experts
            assert rep["host_syncs"] == 1, (where, rep["host_syncs_report"])
            # bytes: the vectors in their dtype; routes K float32 ids + K float32 weights whatever the dtype
            assert rep["rows_to_other"] > 0
            assert rep["dispatch_bytes"] == rep["rows_to_other"] * hidden * elem, where
            assert rep["metadata_bytes"] == 8 + rep["rows_to_other"] * k * (INDEX_BYTES + WEIGHT_BYTES), where
        # float32 routes whose halves are bf16 NaN / -inf / subnormal patterns cross a real bf16 exchange intact:
        # rank r receives row r of rank 0 and row r of rank 1 (whose last id is 0x00010000 + its rank)
        row = ODD_BITS_YX[r]
        expected = [row, row] if r == 0 else [[row[0], row[1]], [row[0], row[1] + 1]]
        assert report["route_bits"]["received_bits"] == expected and report["route_bits"]["received_x"] == [0.0, 1.0]


def test_the_dispatch_is_a_component_chosen_once_and_named_nowhere_else():
    """The layer holds its dispatcher (built from the config); no other module of the package branches on the
    dispatch's name: the config declares it, the dispatchers' module maps it."""
    import re

    from ds_smoes.moe.dispatchers import RankOnceDispatcher, StockDispatcher

    assert isinstance(_layer("rank_once").dispatcher, RankOnceDispatcher)
    assert isinstance(_layer("deepspeed").dispatcher, StockDispatcher)
    package = Path(__file__).resolve().parents[1] / "ds_smoes"
    branching = re.compile(r"""dispatch\s*[!=]=\s*["']|["'](rank_once|deepspeed)["']\s*[!=]=""")
    offenders = [f"{path.relative_to(package)}:{i}" for path in package.rglob("*.py")
                 for i, line in enumerate(path.read_text().splitlines(), 1) if branching.search(line)]
    assert offenders == [], offenders


def test_rank_once_refuses_a_tensor_parallel_group_with_a_message(monkeypatch):
    """rank_once does not run DeepSpeed's dropping of the tokens each TP rank duplicates: refused at set-up, when
    DeepSpeed makes the layer's process groups (DeepSpeed's own group making is left out here: no process group)."""
    from types import SimpleNamespace

    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups

    from ds_smoes.core.errors import ConfigError

    made = []
    monkeypatch.setattr(MoE, "set_deepspeed_parallelism", lambda self, *a: made.append(self))
    for dispatch in ("deepspeed", "rank_once"):
        _layer(dispatch, k=2).set_deepspeed_parallelism()   # no TP: both accept
    mpu = SimpleNamespace(get_tensor_model_parallel_world_size=lambda: 2, get_model_parallel_world_size=lambda: 2)
    monkeypatch.setattr(groups, "mpu", mpu)
    _layer("deepspeed", k=2).set_deepspeed_parallelism()    # DeepSpeed's dispatch splits the tokens over TP ranks
    with pytest.raises(ConfigError, match="tensor-parallel ranks .* smoes.dispatch='deepspeed'"):
        _layer("rank_once", k=2).set_deepspeed_parallelism()
    assert len(made) == 4


def test_experts_run_by_one_function_take_part_as_the_modules_do():
    """An ExpertRunner (AutoEP's stacked experts) gets the used (row, route) pairs grouped by expert with their sizes;
    the combined output and every gradient are those of the same experts as modules."""
    from ds_smoes.parallel.dispatch import ExpertRunner, run_local_experts

    torch.manual_seed(0)
    experts = nn.ModuleList(nn.Linear(D, D) for _ in range(3))
    seen = []

    def run(x_QD, sizes):
        seen.append(list(sizes))
        return torch.cat([experts[i](chunk) for i, chunk in enumerate(x_QD.split(sizes))])

    x = torch.randn(5, D, requires_grad=True)
    local_ZK = torch.tensor([[0, 2], [1, -1], [2, 0], [-1, -1], [0, 0]])
    weight_ZK = torch.rand(5, 2, requires_grad=True)
    out = run_local_experts(x, local_ZK, weight_ZK, ExpertRunner(3, run))
    ref = run_local_experts(x, local_ZK, weight_ZK, list(experts), kernel="modules")
    assert seen == [[4, 1, 2]]            # expert 0 four times (row 4 routes to it twice), 1 once, 2 twice
    assert torch.allclose(out, ref, atol=1e-6) and torch.equal(out[3], torch.zeros(D))
    probe = torch.randn(5, D)
    grads = torch.autograd.grad((out * probe).sum(), [x, weight_ZK, *experts.parameters()])
    ref_grads = torch.autograd.grad((ref * probe).sum(), [x, weight_ZK, *experts.parameters()])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, ref_grads))
