"""Placements for serving engines (app/serving_placement.py, app/serving.py): the base placements and the replica
rule by hand, the maps and their validation, the files written and parsed back, and the serving-load model on
cases small enough to compute by hand."""
import json

import pytest
import torch

from ds_smoes.app.serving import (EPLB_FILE, LOAD_FILE, SGLANG_FILE, SIM_JSON, SIM_MD, read_eplb, read_load,
                                  read_sglang, write_serving_files)
from ds_smoes.app.serving_placement import (PlacementError, ServingMaps, add_replicas, base_physical,
                                             maps_from_eplb, maps_from_phy2log, phy2log_of, plan_serving,
                                             simulate_serving, validate_maps)

# 8 experts, 4 bins of 2: text-biased bins 0 and 2 = experts {0, 5} and {2, 7}; vision bins 1, 3 = {1, 4}, {3, 6}
BIN_E = torch.tensor([0, 1, 2, 3, 1, 0, 3, 2])


def test_base_placements_by_hand():
    # bins on 2 ranks: bins 0, 1 -> rank 0 (experts 0, 1, 4, 5), bins 2, 3 -> rank 1 (2, 3, 6, 7)
    phy = base_physical("bins", 8, 2, BIN_E, torch.arange(8), 4)
    assert phy2log_of(phy).view(2, 4).sort(1).values.tolist() == [[0, 1, 4, 5], [2, 3, 6, 7]]
    # experts already on their bin's rank keep their slots (0, 1, 2, 3 do); 4, 5 take rank 0's free slots
    assert phy.tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    assert phy2log_of(base_physical("linear", 8, 2)).tolist() == list(range(8))
    assert phy2log_of(base_physical("round_robin", 8, 2)).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert phy2log_of(base_physical("round_robin", 8, 4)).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    # a bin-ordered export (core.placement.bin_ordered_physical) is served as stored
    stored = torch.tensor([0, 2, 4, 6, 3, 1, 7, 5])
    assert base_physical("bins", 8, 2, BIN_E, stored, 4).tolist() == stored.tolist()


def test_replica_rule_by_hand():
    base = phy2log_of(base_physical("linear", 4, 2))          # rank 0: 0, 1; rank 1: 2, 3
    load_E = torch.tensor([10.0, 5.0, 2.0, 2.0])              # rank loads 15, 4
    # copy 1: expert 0 (10 per copy) -> rank 1, the only rank without it; loads now 10, 9
    # copy 2: per copy 5, 5, 2, 2; expert 0 is on both ranks; expert 1 lacks rank 1 only, whose one extra slot
    # (s = 2 / 2) is taken: so expert 2 (ties by lower id) -> rank 0
    phy2log = add_replicas(base, load_E, 2, 2)
    assert phy2log.tolist() == [0, 1, 2, 2, 3, 0]
    maps = maps_from_phy2log(phy2log.unsqueeze(0), 4, 2)
    assert maps.logcnt_LE.tolist() == [[2, 1, 2, 1]]
    assert maps.log2phy_LEQ.tolist() == [[[0, 5], [1, -1], [2, 3], [4, -1]]]
    validate_maps(maps)
    # never two copies on one rank, equal slots per rank, however many copies
    for redundant in (2, 4):
        phy2log = add_replicas(phy2log_of(base_physical("round_robin", 4, 2)), torch.tensor([9.0, 1, 1, 1]), 2, redundant)
        ranks = phy2log.view(2, -1)
        assert all(len(set(r.tolist())) == r.numel() for r in ranks)
    # hottest copied first, onto the less loaded rank: 4 ranks, expert 3 hottest on rank 3
    phy2log = add_replicas(torch.arange(4), torch.tensor([1.0, 2.0, 3.0, 8.0]), 4, 4)
    assert phy2log.view(4, 2)[:, 1].tolist() == [3, 3, 3, 2]   # 3 -> rank 0, 3 -> rank 1 (8, then 4 per copy), 2 (3 > 8/3) -> rank 3, 3 -> rank 2


def test_replica_errors():
    base = torch.arange(4)
    with pytest.raises(PlacementError, match="multiple of the 2 ranks"):
        add_replicas(base, torch.ones(4), 2, 3)
    with pytest.raises(PlacementError, match="more copies than there are ranks"):
        add_replicas(base, torch.ones(4), 2, 6)
    add_replicas(base, torch.ones(4), 2, 4)   # the bound: every expert on both ranks
    with pytest.raises(PlacementError, match="ranks must divide the number of bins"):
        base_physical("bins", 8, 4, BIN_E, torch.arange(8), 2)
    with pytest.raises(PlacementError, match="unknown placement"):
        base_physical("random", 4, 2)


def test_validation_errors():
    with pytest.raises(PlacementError, match="two copies on rank 0"):
        maps_from_phy2log(torch.tensor([[0, 0, 1, 2]]), 3, 2)
    with pytest.raises(PlacementError, match=r"experts \[3\] have no physical slot"):
        maps_from_phy2log(torch.tensor([[0, 1, 2, 0]]), 4, 2)
    with pytest.raises(PlacementError, match="split evenly over 2 ranks"):
        maps_from_phy2log(torch.tensor([[0, 1, 2]]), 3, 2)
    good = maps_from_phy2log(torch.tensor([[0, 1, 2, 0]]), 3, 2)
    with pytest.raises(PlacementError, match="logcnt"):
        validate_maps(ServingMaps(good.phy2log_LP, good.log2phy_LEQ, torch.tensor([[1, 1, 1]]), 2))
    with pytest.raises(PlacementError, match="log2phy does not list"):
        validate_maps(ServingMaps(good.phy2log_LP, good.log2phy_LEQ.flip(-1), good.logcnt_LE, 2))
    # a wider log2phy (vLLM pads to redundant + 1) parses
    wide = torch.nn.functional.pad(good.log2phy_LEQ, (0, 1), value=-1)
    maps_from_eplb(good.phy2log_LP, wide, good.logcnt_LE, 2)


def two_layers():
    bin_LE = torch.stack([BIN_E, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])])
    physical_LE = torch.stack([torch.arange(8), torch.arange(8)])
    load_LME = torch.tensor([[[9.0, 0, 8, 0, 0, 7, 0, 6], [0, 5, 0, 4, 3, 0, 2, 1]],
                             [[4.0, 3, 0, 0, 2, 1, 0, 0], [0, 0, 5, 5, 0, 0, 5, 5]]])
    return bin_LE, physical_LE, load_LME


@pytest.mark.parametrize("redundant", [0, 2, 4])
def test_files_round_trip(tmp_path, redundant):
    bin_LE, physical_LE, load_LME = two_layers()
    out = write_serving_files(tmp_path, bin_LE, physical_LE, load_LME, "hand-made", 4, 2, redundant, k=2,
                              hidden_size=8, element_bytes=2, num_tokens=500, log=lambda *a: None)
    expected = plan_serving("bins", bin_LE, physical_LE, load_LME, 4, 2, redundant)
    sglang = json.loads((tmp_path / SGLANG_FILE).read_text())
    assert list(sglang) == ["physical_to_logical_map"]
    assert torch.tensor(sglang["physical_to_logical_map"]).shape == (2, 8 + redundant)
    for parsed in (read_sglang(tmp_path / SGLANG_FILE, 8, 2), read_eplb(tmp_path / EPLB_FILE)):
        for field in ("phy2log_LP", "log2phy_LEQ", "logcnt_LE"):
            assert torch.equal(getattr(parsed, field), getattr(expected, field)), field
        # every expert of every layer exactly once per replica set: each slot in one expert's list, once
        for l in range(2):
            slots = [p for e in range(8) for p in parsed.log2phy_LEQ[l, e].tolist() if p >= 0]
            assert sorted(slots) == list(range(8 + redundant))
            assert all(parsed.phy2log_LP[l, p] == e for e in range(8) for p in parsed.log2phy_LEQ[l, e].tolist() if p >= 0)
            assert (parsed.logcnt_LE[l] >= 1).all() and int(parsed.logcnt_LE[l].sum()) == 8 + redundant
    eplb = json.loads((tmp_path / EPLB_FILE).read_text())
    assert eplb["placement"] == out["placement"] == (f"bins+{redundant}" if redundant else "bins")
    assert torch.equal(read_load(tmp_path / LOAD_FILE), load_LME.double())
    rows = json.loads((tmp_path / SIM_JSON).read_text())["rows"]
    names = {r["placement"] for r in rows}
    assert names == ({"bins", "linear", "round_robin"} | ({f"{n}+{redundant}" for n in ("bins", "linear", "round_robin")}
                                                         if redundant else set()))
    assert {r["trace"] for r in rows} == {"image_heavy", "mixed", "text_heavy"}
    assert "| trace (vision share) |" in (tmp_path / SIM_MD).read_text()


def test_sglang_file_with_extra_keys_is_refused(tmp_path):
    path = tmp_path / "loc.json"
    path.write_text(json.dumps({"physical_to_logical_map": [[0, 1]], "logical_count": [[1, 1]]}))
    with pytest.raises(PlacementError, match="exactly the key"):
        read_sglang(path, 2, 2)


def test_simulation_by_hand():
    # 4 experts, 2 ranks, k = 2; text routes only to experts 0 and 1, vision only to 2 and 3
    load_LME = torch.tensor([[[5.0, 5, 0, 0], [0, 0, 5, 5]]])
    bins = maps_from_phy2log(torch.tensor([[0, 1, 2, 3]]), 4, 2)      # {0, 1} on rank 0, {2, 3} on rank 1
    robin = maps_from_phy2log(torch.tensor([[0, 2, 1, 3]]), 4, 2)     # one text expert on each rank
    D, b = 16, 2
    # all text: every token on rank 0; home uniform -> half the tokens send to 1 remote rank
    f = simulate_serving(bins, load_LME, 2, D, b, vision_share=0.0, num_tokens=100)
    assert f.max_over_mean_load == pytest.approx(2.0) and f.remote_ranks_per_token == pytest.approx(0.5)
    assert f.remote_bytes_per_token == pytest.approx(2 * D * b * 0.5) and f.cross_rank_rate == pytest.approx(0.5)
    # round robin: perfectly even, and every token needs the other rank too
    f = simulate_serving(robin, load_LME, 2, D, b, vision_share=0.0, num_tokens=100)
    assert f.max_over_mean_load == pytest.approx(1.0) and f.remote_ranks_per_token == pytest.approx(1.0)
    assert f.remote_bytes_per_token == pytest.approx(2 * D * b)
    # half vision: bins are even again and still send a token to at most one rank, half the time
    f = simulate_serving(bins, load_LME, 2, D, b, vision_share=0.5, num_tokens=100)
    assert f.max_over_mean_load == pytest.approx(1.0) and f.remote_ranks_per_token == pytest.approx(0.5)
    # every expert on both ranks: tokens stay home on either rank -> no remote route, even load
    replicated = maps_from_phy2log(torch.tensor([[0, 1, 2, 3, 2, 3, 1, 0]]), 4, 2)
    f = simulate_serving(replicated, load_LME, 2, D, b, vision_share=0.0, num_tokens=100)
    assert f.remote_ranks_per_token == pytest.approx(0.0) and f.max_over_mean_load == pytest.approx(1.0)
    # vision with 2 and 3 on both ranks too: nothing remote at all
    f = simulate_serving(replicated, load_LME, 2, D, b, vision_share=1.0, num_tokens=100)
    assert f.remote_ranks_per_token == pytest.approx(0.0)


def test_simulation_split_rule():
    # 3 ranks, expert 0 on ranks 0 and 1; k = 1, every token routes to expert 0.  Home 0 or 1: local;
    # home 2: the route is split over ranks 0, 1 -> loads (1/3 + 1/6, 1/3 + 1/6, 0): max / mean = 1.5;
    # remote ranks: home 2 -> 1 (either copy), so 1/3 per token
    maps = maps_from_phy2log(torch.tensor([[0, 1, 0, 2, 1, 2]]), 3, 3)
    load_LME = torch.tensor([[[1.0, 0, 0], [1.0, 0, 0]]])
    f = simulate_serving(maps, load_LME, 1, 4, 1, vision_share=0.5, num_tokens=30)
    assert f.max_over_mean_load == pytest.approx(1.5) and f.remote_ranks_per_token == pytest.approx(1 / 3)


def test_too_few_loaded_experts():
    with pytest.raises(PlacementError, match="fewer than k=2"):
        simulate_serving(maps_from_phy2log(torch.tensor([[0, 1]]), 2, 2), torch.tensor([[[1.0, 0], [1, 1]]]),
                         2, 4, 1, vision_share=0.0, num_tokens=10)
