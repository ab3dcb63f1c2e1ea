"""From raw measurements to the benchmark's figures, table, done criteria and strict JSON (by hand)."""
import json
import math
from pathlib import Path

import pytest

from bench_fixtures import raw_result
from ds_smoes.bench.comm.report import (assemble, paired_speed, report_markdown, simulation_inputs, strict_json,
                                   variant_figures)
from ds_smoes.core.errors import ConfigError


def test_bytes_rates_and_deltas_by_hand():
    result = assemble(raw_result())
    rows = result["sources"]["trained"]
    a, b, c = rows["a"], rows["b"], rows["c"]
    assert a["bytes_per_token"] == 700.0 and b["bytes_per_token"] == 600.0 and c["bytes_per_token"] == 280.0
    assert c["bytes_per_token_per_layer"] == [320.0, 240.0]
    assert c["delta_bytes_vs_a_pct"] == pytest.approx(-60.0) and a["delta_bytes_vs_a_pct"] == 0.0
    assert c["delta_ms_vs_a_pct"] == pytest.approx(-20.0)
    assert a["cross_rank_rate"] == pytest.approx(0.8) and c["ranks_per_token"] == pytest.approx(1.5)
    assert c["measured_remote_bytes"] == c["expected_remote_bytes"] == 56000
    assert c["own_route_counts_MJ"] == [[10, 20, 70], [0, 10, 40]]  # summed over the two layers
    assert c["label"] == "SMoES gate + rank_once dispatch" and c["dispatch"] == "rank_once"
    # busiest-rank expert rows: (120 + 120) / 200 tokens, and 240 / (100 + 100) over the average rank
    assert c["expert_rows_per_token"] == pytest.approx(1.2) and c["expert_load_imbalance"] == pytest.approx(1.2)
    assert a["expert_rows_per_token"] == pytest.approx(1.5) and a["expert_load_imbalance"] == pytest.approx(1.0)


def test_done_criteria():
    crit = assemble(raw_result())["done_criteria"]
    assert crit["bytes_reduction_c_vs_a_pct"] == pytest.approx(60.0) and crit["bytes_met"]
    assert crit["accuracy_delta_c_minus_a"]["acc_overall"] == pytest.approx(0.02) and crit["accuracy_met"]
    assert crit["speed_met"]
    raw = raw_result()
    raw["sources"]["trained"]["c"]["layers"][0]["dispatch_bytes"] = 30000  # (c): 70000 / 200 = 350, only 50% below (a)
    raw["sources"]["trained"]["c"]["acc_overall"] = 0.89
    crit = assemble(raw)["done_criteria"]
    assert crit["bytes_reduction_c_vs_a_pct"] == pytest.approx(50.0)
    assert not crit["bytes_met"] and not crit["accuracy_met"]


def test_sign_test_and_median_interval_by_hand():
    from ds_smoes.bench.comm.report import median_interval, sign_test_p

    # 5 wins of 5: 1/32; 4 of 5: (5 + 1)/32; 3 of 5: (10 + 5 + 1)/32; 0 rounds: no evidence
    assert sign_test_p(5, 0) == pytest.approx(1 / 32)
    assert sign_test_p(4, 1) == pytest.approx(6 / 32)
    assert sign_test_p(3, 2) == pytest.approx(0.5)
    assert sign_test_p(0, 0) == 1.0
    # n = 5: P(B <= 0) = 1/32 > 0.025, so no 95 % interval; n = 6: P(B <= 0) = 1/64 <= 0.025 < 7/64
    # -> j = 1, the interval is (min, max); n = 10: P(B <= 1) = 11/1024 <= 0.025 < 56/1024 -> (x2, x9)
    assert median_interval([1.0, 2, 3, 4, 5]) is None
    assert median_interval([1.0, 2, 3, 4, 5, 6]) == (1.0, 6.0)
    assert median_interval([float(i) for i in range(1, 11)]) == (2.0, 9.0)


def test_paired_speed_by_hand():
    # per round (c) - (a): -2, -1, +3, -4, +1 ms -> sorted -4 -2 -1 +1 +3: median -1, (c) faster in 3 of 5,
    # which a fair coin does half the time: not evidence that (c) is faster
    a = [0.010, 0.010, 0.010, 0.010, 0.010]
    c = [0.008, 0.009, 0.013, 0.006, 0.011]
    got = paired_speed(a, c)
    assert got["diff_ms_median"] == pytest.approx(-1.0) and got["c_faster_share"] == pytest.approx(0.6)
    assert got["sign_test_p"] == pytest.approx(0.5) and got["diff_ms_ci95"] is None and got["rounds"] == 5
    assert not got["speed_met"]
    # faster in 9 of 10 rounds: p = 11/1024; the median's interval is the 2nd to 9th smallest difference
    a = [0.010] * 10
    c = [0.010 - 0.001 * i for i in range(1, 10)] + [0.0105]  # -1 ... -9 ms, then +0.5 ms
    got = paired_speed(a, c)
    assert got["sign_test_p"] == pytest.approx(11 / 1024) and got["speed_met"]
    assert got["diff_ms_ci95"] == pytest.approx([-8.0, -1.0]) and got["diff_ms_median"] == pytest.approx(-4.5)
    # (c) much faster in 2 rounds, slower in 3: not faster
    got = paired_speed([0.010, 0.010, 0.010, 0.001, 0.001], [0.011, 0.011, 0.011, 0.000, 0.0005])
    assert got["c_faster_share"] == pytest.approx(0.4) and not got["speed_met"]
    assert paired_speed([], [])["speed_met"] is False


def test_table_and_report_text():
    result = assemble(raw_result(), runs={"smoes": {"run_dir": Path("runs/demo"), "metrics": {"acc_overall": 0.97}}})
    md = report_markdown(result)
    assert ("| (c) | SMoES gate + rank_once dispatch | 280.0 | -60.0% | 0.500 | 1.500 | 1.20 | 1.20 | 80.0 "
            "| -20.0% |") in md
    assert "| (a) | top-k gate + stock dispatch | 700.0 | +0.0% |" in md
    assert "60.0% fewer (target >= 56.1%): met" in md
    assert result["sources"]["trained"]["c"]["run_dir"] == "runs/demo"
    assert result["sources"]["trained"]["c"]["reported_accuracy"]["acc_overall"] == 0.97
    assert "run_dir" not in result["sources"]["trained"]["a"]  # no top-k run given


def test_strict_json_has_no_nan():
    raw = raw_result()
    raw["sources"]["trained"]["a"]["ms_per_step"] = float("nan")
    text = strict_json(assemble(raw))
    back = json.loads(text)
    assert "NaN" not in text and back["sources"]["trained"]["a"]["ms_per_step"] is None
    assert back["sources"]["trained"]["c"]["delta_ms_vs_a_pct"] is None


def test_no_tokens_gives_no_figure_rather_than_a_crash():
    raw = raw_result()["sources"]["trained"]["c"]
    for layer in raw["layers"]:
        layer["tokens"] = 0
    assert math.isnan(variant_figures(raw)["bytes_per_token"])


def test_simulation_inputs_from_the_measurement():
    inputs, source = simulation_inputs(assemble(raw_result()))
    assert source == "trained"
    # stock bytes = 2 D b k lambda (1 - 1/R) = 512 lambda here
    assert inputs.capacity_ratio_a == pytest.approx(700 / 512) and inputs.capacity_ratio_b == pytest.approx(600 / 512)
    assert inputs.smoes.vision_share == pytest.approx(50 / 150)
    assert inputs.smoes.own_routes_MJ[0] == pytest.approx((0.1, 0.2, 0.7))
    with pytest.raises(ConfigError, match="no 'init' models"):
        simulation_inputs(assemble(raw_result()), "init")


def test_a_measurement_without_the_expert_work_tally_still_reports():
    raw = raw_result()
    for layer in raw["sources"]["trained"]["c"]["layers"]:
        del layer["expert_rows_busiest"], layer["expert_rows_mean"]
    c = assemble(raw)["sources"]["trained"]["c"]
    assert math.isnan(c["expert_rows_per_token"]) and math.isnan(c["expert_load_imbalance"])
    assert "| 1.500 | n/a | n/a | 80.0 |" in report_markdown(assemble(raw))
