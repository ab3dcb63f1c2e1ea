"""The comparison table: aggregation by hand, and a real (tiny) 2-variant run."""
import json

import pytest

from ds_smoes.app.compare import FIGURES, VARIANTS, main, markdown_table, summarize
from launch import ROOT


def _m(mm, lang):
    base = {f: 0.5 for f in FIGURES}
    base.update(acc_multimodal=mm, acc_language=lang, acc_overall=(mm + lang) / 2)
    return base


def test_summary_means_spreads_and_deltas_by_hand():
    rows = summarize({"topk": [_m(0.8, 0.9), _m(0.6, 0.9)], "smoes": [_m(0.9, 1.0), _m(0.8, 0.8)]})
    top, smoes = rows
    assert top["acc_multimodal"] == pytest.approx(0.7) and top["acc_multimodal_sd"] == pytest.approx(0.141421, 1e-4)
    assert smoes["delta_acc_multimodal"] == pytest.approx(100 * (0.85 - 0.7))
    assert smoes["delta_acc_language"] == pytest.approx(0.0)
    assert top["delta_acc_overall"] == pytest.approx(0.0)
    md = markdown_table(rows)
    assert "| smoes | 2 | 0.8500 ± 0.0707 | +15.00 |" in md
    assert md.rstrip().endswith("| n/a |")  # bytes not measured in these runs


def test_bytes_column_only_when_every_seed_measured_it():
    a, b = _m(0.8, 0.9), _m(0.8, 0.9)
    a["bytes_per_token"], b["bytes_per_token"] = 100.0, 300.0
    row = summarize({"topk": [a, b]})[0]
    assert row["bytes_per_token"] == pytest.approx(200.0)
    del b["bytes_per_token"]
    assert summarize({"topk": [a, b]})[0]["bytes_per_token"] != summarize({"topk": [a, b]})[0]["bytes_per_token"]


def test_every_variant_is_a_valid_config():
    from ds_smoes.app.config import load_train_config

    for name, overrides in VARIANTS.items():
        cfg = load_train_config(ROOT / "configs" / "demo.yaml", overrides)
        assert cfg.smoes.gate in name or cfg.smoes.gate == "smoes"


def test_unknown_variant_is_rejected(capsys):
    assert main(["--variants", "nope"]) == 2
    assert "unknown variant" in capsys.readouterr().err


@pytest.mark.slow
def test_two_variant_comparison_runs_logs_and_resumes(tmp_path, capsys, digits_dir):
    data = digits_dir
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--config", str(ROOT / "configs" / "demo.yaml"), "--variants", "topk", "smoes", "--seeds", "0",
            "--out", str(tmp_path / "cmp"), "--tracking-uri", uri,
            "--set", "optim.max_steps=6", "--set", "run.eval_every_epoch=false", "--set", "data.generate_digits=false",
            "--set", f"data.train_json={data / 'train.json'}", "--set", f"data.val_json={data / 'val.json'}",
            "--set", f"data.test_json={data / 'test.json'}", "--set", f"data.image_folder={data}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| topk | 1 |" in out and "| smoes | 1 |" in out
    assert (tmp_path / "cmp" / "table.md").exists()
    m = json.loads((tmp_path / "cmp" / "topk" / "seed0" / "metrics.json").read_text())
    assert m["gate"] == "topk"

    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("ds-smoes-compare")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "comparison"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and {r.data.tags["gate"] for r in children} == {"topk", "smoes"}
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id)} >= {"comparison.md", "comparison.csv"}

    # resume: finished runs are not launched again
    assert main(args) == 0
    assert len(client.search_runs([exp.experiment_id])) == 3 + 1  # 1 more parent, no new children


def test_run_jobs_keeps_order_reports_failures_and_names_the_interrupted_run(tmp_path, capsys):
    from ds_smoes.app.compare import Interrupted, run_jobs

    seen = []

    def run(name, seed, run_dir):
        seen.append((name, seed, run_dir))
        return None if (name, seed) == ("b", 0) else {"acc": seed}

    jobs = [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    results, failed = run_jobs(jobs, tmp_path, run, lambda m: f"acc {m['acc']}")
    assert seen == [(n, s, tmp_path / n / f"seed{s}") for n, s in jobs]
    assert results == {"a": [{"acc": 0}, {"acc": 1}], "b": [{"acc": 1}]} and failed == ["b seed 0"]
    out = capsys.readouterr().out
    assert "[2/4] b seed 0 ..." in out and f"FAILED (log: {tmp_path / 'b' / 'seed0' / 'train.log'})" in out
    assert out.count("s: acc ") == 3

    def stopped(name, seed, run_dir):
        if seed == 1:
            raise KeyboardInterrupt
        return {"acc": 0}

    with pytest.raises(Interrupted, match="^a seed 1$"):
        run_jobs(jobs, tmp_path, stopped, str)
