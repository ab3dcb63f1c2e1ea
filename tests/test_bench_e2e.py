"""`python -m ds_smoes.bench comm` end to end on 2 real gloo ranks (DeepSpeed launcher): the quick
init-only mode with every variant, and the trained path (training a short SMoES model first)."""
import json

import pytest

from launch import python_run
from test_train_cli import write_config


def _strict(path):
    def refuse(token):
        raise ValueError(f"{path}: {token} is not strict JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def _check_accounting(setup, rows):
    d, elt, layers = setup["d_model"], setup["element_size"], setup["moe_layers"]
    for key, r in rows.items():
        for field in ("bytes_per_token", "cross_rank_rate", "ranks_per_token", "ms_per_step", "acc_multimodal",
                      "acc_language", "acc_overall", "delta_bytes_vs_a_pct", "total_bytes_per_token"):
            assert field in r, (key, field)
        # what the layers reported (layer.last_comm) = what the routes and capacities say they must send
        assert r["measured_remote_bytes"] == r["expected_remote_bytes"] > 0, key
        assert r["bytes_per_token"] == pytest.approx(r["measured_remote_bytes"] / (r["valid_tokens"] * layers))
        assert r["ms_per_step"] > 0 and 0.0 <= r["acc_overall"] <= 1.0
        if r["gate"] == "smoes" and r["dispatch"] == "rank_once":
            # the SMoES gate routes no padding: one vector out and one back per (valid token, remote rank)
            assert r["bytes_per_token"] == pytest.approx(2 * d * elt * r["remote_pairs_per_token"])
            assert r["metadata_bytes_per_token"] > 0
            # k rows per valid token, spread over ep_size ranks: the average rank runs k / ep per token
            average_rank = r["expert_rows_per_token"] / r["expert_load_imbalance"]
            assert average_rank == pytest.approx(setup["k"] / setup["ep_size"])
        assert r["expert_rows_per_token"] > 0 and r["expert_load_imbalance"] >= 1.0, key
        if r["dispatch"] == "deepspeed":
            assert r["metadata_bytes_per_token"] == 0
            assert r["expert_load_imbalance"] == 1.0  # the padded buffer: the same rows on every rank
    if "d" in rows:
        assert rows["d"]["ranks_per_token"] == 1.0  # one bin per token, bins on ranks


@pytest.mark.slow
def test_init_only_quick_mode_measures_every_variant(tmp_path, digits_dir):
    cfg = write_config(tmp_path, digits_dir)
    out = tmp_path / "bench"
    proc = python_run(["-m", "ds_smoes.bench", "comm", "--config", str(cfg), "--init-only", "--batches", "2",
                       "--warmup", "1", "--repeats", "2", "--eval-questions", "8", "--out", str(out), "--no-mlflow"],
                      timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "models at initialisation" in proc.stdout and "| (c) | SMoES gate + rank_once dispatch |" in proc.stdout
    result = _strict(out / "comm.json")
    setup = result["setup"]
    assert setup["ep_size"] == setup["world_size"] == 2 and setup["moe_layers"] == 2
    assert setup["batches_per_rank"] == 2 and setup["repeats"] == 2
    assert set(result["sources"]) == {"init"} and "done_criteria" not in result
    rows = result["sources"]["init"]
    assert list(rows) == ["a", "b", "c", "d", "e"]
    _check_accounting(setup, rows)
    assert rows["a"]["delta_bytes_vs_a_pct"] == 0.0
    assert all(r["num_questions"] == 8 for r in rows.values())
    for name in ("comm.md", "simulate.json", "simulate.csv", "simulate.md", "simulate.png"):
        assert (out / name).stat().st_size > 0, name
    sim = _strict(out / "simulate.json")
    assert sim["source"] == "init" and len(sim["rows"]) == 30 * 5  # 3 + 4 + 5 + 6 + 6 + 6 (experts, ep_size) cells
    assert sim["calibration"]["a"]["model"] == pytest.approx(rows["a"]["bytes_per_token"])


@pytest.mark.slow
def test_trains_a_missing_model_and_loads_its_checkpoint(tmp_path, digits_dir):
    cfg = write_config(tmp_path, digits_dir, run={"eval_every_epoch": False})
    out = tmp_path / "bench"
    proc = python_run(["-m", "ds_smoes.bench", "comm", "--config", str(cfg), "--variants", "b", "c", "d",
                       "--epochs", "0.05", "--no-init", "--batches", "2", "--warmup", "1", "--repeats", "2",
                       "--out", str(out), "--no-mlflow"], timeout=420)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "training the smoes model by the demo recipe" in proc.stdout and "[smoes] [epoch 1 step 4/4]" in proc.stdout
    run_dir = out / "smoes-epochs0.05"
    assert (run_dir / "checkpoint" / "final").is_dir() and not (out / "topk-epochs0.05").exists()
    reported = json.loads((run_dir / "metrics.json").read_text())
    result = _strict(out / "comm.json")
    rows = result["sources"]["trained"]
    _check_accounting(result["setup"], rows)
    # (b) is the trained model exactly as training evaluated it (same dispatch, every test question)
    for key in ("acc_multimodal", "acc_language", "acc_overall"):
        assert rows["b"][key] == pytest.approx(reported[key]), key
        assert rows["c"][key] == pytest.approx(rows["b"][key]), key  # the dispatch does not change the model
        assert rows["b"]["reported_accuracy"][key] == reported[key]
    assert rows["b"]["run_dir"] == str(run_dir)
    assert rows["c"]["delta_bytes_vs_a_pct"] is None  # no (a) measured: no reference, no done criteria
    assert "done_criteria" not in result and "simulation skipped" in proc.stdout
