"""`python -m ds_smoes.bench`: argument and run-directory errors exit 2 with one message; `simulate` on a
hand-made benchmark result writes its table, CSV, JSON and figure; the commands it would launch."""
import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench_fixtures import raw_result
from ds_smoes.bench import runs
from ds_smoes.bench.cli import main
from ds_smoes.bench.comm.command import worker_args
from ds_smoes.bench.comm.report import assemble, strict_json
from ds_smoes.core.config import SMoESConfig
from ds_smoes.core.errors import ConfigError
from ds_smoes.model.config import ModelConfig
from launch import ROOT

CONFIG = str(ROOT / "configs" / "demo.yaml")


@pytest.mark.parametrize("argv, needle", [
    (["comm", "--variants", "a", "x"], "unknown variant(s) ['x']"),
    (["comm", "--init-only", "--no-init"], "leave nothing to measure"),
    (["comm", "--repeats", "0"], "--repeats must be >= 1"),
    (["comm", "--init-only", "--smoes-run", "runs/demo"], "drop --smoes-run"),
    (["comm", "--set", "smoes.dispatch=rank_onec"], "smoes.dispatch"),
])
def test_bad_arguments_exit_2_with_one_message(argv, needle, capsys):
    assert main([*argv, "--config", CONFIG, "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err


def test_unfinished_run_dir_is_refused(tmp_path, capsys):
    (tmp_path / "half").mkdir()
    code = main(["comm", "--config", CONFIG, "--no-mlflow", "--variants", "c", "--smoes-run",
                 str(tmp_path / "half"), "--out", str(tmp_path / "out")])
    assert code == 2 and "not a finished training run" in capsys.readouterr().err


def test_missing_model_with_no_train_is_refused(tmp_path, capsys):
    code = main(["comm", "--config", CONFIG, "--no-mlflow", "--variants", "a", "--no-train",
                 "--out", str(tmp_path)])
    assert code == 2 and "--no-train" in capsys.readouterr().err


def test_run_dir_of_another_gate_or_layout_is_refused(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint" / "final").mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"gate": "smoes", "num_experts": 4, "k": 2, "ep_size": 2}))
    cfg = SMoESConfig(num_experts=4, k=2, ep_size=2, num_bins=2)
    assert runs.load_run(run, "smoes", cfg)["gate"] == "smoes"
    with pytest.raises(ConfigError, match="trained with gate 'smoes'"):
        runs.load_run(run, "topk", cfg)
    with pytest.raises(ConfigError, match="num_experts=4 \\(benchmark config: 8\\)"):
        runs.load_run(run, "smoes", SMoESConfig(num_experts=8, k=2, ep_size=2, num_bins=2))
    # a model of another width: refused by name, not left to fail inside DeepSpeed's checkpoint loading
    (run / "train_config.json").write_text(json.dumps({"model": ModelConfig(d_model=64).model_dump()}))
    assert runs.load_run(run, "smoes", cfg, ModelConfig(d_model=64))["gate"] == "smoes"
    with pytest.raises(ConfigError, match="model.d_model=64 \\(benchmark config: 512\\).*own --out"):
        runs.load_run(run, "smoes", cfg, ModelConfig(d_model=512))


def test_training_and_worker_commands():
    args = runs.train_args(Path("configs/demo.yaml"), ["optim.lr=0.001"], "topk", Path("runs/bench/topk-epochs2"),
                           2.0, None, "ds-smoes-bench", None)
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    assert sets[:2] == ["optim.lr=0.001", "smoes.gate=topk"]
    assert f"run.output_dir={Path('runs/bench/topk-epochs2').resolve()}" in sets and "optim.epochs=2" in sets
    assert "--no-mlflow" in args
    args = runs.train_args(Path("c.yaml"), [], "smoes", Path("r"), None, "sqlite:///x.db", "exp", "PARENT")
    assert args[args.index("--parent-run-id") + 1] == "PARENT" and "--no-mlflow" not in args
    assert not any(a.startswith("optim.epochs") for a in args)
    assert runs.default_run_dir(Path("runs/bench"), "smoes", None) == Path("runs/bench/smoes")
    assert runs.default_run_dir(Path("runs/bench"), "smoes", 0.5) == Path("runs/bench/smoes-epochs0.5")
    ns = SimpleNamespace(config=Path("c.yaml"), variants=["a", "c"], batches=2, warmup=1, repeats=3, eval_questions=8,
                         init_only=False, no_init=False, overrides=["optim.lr=1"])
    w = worker_args(ns, {"topk": {"run_dir": "runs/t"}, "smoes": {"run_dir": "runs/s"}}, Path("raw.json"), 16)
    assert w[w.index("--sources") + 1:w.index("--sources") + 3] == ["trained", "init"]
    assert w[w.index("--topk-checkpoint") + 1] == str(Path("runs/t/checkpoint"))
    assert w[w.index("--batch-size") + 1] == "16" and w[w.index("--set") + 1] == "optim.lr=1"


def test_simulate_from_a_benchmark_result(tmp_path, capsys):
    comm = tmp_path / "comm.json"
    comm.write_text(strict_json(assemble(raw_result())))
    out = tmp_path / "sim"
    assert main(["simulate", "--from", str(comm), "--out", str(out), "--no-mlflow", "--experts", "8", "64",
                 "--ep-sizes", "2", "8", "128"]) == 0
    for name in ("simulate.json", "simulate.csv", "simulate.md", "simulate.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "simulate.json").read_text())
    assert {(r["experts"], r["ep_size"]) for r in summary["rows"]} == {(8, 2), (8, 8), (64, 2), (64, 8)}
    assert summary["source"] == "trained" and summary["method"] == "analytic"
    # (a) and (b) reproduce the measurement by construction; (c) from the own-route profile at E = 4, R = 2
    assert summary["calibration"]["a"]["model"] == pytest.approx(700.0)
    assert summary["calibration"]["b"]["model"] == pytest.approx(600.0)
    # text P(j) = 0.1, 0.2, 0.7 and vision 0, 0.2, 0.8 -> 1.2 ranks either way, 0.6 remote: 512 * 0.6 B
    assert summary["calibration"]["c"] == {"model": pytest.approx(307.2), "measured": 280.0}
    with open(out / "simulate.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 5  # 4 cells x (a) .. (e)
    assert "| 64 | 8 |" in capsys.readouterr().out


def test_simulate_errors(tmp_path, capsys):
    assert main(["simulate", "--from", str(tmp_path / "none.json"), "--no-mlflow"]) == 2
    assert "run `python -m ds_smoes.bench comm` first" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert main(["simulate", "--from", str(tmp_path / "bad.json"), "--no-mlflow"]) == 2
    assert "not a comm.json" in capsys.readouterr().err
    comm = tmp_path / "comm.json"
    comm.write_text(strict_json(assemble(raw_result())))
    assert main(["simulate", "--from", str(comm), "--no-mlflow", "--experts", "8", "--ep-sizes", "16"]) == 2
    assert "no (experts, ep_size) pair" in capsys.readouterr().err


def test_figures_reach_mlflow(tmp_path):
    """Every variant's figures, the expert-work ones included, land in the bench's MLflow run; a
    figure an older measurement lacks (NaN) is left out rather than logged."""
    from ds_smoes.bench.comm.command import _log
    from ds_smoes.sweep.store import SweepStore, prepare_tracking_uri
    from ds_smoes.app.tracking import Tracker

    uri = prepare_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    raw = raw_result()
    for layer in raw["sources"]["trained"]["b"]["layers"]:
        del layer["expert_rows_busiest"]
    result = assemble(raw)
    tracker = Tracker(uri, "bench", "comm")
    for name in ("comm.json", "comm.md"):
        (tmp_path / name).write_text("{}")
    _log(tracker, result, tmp_path, "table")
    metrics = SweepStore(uri).get(tracker.run_id).metrics
    assert metrics["trained/c/expert_rows_per_token"] == pytest.approx(1.2)
    assert metrics["trained/a/expert_load_imbalance"] == 1.0
    assert metrics["trained/c/bytes_per_token"] == 280.0
    assert "trained/b/expert_rows_per_token" not in metrics and "trained/b/bytes_per_token" in metrics
