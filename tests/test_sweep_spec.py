"""The sweep file: validation with actionable errors, trial expansion, and the comparison tables."""
import json

import pytest
import yaml

from launch import ROOT
from ds_smoes.core.errors import ConfigError
from ds_smoes.sweep import report
from ds_smoes.sweep.spec import load_sweep, precheck, trial_config


def write(tmp_path, **fields):
    spec = {"name": "t", "base_config": str(ROOT / "configs" / "demo.yaml"), **fields}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_example_sweeps_validate():
    smoke = load_sweep(ROOT / "configs" / "sweeps" / "smoke.yaml")
    assert smoke.num_trials == 2 and len(smoke.expand()) == 2
    full = load_sweep(ROOT / "configs" / "sweeps" / "bins_scores.yaml")
    trials = full.expand()
    assert len(trials) == 12
    assert {(t["values"]["smoes.num_bins"], t["values"]["smoes.score_type"], t["values"]["run.seed"])
            for t in trials} == {(b, s, seed) for b in (2, 4) for s in ("attention", "gaussian", "hard")
                                 for seed in (0, 1)}
    assert precheck(full, trials) == {}
    gates = load_sweep(ROOT / "configs" / "sweeps" / "gates.yaml")
    trials = gates.expand()
    assert len(trials) == 21 and precheck(gates, trials) == {}
    names = {(t["values"]["smoes.gate"], t["values"].get("smoes.bin_objective", "mi")) for t in trials}
    assert names == {("topk", "mi"), ("smoes", "mi"), ("hard", "mi"), ("ltdr", "mi"), ("smar", "mi"),
                     ("hybrid", "mi"), ("smoes", "kl")}


def test_grid_expands_in_file_order_with_names(tmp_path):
    spec = load_sweep(write(tmp_path, grid={"smoes.num_bins": [2, 4], "run.seed": [0, 1]},
                            trials=[{"smoes.score_type": "hard"}]))
    trials = spec.expand()
    assert [t["id"] for t in trials] == ["t00", "t01", "t02", "t03", "t04"]
    assert trials[1]["values"] == {"smoes.num_bins": 2, "run.seed": 1}
    assert trials[1]["name"] == "t01:num_bins=2,seed=1"
    assert trials[4]["values"] == {"smoes.score_type": "hard"} and trials[4]["name"] == "t04:score_type=hard"
    assert spec.axes == ["smoes.num_bins", "run.seed", "smoes.score_type"]


def test_any_training_field_is_an_axis(tmp_path):
    spec = load_sweep(write(tmp_path, grid={"optim.lr": [1e-3, 3e-3], "model.d_model": [32]},
                            overrides={"optim.max_steps": 5}))
    cfg = trial_config(spec, spec.expand()[1], {"tracking.run_name": "x"})
    assert cfg.optim.lr == 3e-3 and cfg.model.d_model == 32 and cfg.optim.max_steps == 5
    assert cfg.tracking.run_name == "x" and cfg.smoes.num_bins == 2  # the base config's value


def test_gate_axis_reaches_the_config(tmp_path):
    from ds_smoes.core.config import SMoESConfig

    if "gate" not in SMoESConfig.model_fields:
        pytest.skip("smoes.gate is not a config field yet")
    spec = load_sweep(write(tmp_path, grid={"smoes.gate": ["smoes", "topk"]}))
    assert [trial_config(spec, t).smoes.gate for t in spec.expand()] == ["smoes", "topk"]


def test_set_on_the_command_line_overrides_every_trial(tmp_path):
    spec = load_sweep(write(tmp_path, grid={"run.seed": [0, 1]}, overrides={"optim.max_steps": 5}),
                      ["optim.max_steps=7", "run.log_every=2"])
    assert spec.overrides == {"optim.max_steps": 7, "run.log_every": 2}


@pytest.mark.parametrize("fields, needles", [
    ({"grid": {"smoes.num_bin": [2]}}, ["grid", "'smoes.num_bin'", "did you mean 'smoes.num_bins'"]),
    ({"grid": {"smoes": [2]}}, ["'smoes' is a whole section", "name one of its fields, e.g. smoes."]),
    ({"grid": {"optim.lr.x": [2]}}, ["'optim.lr' is a value, not a section"]),
    ({"overrides": {"run.sed": 1}}, ["overrides", "did you mean 'run.seed'"]),
    ({"grid": {"run.seed": []}}, ["axis 'run.seed' has no values"]),
    ({"grid": {"run.seed": [0, 0]}}, ["repeats a value"]),
    ({}, ["no trials"]),
    ({"grid": {"run.seed": [0]}, "name": "a b"}, ["name", "letters, digits"]),
    ({"grid": {"run.seed": [0]}, "resources": {"workers": 2}}, ["resources.workers: unknown field"]),
    ({"grid": {"run.seed": [0]}, "inject_crash": {"trial": 3}}, ["inject_crash.trial=3", "1 trials"]),
])
def test_bad_sweep_files_name_the_problem(tmp_path, fields, needles):
    with pytest.raises(ConfigError) as err:
        load_sweep(write(tmp_path, **fields))
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_sweep(tmp_path / "nope.yaml")
    path = write(tmp_path, grid={"run.seed": [0]})
    data = yaml.safe_load(path.read_text())
    data["base_config"] = "missing.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="base_config .*missing.yaml.* not found"):
        load_sweep(path)


def test_precheck_flags_trials_whose_values_do_not_fit(tmp_path):
    # the demo has ep_size 2 and 4 experts: 3 bins is no multiple of ep_size; ep_size 4 needs 4 workers
    spec = load_sweep(write(tmp_path, grid={"smoes.num_bins": [2, 3]}, trials=[{"smoes.ep_size": 4,
                                                                                 "smoes.num_bins": 4}]))
    bad = precheck(spec, spec.expand())
    assert set(bad) == {"t01", "t02"}
    assert "num_bins=3 is not a multiple of ep_size=2" in bad["t01"]
    assert "ep_size=4 does not divide the 2 workers" in bad["t02"]


# -- the comparison tables ---------------------------------------------------------------------------
def rows():
    def row(i, bins, score, seed, acc, status="FINISHED", **extra):
        metrics = {} if status != "FINISHED" else {"acc_multimodal": acc, "acc_language": 1.0, "msi": 0.2 + seed,
                                                    "remote_pairs_per_token": 0.5 * bins, **extra}
        return report.TrialRow(f"t{i:02d}", i, f"t{i:02d}:x", status, f"run{i}",
                               {"smoes.num_bins": str(bins), "smoes.score_type": score, "run.seed": str(seed)},
                               metrics, [0.1, 0.3] if metrics else [], "" if metrics else "boom")
    return [row(0, 2, "hard", 0, 0.5), row(1, 2, "hard", 1, 0.7), row(2, 4, "hard", 0, 0.9),
            row(3, 4, "hard", 1, 0.0, status="FAILED")]


def test_mean_and_sample_spread():
    assert report.mean_std([0.5, 0.7]) == pytest.approx((0.6, 0.1414213562))
    assert report.mean_std([0.9]) == (0.9, 0.0)


def test_seed_table_groups_finished_trials_over_seeds():
    groups = report.seed_groups(rows())
    assert [(g, [m.trial_id for m in members]) for g, members in groups] == [
        ({"smoes.num_bins": "2", "smoes.score_type": "hard"}, ["t00", "t01"]),
        ({"smoes.num_bins": "4", "smoes.score_type": "hard"}, ["t02"])]
    md = report.seed_table(rows())
    assert "| num_bins | score_type | seeds |" in md.splitlines()[0]
    assert "0.6000 ± 0.1414" in md and "0.9000 ± 0.0000" in md
    csv_lines = report.seed_table(rows(), "csv").splitlines()
    assert csv_lines[0].startswith("smoes.num_bins,smoes.score_type,seeds,acc_multimodal_mean,acc_multimodal_std")
    assert csv_lines[1].startswith("2,hard,2,0.6")


def test_trial_table_lists_every_trial_and_the_failure():
    md = report.trial_table(rows())
    lines = md.splitlines()
    assert lines[0].startswith("| trial | num_bins | score_type | seed | status ")
    assert sum(l.startswith("| t0") for l in lines) == 4
    assert "FAILED" in md and "- t03: boom" in md
    assert "remote pairs/token" in lines[0] and "remote bytes/token" not in lines[0]  # no trial measured bytes
    csv_text = report.trial_table(rows(), "csv")
    assert csv_text.splitlines()[0].split(",")[:5] == ["trial", "smoes.num_bins", "smoes.score_type", "run.seed",
                                                       "status"]
    assert json.dumps([0.1, 0.3]) in csv_text


def test_figures_label_the_communication_axis_honestly():
    fig = report.accuracy_vs_communication(rows())
    assert "bytes are not measured" in fig.axes[0].get_xlabel()
    with_bytes = [r for r in rows() if r.status == "FINISHED"]
    for r in with_bytes:
        r.metrics["bytes_per_token"] = 1024.0
    assert "remote bytes per token and MoE layer (measured" in \
        report.accuracy_vs_communication(with_bytes).axes[0].get_xlabel()
    fig = report.msi_per_layer(rows())
    assert len(fig.axes[0].lines) == 3  # the finished trials


def test_a_sweep_with_an_invalid_trial_exits_2_at_once_and_starts_nothing(tmp_path):
    """One message naming the sweep file, the trial and the field (with the closest choice), exit 2, before
    anything starts: Ray not even imported, no MLflow store, no sweep folder."""
    import subprocess
    import sys

    from sweep_util import SWEEP_SCRIPT, env

    path = write(tmp_path, grid={"smoes.gate": ["topk", "ltdrr"], "smoes.num_bins": [2, 3]})
    db, store = tmp_path / "mlflow.db", tmp_path / "store"
    args = [SWEEP_SCRIPT, "run", str(path), "--tracking-uri", f"sqlite:///{db}", "--storage-path", str(store)]
    # the script as `python SCRIPT ...` runs it, plus a line at exit saying whether Ray was ever imported
    probe = ("import atexit, runpy, sys; atexit.register(lambda: print('ray imported:', 'ray' in sys.modules)); "
             f"sys.argv = {args!r}; runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "ray imported: False" in proc.stdout, proc.stdout[-2000:]
    err = proc.stderr
    assert "Traceback" not in err and err.count("error:") == 1, err
    assert f"{path}: 3 of 4 trials do not validate, so the sweep was not started:" in err
    assert "  t01:gate=topk,num_bins=3:" in err and "  t02:gate=ltdrr,num_bins=2:" in err and "t00:" not in err
    assert ("smoes.gate: Input should be 'smoes', 'topk', 'hard', 'hybrid', 'ltdr' or 'smar' (got 'ltdrr'; did "
            "you mean 'ltdr'?)  [from the sweep: smoes.gate=\"ltdrr\"]") in err
    assert "num_bins=3 is not a multiple of ep_size=2" in err
    assert "configs/demo.yaml:" not in err   # the value came from the sweep file, not the base config
    assert not db.exists() and not store.exists()
