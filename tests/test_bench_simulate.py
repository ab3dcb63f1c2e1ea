"""The EP traffic model beyond 2 ranks (ds_smoes.bench.simulate.model), pinned on cases computed by hand."""
import math
from dataclasses import astuple

import pytest

from ds_smoes.bench.simulate.model import (RouterProfile, SimulationInputs, bin_limited_figures, capacity_ratio_from_bytes,
                                     expected_ranks_hit, modality_groups, monte_carlo_figures, prob_one_rank,
                                     rank_once_bytes_per_token, rank_once_figures, simulate_grid, split_draws,
                                     stock_bytes_per_token)
from ds_smoes.parallel.dispatch import stock_alltoall_bytes
from ds_smoes.core.errors import ConfigError


def test_ranks_hit_by_drawing_distinct_experts():
    # 2 ranks x 2 experts, 2 distinct draws: both on one rank in 2 of the C(4,2) = 6 pairs -> 2 - 2/6 ranks
    assert expected_ranks_hit(2, 2, 2) == pytest.approx(5 / 3)
    assert expected_ranks_hit(1, 2, 2) == 1.0
    assert expected_ranks_hit(3, 1, 2) == pytest.approx(2.0)  # one expert per rank: every draw is a new rank
    assert expected_ranks_hit(4, 2, 0) == 0.0 and expected_ranks_hit(0, 2, 1) == 0.0
    assert prob_one_rank(2, 2, 2) == pytest.approx(1 / 3)
    assert prob_one_rank(1, 4, 2) == 1.0 and prob_one_rank(4, 1, 2) == 0.0


def test_modality_groups_and_overflowing_routes():
    assert modality_groups(0.4, 2) == (1, 1)
    assert modality_groups(0.4, 4) == (2, 2)       # round(1.6)
    assert modality_groups(0.1, 8) == (7, 1)       # round(0.8)
    assert modality_groups(0.0, 4) == (3, 1)       # each modality keeps a rank
    assert modality_groups(1.0, 4) == (1, 3)
    assert split_draws(2, 2, own_pool=1, other_pool=7) == (1, 1)  # a 1-expert group takes one route
    assert split_draws(1, 2, own_pool=4, other_pool=4) == (1, 1)
    with pytest.raises(ConfigError, match="at least 2"):
        modality_groups(0.5, 1)


def test_rank_figures_two_ranks_by_hand():
    # E = 4 on R = 2 (L = 2), k = 2, 40% vision; text puts j = 0, 1, 2 routes in its own bin with
    # 0.2, 0.3, 0.5, vision with 0, 0.5, 0.5.  Ranks hit: j = 1 -> 2, else 1.
    profile = RouterProfile(2, 0.4, ((0.2, 0.3, 0.5), (0.0, 0.5, 0.5)))
    fig = rank_once_figures(profile, num_experts=4, ep_size=2)
    # text 0.2 + 0.6 + 0.5 = 1.3, vision 1.0 + 0.5 = 1.5 -> 0.6 * 1.3 + 0.4 * 1.5 = 1.38
    assert fig.ranks_per_token == pytest.approx(1.38)
    assert fig.remote_ranks_per_token == pytest.approx(0.69)  # the home rank is one of them half the time
    # P(one rank) = 0.6 * 0.7 + 0.4 * 0.5 = 0.62; remote unless that rank is home: 1 - 0.62 / 2
    assert fig.cross_rank_rate == pytest.approx(0.69)
    assert rank_once_bytes_per_token(fig.remote_ranks_per_token, 64, 4) == pytest.approx(353.28)


def test_rank_figures_four_ranks_by_hand():
    # E = 8 on R = 4 (L = 2), half vision -> 2 ranks (4 experts) per modality.  Text: both routes own ->
    # 2 draws from 4 experts on 2 ranks: 5/3 ranks, on one rank with P = 2/6.  Vision: one route in
    # each group -> 2 ranks.
    profile = RouterProfile(2, 0.5, ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0)))
    fig = rank_once_figures(profile, num_experts=8, ep_size=4)
    assert fig.ranks_per_token == pytest.approx(11 / 6)
    assert fig.remote_ranks_per_token == pytest.approx(11 / 6 * 3 / 4)
    assert fig.cross_rank_rate == pytest.approx(1 - (0.5 / 3) / 4)


def test_bin_limited_routing_uses_ceil_k_over_l_ranks():
    assert astuple(bin_limited_figures(2, 4, 2)) == pytest.approx((1.0, 0.5, 0.5))
    assert astuple(bin_limited_figures(2, 8, 8)) == pytest.approx((2.0, 1.75, 1.0))   # 1 expert per bin: 2 bins
    assert astuple(bin_limited_figures(4, 24, 8)) == pytest.approx((2.0, 1.75, 1.0))  # 3 per bin: 2 bins for k = 4


def test_stock_bytes_agree_with_the_dispatch_accounting():
    # 8 experts on 4 ranks, S = 100 tokens, k = 2, capacity 30 = 1.2 * k * S / E; bf16, D = 64
    per_token = stock_alltoall_bytes(8, 30, 64, 4, 2) / 100
    assert stock_bytes_per_token(2, 1.2, 4, 64, 2) == pytest.approx(per_token) == pytest.approx(460.8)
    assert capacity_ratio_from_bytes(460.8, 2, 4, 64, 2) == pytest.approx(1.2)


def test_monte_carlo_agrees_with_the_analytic_model():
    profile = RouterProfile(2, 0.3, ((0.1, 0.3, 0.6), (0.05, 0.25, 0.7)))
    for experts, ep in ((8, 4), (32, 8), (16, 16)):
        exact = rank_once_figures(profile, experts, ep)
        sampled = monte_carlo_figures(profile, experts, ep, samples=20000, seed=1)
        for a, b in zip(astuple(exact), astuple(sampled)):
            assert a == pytest.approx(b, abs=0.03), (experts, ep, exact, sampled)


def test_profile_from_counts_and_bad_profiles():
    p = RouterProfile.from_counts(2, [[2, 3, 5], [0, 1, 3]])
    assert p.vision_share == pytest.approx(4 / 14)
    assert p.own_routes_MJ[0] == pytest.approx((0.2, 0.3, 0.5))
    assert p.own_routes_MJ[1] == pytest.approx((0.0, 0.25, 0.75))
    with pytest.raises(ConfigError, match="summing to 1"):
        RouterProfile(2, 0.5, ((0.5, 0.5), (0.0, 0.0, 1.0)))
    with pytest.raises(ConfigError, match="all zero"):
        RouterProfile.from_counts(2, [[0, 0, 0], [0, 0, 0]])
    with pytest.raises(ConfigError, match="divide"):
        rank_once_figures(p, 12, 8)


def test_grid_rows_cover_valid_layouts_only():
    smoes = RouterProfile(2, 0.4, ((0.2, 0.3, 0.5), (0.0, 0.5, 0.5)))
    topk = RouterProfile(2, 0.4, ((0.25, 0.5, 0.25), (0.25, 0.5, 0.25)))
    inputs = SimulationInputs(smoes, topk, capacity_ratio_a=1.5, capacity_ratio_b=1.25, hidden=64, element_size=4)
    rows = simulate_grid(inputs, experts=(8, 16), ep_sizes=(1, 2, 4, 8, 16, 32))
    cells = sorted({(r["experts"], r["ep_size"]) for r in rows})
    assert cells == [(8, 2), (8, 4), (8, 8), (16, 2), (16, 4), (16, 8), (16, 16)]
    assert len(rows) == 7 * 5
    by = {(r["experts"], r["ep_size"], r["variant"]): r for r in rows}
    assert by[(8, 2, "a")]["bytes_per_token"] == pytest.approx(2 * 64 * 4 * 2 * 1.5 * 0.5)
    assert by[(8, 2, "a")]["delta_vs_a_pct"] == 0.0
    assert by[(8, 2, "b")]["delta_vs_a_pct"] == pytest.approx(100 * (1.25 - 1.5) / 1.5)
    c = by[(16, 4, "c")]
    assert c["bytes_per_token"] == pytest.approx(2 * 64 * 4 * rank_once_figures(smoes, 16, 4).remote_ranks_per_token)
    assert by[(8, 8, "d")]["ranks_per_token"] == 2.0  # one expert per bin, k = 2
    assert math.isclose(by[(16, 4, "a")]["ranks_per_token"], rank_once_figures(topk, 16, 4).ranks_per_token)
