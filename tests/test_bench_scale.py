"""`python -m ds_smoes.bench scale`: the drawn routings (pure, by hand and by sampling), the ratios and bars,
and one real end-to-end run on the toy shape (2 gloo ranks, marked slow)."""
import json

import pytest
import torch

from ds_smoes.bench.comm.report import paired_ratio
from ds_smoes.bench.scale.command import attention_bars, shape_figures
from ds_smoes.bench.simulate.model import RouterProfile
from ds_smoes.bench.scale.synthetic_routes import (OwnRouteModel, draw_modality_labels, draw_profile_routes,
                                             draw_uniform_routes)
from launch import python_run


def test_beta_binomial_fit_reproduces_a_k2_histogram_exactly():
    # text [0.1, 0.2, 0.7]: E[j] = 1.6, mu = 0.8, Var[j] = 0.2 + 2.8 - 2.56 = 0.44,
    # rho = 0.44 / (2 * 0.8 * 0.2) - 1 = 0.375; vision [0.25, 0.5, 0.25] is binomial (rho = 0)
    profile = RouterProfile(2, 0.3, ((0.1, 0.2, 0.7), (0.25, 0.5, 0.25)))
    model = OwnRouteModel.fit(profile)
    assert model.mean_M == pytest.approx((0.8, 0.5)) and model.rho_M == pytest.approx((0.375, 0.0))
    assert model.own_probs(0, 2) == pytest.approx([0.1, 0.2, 0.7])
    assert model.own_probs(1, 2) == pytest.approx([0.25, 0.5, 0.25])
    # carried to k = 8 the mean share stays, the spread is wider than a binomial's
    p8 = model.own_probs(0, 8)
    assert sum(p8) == pytest.approx(1.0) and sum(j * p for j, p in enumerate(p8)) == pytest.approx(6.4)
    binomial_var = 8 * 0.8 * 0.2
    var = sum(j * j * p for j, p in enumerate(p8)) - 6.4 ** 2
    assert var == pytest.approx(binomial_var * (1 + 7 * 0.375))


def test_degenerate_histograms():
    model = OwnRouteModel.fit(RouterProfile(2, 0.5, ((0.0, 1.0, 0.0), (0.0, 0.0, 1.0))))
    assert model.rho_M[0] == 0.0          # under-dispersed: clipped to the binomial
    assert model.own_probs(0, 4) == pytest.approx([1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16])
    assert model.own_probs(1, 8) == pytest.approx([0.0] * 8 + [1.0])   # every route in the own bins


def test_drawn_profile_routes_are_distinct_experts_with_the_fitted_own_share():
    gen = torch.Generator().manual_seed(0)
    model = OwnRouteModel.fit(RouterProfile(2, 0.4, ((0.1, 0.2, 0.7), (0.05, 0.15, 0.8))))
    labels_S = draw_modality_labels(20000, model.vision_share, gen)
    assert float(labels_S.float().mean()) == pytest.approx(0.4, abs=0.015)
    indices_SK = draw_profile_routes(model, labels_S, 8, 64, 2, gen)
    assert indices_SK.shape == (20000, 8) and int(indices_SK.min()) >= 0 and int(indices_SK.max()) < 64
    assert bool((indices_SK.sort(1).values.diff(dim=1) > 0).all())          # k distinct experts per token
    # text owns rank 0 (experts 0..31), vision rank 1 (32..63)
    own_SK = (indices_SK >= 32) == (labels_S == 1).unsqueeze(1)
    j_S = own_SK.sum(1)
    for m in range(2):
        hist = torch.bincount(j_S[labels_S == m], minlength=9).double()
        hist /= hist.sum()
        assert hist.tolist() == pytest.approx(model.own_probs(m, 8), abs=0.015)


def test_routes_that_do_not_fit_the_own_ranks_spill_to_the_others():
    gen = torch.Generator().manual_seed(1)
    model = OwnRouteModel.fit(RouterProfile(2, 0.5, ((0.0, 0.0, 1.0), (0.0, 0.0, 1.0))))
    labels_S = torch.tensor([0, 1] * 50)
    indices_SK = draw_profile_routes(model, labels_S, 6, 8, 2, gen)   # 4 experts per rank, k = 6 wants 6 own
    own_SK = (indices_SK >= 4) == (labels_S == 1).unsqueeze(1)
    assert own_SK.sum(1).tolist() == [4] * 100                          # 4 own (all of them), 2 spilled
    assert bool((indices_SK.sort(1).values.diff(dim=1) > 0).all())


def test_uniform_routes():
    idx_SK = draw_uniform_routes(5000, 8, 64, torch.Generator().manual_seed(2))
    assert bool((idx_SK.sort(1).values.diff(dim=1) > 0).all())
    counts = torch.bincount(idx_SK.flatten(), minlength=64).double()
    assert float(counts.min()) > 0.8 * 5000 * 8 / 64


def test_paired_ratio_and_bars_by_hand():
    r = paired_ratio([2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], [4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0])
    # ratios 0.5, 0.75, ..., 2.0; median 1.25; with n = 7 the 95 % interval is the order statistics (1, 7)
    assert r["median"] == pytest.approx(1.25) and r["ci95"] == pytest.approx([0.5, 2.0]) and r["rounds"] == 7
    variants = ("smoes/rank_once", "topk/rank_once", "smoes/stock", "topk/stock", "profile/rank_once",
                "profile/stock", "uniform/rank_once", "uniform/stock")
    seconds = {v: [1.0] * 3 for v in variants}
    seconds["smoes/rank_once"] = [1.04] * 3
    seconds["profile/rank_once"] = [0.7] * 3
    raw = {"shape": "toy", "dtype": "fp32", "tokens_per_rank": 8, "seconds": seconds,
           "remote_bytes_per_token": {v: 100.0 for v in variants}}
    fig = shape_figures(raw)
    assert fig["bars"]["layer_ratio_smoes_vs_topk"] == {"value": pytest.approx(1.04), "bar": 1.05, "met": True}
    assert fig["bars"]["dispatch_ratio_rank_once_vs_stock"]["value"] == pytest.approx(0.7)
    assert fig["bars"]["dispatch_ratio_rank_once_vs_stock"]["met"]
    assert fig["bytes_ratio_rank_once_vs_stock"]["uniform"] == pytest.approx(1.0)
    assert fig["kernel_ratio_chosen_vs_modules"] is None          # a raw result from before that variant
    seconds["profile/rank_once:modules"] = [1.4] * 3
    raw["expert_kernels"] = [{"key": ["cpu"], "kernel": "segments", "seconds": {}}]
    fig = shape_figures(raw)
    assert fig["kernel_ratio_chosen_vs_modules"]["median"] == pytest.approx(0.5)
    assert fig["expert_kernels"] == ["segments"]
    assert "autoep" not in fig and "autoep_bytes_ratio" not in fig["bars"]   # measured without --autoep
    for v in ("autoep/stock", "autoep-profile/stock", "autoep-profile/rank_once", "autoep-smoes/rank_once"):
        seconds[v] = [1.0] * 3
        raw["remote_bytes_per_token"][v] = 100.0
    seconds["autoep-profile/rank_once"] = [1.02] * 3
    raw["remote_bytes_per_token"]["autoep-profile/rank_once"] = 40.0
    fig = shape_figures(raw)
    assert fig["bars"]["autoep_bytes_ratio"] == {"value": pytest.approx(0.4), "bar": 0.5, "met": True}
    assert fig["bars"]["autoep_layer_ratio"] == {"value": pytest.approx(1.02), "bar": 1.05, "met": True}
    assert fig["autoep"]["vs_legacy_rank_once"]["median"] == pytest.approx(1.02 / 0.7)
    bars = attention_bars([{"T": 4096, "time_ratio": 1.6, "peak_mem_ratio": 1.0},
                           {"T": 8192, "time_ratio": 1.1, "peak_mem_ratio": 1.1}])
    assert bars["attn_score_time_ratio_T4096"]["met"] is False and bars["attn_score_peak_mem_ratio_T8192"]["met"]


def test_the_dtypes_follow_the_machine():
    from ds_smoes.bench.scale.command import measured_dtypes

    native = lambda: (True, "CPU capability AVX512, amx_bf16")  # noqa: E731
    emulated = lambda: (False, "CPU capability AVX2, no avx512_bf16 or amx_bf16 in /proc/cpuinfo")  # noqa: E731
    assert measured_dtypes(None, native) == (["fp32", "bf16"], None)
    assert measured_dtypes(None, emulated) == (["fp32"], emulated()[1])
    assert measured_dtypes(["bf16"], emulated) == (["bf16"], None)       # asked for: measured anyway
    assert measured_dtypes(["fp32"], native) == (["fp32"], None)


def test_bad_arguments_exit_2_with_one_message(tmp_path, capsys):
    from ds_smoes.bench.cli import main

    assert main(["scale", "--tokens", "0", "--out", str(tmp_path)]) == 2
    assert "--tokens must be >= 1" in capsys.readouterr().err
    assert main(["scale", "--profile-from", str(tmp_path / "none"), "--out", str(tmp_path), "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert "no trained run there" in err and "make demo" in err and "Traceback" not in err


@pytest.mark.slow
def test_scale_runs_end_to_end_on_the_toy_shape(tmp_path):
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"k": 2, "vision_share": 0.3, "own_routes_MJ": [[0.1, 0.4, 0.5], [0.0, 0.2, 0.8]]}))
    out = tmp_path / "bench"
    # --dtypes fp32: without it the command adds bf16 where the CPU has it natively (AVX512-BF16, AMX), so the
    # number of measured entries would depend on the machine (test_the_dtypes_follow_the_machine covers that choice)
    proc = python_run(["-m", "ds_smoes.bench", "scale", "--shapes", "toy", "--tokens", "256", "--autoep",
                       "--dtypes", "fp32", "--repeats", "2", "--attention-lengths", "256", "--attention-repeats", "1",
                       "--profile-from", str(profile), "--out", str(out), "--no-mlflow"], timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "scale.json").read_text())
    (fig,) = result["shapes"]
    assert fig["shape"] == "toy" and fig["dispatch_ratio_rank_once_vs_stock"]["profile"]["rounds"] == 2
    b = fig["remote_bytes_per_token"]
    # specialised routes cross less than uniform ones under rank_once; every variant sent something
    assert b["profile/rank_once"] < b["uniform/rank_once"] and min(b.values()) > 0
    assert "## Bars" in (out / "scale.md").read_text() and "layer_ratio_smoes_vs_topk" in proc.stdout
    # --autoep: DeepSpeed's AutoEP layer in the same rounds; on the same routes, once per rank sends fewer rows than
    # AutoEP's one per (token, expert) pair, and both count whole token vectors (64 float32 = 256 bytes)
    a = fig["autoep"]
    assert a["autoep_layer_ratio"]["rounds"] == 2 and a["bytes_ratio_rank_once_vs_pair"] < 1
    assert b["autoep-profile/rank_once"] == b["profile/rank_once"]     # the legacy layer's dispatch, the same routes
    assert all(b[v] > 0 for v in ("autoep/stock", "autoep-profile/stock", "autoep-smoes/rank_once"))
    assert "On DeepSpeed's AutoEP layer" in (out / "scale.md").read_text()
    assert {"autoep_bytes_ratio", "autoep_layer_ratio"} <= set(fig["bars"])
    (row,) = result["attention"]["rows"]
    assert row["T"] == 256 and row["peak_with_score"] > 0 and row["time_ratio"] > 0
