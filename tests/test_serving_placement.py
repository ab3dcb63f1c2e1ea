"""Placements for serving engines (app/serving_placement.py, app/serving.py): the base placements and the replica
rule by hand, the maps and their validation, the files written and parsed back, and the serving-load model on
cases small enough to compute by hand."""
import json

import pytest
import torch

from ds_smoes.app.placement_search import score, search_placement
from ds_smoes.app.serving import (EPLB_FILE, LOAD_FILE, SGLANG_FILE, SIM_JSON, SIM_MD, MeasuredRoutes, best_per_trace,
                                  location_file, read_eplb, read_load, read_sglang, write_serving_files)
from ds_smoes.app.serving_placement import (PlacementError, ServingMaps, add_replicas, base_physical, eplb_physical,
                                             maps_from_eplb, maps_from_phy2log, phy2log_of, plan_serving,
                                             replay_routes, simulate_serving, validate_maps)

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
                              hidden_size=8, element_bytes=2, num_tokens=500, placement="bins", search_tokens=300,
                              search_evals=200, log=lambda *a: None)
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
    plus = f"+{redundant}" if redundant else ""
    assert names == ({"bins", "linear", "round_robin", f"eplb{plus}"}   # the search runs when it is exported
                     | ({f"{n}+{redundant}" for n in ("bins", "linear", "round_robin")} if redundant else set()))
    assert {r["trace"] for r in rows} == {"image_heavy", "mixed", "text_heavy"}
    md = (tmp_path / SIM_MD).read_text()
    assert "| trace (vision share) |" in md and "routes drawn from the measured load" in md


def test_the_search_is_exported_by_default_and_the_files_say_whether_it_won(tmp_path):
    bin_LE, physical_LE, load_LME = two_layers()
    out = write_serving_files(tmp_path, bin_LE, physical_LE, load_LME, "hand-made", 4, 2, 2, k=2, hidden_size=8,
                              element_bytes=2, num_tokens=500, search_tokens=300, search_evals=200,
                              log=lambda *a: None)
    # one placement searched per trace; the default file holds the mixed trace's
    assert out["placement"] == "search(mixed)+2"
    sim = json.loads((tmp_path / SIM_JSON).read_text())
    assert sim["exported"] == {t: f"search({t})+2" for t in ("image_heavy", "mixed", "text_heavy")}
    assert sim["exported_is_best"] == out["exported_is_best"] and set(sim["exported_is_best"]) == set(sim["exported"])
    assert sim["best"] == best_per_trace(sim["rows"], 1.1)
    assert {r["placement"] for r in sim["rows"]} >= set(sim["exported"].values())
    parsed = read_sglang(tmp_path / SGLANG_FILE, 8, 2)
    assert torch.equal(parsed.phy2log_LP, read_eplb(tmp_path / EPLB_FILE).phy2log_LP)
    assert torch.equal(parsed.phy2log_LP, read_sglang(tmp_path / location_file("mixed"), 8, 2).phy2log_LP)
    assert parsed.phy2log_LP.shape == (2, 10)
    for trace in ("image_heavy", "text_heavy"):
        read_sglang(tmp_path / location_file(trace), 8, 2)   # valid placements
    with pytest.raises(PlacementError, match="max / mean rank load is at least 1.0"):
        write_serving_files(tmp_path, bin_LE, physical_LE, load_LME, "x", 4, 2, 0, k=2, hidden_size=8,
                            element_bytes=2, max_load=0.9, log=lambda *a: None)


def test_replayed_routes_through_the_files_by_hand(tmp_path):
    # 4 experts on 2 ranks, k = 2, one MoE layer: text tokens use {0, 3}, vision tokens {1, 2}; the load alone is
    # even.  Mixed trace: {0, 3} | {1, 2} keeps each token on one rank (0.5 remote ranks, the load even); every
    # base placement splits a pair (bins here = linear = {0, 1} | {2, 3}: 1.0).  Image-heavy: that placement
    # loads the vision rank 0.8 / 0.5 = 1.6x the mean, over the bound, so its search keeps the load even (1.0).
    indices_SK = torch.tensor([[0, 3], [1, 2]] * 200)
    labels_S = torch.tensor([0, 1] * 200)
    routes = MeasuredRoutes([indices_SK], [labels_S], [torch.arange(400) // 2])
    load_LME = torch.tensor([[[200.0, 0, 0, 200], [0, 200, 200, 0]]])
    out = write_serving_files(tmp_path, torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 1, 2, 3]]), load_LME,
                              "hand-made", 2, 2, 0, k=2, hidden_size=8, element_bytes=2, num_tokens=1000,
                              routes=routes, log=lambda *a: None)
    mixed = read_sglang(tmp_path / SGLANG_FILE, 4, 2).phy2log_LP[0].view(2, 2).sort(1).values
    assert sorted(mixed.tolist()) == [[0, 3], [1, 2]]
    rows = {(r["trace"], r["placement"]): r for r in json.loads((tmp_path / SIM_JSON).read_text())["rows"]}
    assert rows["mixed", "search(mixed)"]["remote_bytes_per_token"] == pytest.approx(2 * 8 * 2 * 0.5)
    assert rows["mixed", "bins"]["remote_bytes_per_token"] == pytest.approx(2 * 8 * 2 * 1.0)
    assert rows["image_heavy", "search(mixed)"]["max_over_mean_load"] == pytest.approx(1.6)
    assert rows["image_heavy", "search(image_heavy)"]["max_over_mean_load"] == pytest.approx(1.0)
    assert out["best"]["mixed"] == ["search(mixed)"] and all(out["exported_is_best"].values())
    assert "routes replayed from the measured routes" in (tmp_path / SIM_MD).read_text()


def test_best_per_trace_by_hand():
    row = lambda trace, name, load, nbytes: {"trace": trace, "placement": name, "remote_bytes_per_token": nbytes,  # noqa: E731
                                             "max_over_mean_load_per_layer": [1.0, load]}
    rows = [row("a", "bins", 1.5, 10.0), row("a", "linear", 1.05, 30.0), row("a", "search", 1.1, 20.0),
            row("b", "bins", 1.2, 10.0), row("b", "linear", 1.3, 30.0)]
    # a: bins is over the bound in its worst layer; of the two within it, search sends less.  b: none within the
    # bound, so all compete
    assert best_per_trace(rows, 1.1) == {"a": ["search"], "b": ["bins"]}
    rows.append(row("a", "eplb", 1.0, 20.0))   # a tie shares the place
    assert best_per_trace(rows, 1.1)["a"] == ["search", "eplb"]


# -- EPLB-style, replayed routes and the search, by hand ------------------------------------------------------
def test_eplb_style_by_hand():
    # copies: expert 0 (10 per copy) gets the first extra slot; then per copy 5 (0, already on both ranks), 5, 2, 2:
    # expert 1.  Items heaviest first: (5, e0) x2, (2.5, e1) x2, (2, e2), (2, e3); each onto the least packed rank
    # with room and without it (ties: rank 0): r0 e0, r1 e0, r0 e1, r1 e1, r0 e2 (9.5 vs 7.5 -> no: 7.5, 7.5 ties ->
    # r0), r1 e3
    assert eplb_physical(torch.tensor([10.0, 5.0, 2.0, 2.0]), 2, 2).tolist() == [0, 1, 2, 0, 1, 3]
    # no replicas: balanced packing by load alone: 8 -> r0, 7 -> r1, 6 -> r1 (7 < 8), 1 -> r0
    assert eplb_physical(torch.tensor([1.0, 6.0, 7.0, 8.0]), 2).tolist() == [0, 3, 1, 2]
    with pytest.raises(PlacementError, match="at most 4"):
        eplb_physical(torch.ones(4), 2, 6)


def test_eplb_style_plans_are_valid_placements():
    generator = torch.Generator().manual_seed(0)
    for num_ranks in (2, 3, 4):
        for num_experts in (num_ranks, 2 * num_ranks, 3 * num_ranks):
            for redundant in range(0, num_experts * (num_ranks - 1) + 1, num_ranks):
                for _ in range(20):
                    load_E = torch.randint(0, 10, (num_experts,), generator=generator).double() ** 2
                    phy2log_P = eplb_physical(load_E, num_ranks, redundant)
                    maps = maps_from_phy2log(phy2log_P.unsqueeze(0), num_experts, num_ranks)
                    assert int(maps.logcnt_LE.sum()) == num_experts + redundant


def test_replayed_routes_keep_each_tokens_expert_set():
    indices_SK = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]])
    labels_S = torch.tensor([0, 1, 1, 0])
    generator = torch.Generator().manual_seed(0)
    vision = replay_routes(indices_SK, labels_S, 1.0, 50, generator)
    assert {tuple(r) for r in vision.tolist()} == {(2, 3), (0, 2)}   # only vision tokens, whole rows
    mixed = replay_routes(indices_SK, labels_S, 0.5, 40, generator)
    assert {tuple(r) for r in mixed[:20].tolist()} <= {(2, 3), (0, 2)}
    assert {tuple(r) for r in mixed[20:].tolist()} <= {(0, 1), (1, 3)}
    with pytest.raises(PlacementError, match="no vision token"):
        replay_routes(indices_SK[labels_S == 0], labels_S[labels_S == 0], 0.5, 10, generator)


def test_the_search_finds_the_co_activated_pairs_that_load_alone_cannot_see():
    # 4 experts on 2 ranks, k = 2: every token uses {0, 3} or {1, 2}, equally often, so every expert has the same
    # load.  Linear ({0, 1} | {2, 3}) splits every pair: 1 remote rank per token whatever the home.  Pairs on one
    # rank ({0, 3} | {1, 2}) are remote only when the home is the other rank: 0.5; the load stays even.
    trace_SK = torch.tensor([[0, 3], [1, 2]] * 50)
    linear = torch.tensor([0, 1, 2, 3])
    assert score(linear, [trace_SK], 4, 2, 1.1).remote == pytest.approx(1.0)
    found, found_score, evals = search_placement(linear, [trace_SK], 4, 2, max_load=1.1)
    assert sorted(found.view(2, 2).sort(1).values.tolist()) == [[0, 3], [1, 2]]
    assert found_score.remote == pytest.approx(0.5) and found_score.loads == pytest.approx((1.0,))
    assert evals > 1


def test_the_search_keeps_the_load_bound_before_it_saves_bytes():
    # 90% of tokens use {0, 1}, 10% {2, 3}.  Together on one rank they send least (0.5 remote ranks) but load
    # that rank 0.9 / 0.5 = 1.8x the mean; split, every token crosses (1.0) and the load is even
    trace_SK = torch.tensor([[0, 1]] * 90 + [[2, 3]] * 10)
    start = torch.tensor([0, 2, 1, 3])
    bounded, s, _ = search_placement(start, [trace_SK], 4, 2, max_load=1.1)
    assert s.excess == 0.0 and s.remote == pytest.approx(1.0) and max(s.loads) == pytest.approx(1.0)
    free, s, _ = search_placement(start, [trace_SK], 4, 2, max_load=2.0)
    assert sorted(free.view(2, 2).sort(1).values.tolist()) == [[0, 1], [2, 3]]
    assert s.remote == pytest.approx(0.5) and max(s.loads) == pytest.approx(1.8)


def test_the_search_with_replicas_moves_copies_and_keeps_the_rules():
    # the hot pair {0, 1} (90%) with one extra slot per rank: a copy of each on the other rank keeps every hot
    # token at home: 0.9 * 0 + 0.1 * (tokens {2, 3}: split, 1 remote rank) = 0.1 remote ranks per token
    trace_SK = torch.tensor([[0, 1]] * 90 + [[2, 3]] * 10)
    start = torch.tensor([0, 2, 3, 1, 3, 2])   # rank 0: 0, 2, 3; rank 1: 1, 3, 2
    found, s, _ = search_placement(start, [trace_SK], 4, 2, max_load=1.1, seed=3)
    maps = maps_from_phy2log(found.unsqueeze(0), 4, 2)
    assert maps.logcnt_LE[0, :2].tolist() == [2, 2] and s.remote == pytest.approx(0.1)
    assert s.excess == 0.0
    again, _, _ = search_placement(start, [trace_SK], 4, 2, max_load=1.1, seed=3)
    assert torch.equal(found, again)   # deterministic for a seed


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
