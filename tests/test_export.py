"""Placement during training and the deployment export, end to end: the demo's 2-rank run (the session's
`demo_run`), whose bins freeze at step 150 and whose experts move onto their bins' ranks, exported, then
evaluated from the export on 2 ranks and on 1 process with the same results."""
import json

import pytest

from launch import deepspeed_run, python_run


@pytest.mark.slow
def test_placement_then_export_round_trip(demo_run, tmp_path):
    trained = demo_run.metrics
    assert "placement at step 150 (bins frozen): moved" in demo_run.proc.stdout, demo_run.output()
    run_dir = demo_run.out
    db = demo_run.tracking_uri.removeprefix("sqlite:///")

    import mlflow

    run = mlflow.MlflowClient(f"sqlite:///{db}").get_run(trained["mlflow_run_id"])
    assert {"placement/experts_moved", "placement/bytes_sent", "placement/seconds"} <= set(run.data.metrics)

    proc = python_run(["-m", "ds_smoes.export", "--run", str(run_dir), "--serving", "--redundant-experts", "2"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    export = run_dir / "export"
    # the serving placements: the test split's routes replayed, one searched placement per trace, the mixed one in
    # SGLang's file, and the comparison (docs/serving.md)
    sim = json.loads((export / "serving_sim.json").read_text())
    assert "routes replayed from the measured routes" in sim["note"]
    assert sim["exported"] == {t: f"search({t})+2" for t in ("image_heavy", "mixed", "text_heavy")}
    assert {r["placement"] for r in sim["rows"]} == {"bins", "linear", "round_robin", "bins+2", "linear+2",
                                                      "round_robin+2", "eplb+2", *sim["exported"].values()}
    sglang = json.loads((export / "sglang_expert_location.json").read_text())["physical_to_logical_map"]
    assert sglang == json.loads((export / "sglang_expert_location.mixed.json").read_text())["physical_to_logical_map"]
    assert len(sglang) == 2 and all(sorted(set(layer)) == [0, 1, 2, 3] and len(layer) == 6 for layer in sglang)
    assert json.loads((export / "eplb_maps.json").read_text())["placement"] == "search(mixed)+2"
    assert "exported (sglang_expert_location.json = the mixed one)" in proc.stdout
    placement = json.loads((export / "placement.json").read_text())
    assert placement["supported_ep_sizes"] == [1, 2] and len(placement["layers"]) == 2
    for layer in placement["layers"]:
        # bin order: bin b's experts hold physical ids [2b, 2b + 2) -> bin b on EP rank b
        assert layer["rank_of_expert"]["2"] == layer["bin_of_expert"]
        assert sorted(layer["physical_of_expert"]) == [0, 1, 2, 3]

    proc = deepspeed_run(["--module", "ds_smoes.train", "--init-from", str(export), "--eval-only", "--no-mlflow",
                          "--output-json", str(tmp_path / "eval2.json")])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # one process: the export's ep_size (2) becomes the world size (1) by itself
    proc = python_run(["-m", "ds_smoes.train", "--init-from", str(export), "--eval-only", "--tracking-uri",
                       f"sqlite:///{db}", "--output-json", str(tmp_path / "eval1.json")])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"evaluation only: no training; the figures go to {export / 'eval-ep1' / 'metrics.json'}" in proc.stdout
    # each layout's evaluation has its own folder: the one at ep 1 did not overwrite the one at ep 2
    assert json.loads((export / "eval-ep2" / "metrics.json").read_text())["cross_rank_rate"] > 0
    eval2 = json.loads((tmp_path / "eval2.json").read_text())
    eval1 = json.loads((tmp_path / "eval1.json").read_text())
    # the eval run is told apart in MLflow: its own name and a mode tag, and no training figures
    run = mlflow.MlflowClient(f"sqlite:///{db}").get_run(eval1["mlflow_run_id"])
    assert run.data.tags["mode"] == "eval" and run.info.run_name.endswith("-eval")
    assert "tokens_per_s" not in run.data.metrics and "steps" not in run.data.metrics
    assert mlflow.MlflowClient(f"sqlite:///{db}").get_run(trained["mlflow_run_id"]).data.tags["mode"] == "train"
    for figures in (eval2, eval1):
        assert not {"steps", "tokens_per_s", "final_train_loss"} & set(figures)
        for key in ("acc_multimodal", "acc_language"):
            assert figures[key] == trained[key], key
        assert figures["test_loss"] == pytest.approx(trained["test_loss"], rel=1e-5)
        assert figures["msi"] == pytest.approx(trained["msi"], abs=1e-6)
    # same placement on 2 ranks: the same tokens cross ranks; one process: none do
    assert eval2["cross_rank_rate"] == pytest.approx(trained["cross_rank_rate"], abs=1e-9)
    assert eval2["bytes_per_token"] == pytest.approx(trained["bytes_per_token"], rel=1e-9)
    assert eval1["cross_rank_rate"] == 0.0
    assert not (export / "eval-ep1" / "checkpoint").exists()  # eval-only writes figures, not checkpoints


def test_export_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    from ds_smoes.app import export, train

    assert export.main(["--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "train_config.json not found" in err and "Traceback" not in err
    assert train.main(["--init-from", str(tmp_path), "--eval-only"]) == 2
    assert "Traceback" not in capsys.readouterr().err
