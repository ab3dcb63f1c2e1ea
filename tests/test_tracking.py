"""The project's MLflow experiments are model-training experiments with the headline view (the UI link that opens
their runs table with the headline columns, in Model-training mode; ci/mlflow-ui-check.sh checks it in a browser):
every place that creates one goes through `ds_smoes.app.tracking.experiment_id`, checked here on a real SQLite
store."""
import json

import pytest

from ds_smoes.app.tracking import (EXPERIMENT_KIND_TAG, HEADLINE_METRICS, HEADLINE_VIEW_KEY, MODEL_TRAINING_KIND,
                                   SHARED_VIEW_TAG_PREFIX, Tracker, experiment_id, main, runs_table_url)
from ds_smoes.sweep.store import SweepStore

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    # one store for the module (creating a SQLite store runs MLflow's migrations, seconds each); the tests use
    # experiment names of their own
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def kind(uri, name):
    return mlflow.MlflowClient(uri).get_experiment_by_name(name).tags.get(EXPERIMENT_KIND_TAG)


def test_tag_is_mlflows_own():
    # the UI's ExperimentKind values; a renamed value in a later MLflow would silently stop working
    assert (EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND) == ("mlflow.experimentKind", "custom_model_development")


def test_tracker_creates_a_model_training_experiment(uri):
    tracker = Tracker(uri, "ds-smoes", "run-a")
    tracker.end()
    assert kind(uri, "ds-smoes") == MODEL_TRAINING_KIND
    run = mlflow.MlflowClient(uri).get_run(tracker.run_id)
    assert run.info.experiment_id == tracker.experiment_id
    Tracker(uri, "ds-smoes", "run-b").end()  # a second run reuses the experiment
    assert len(mlflow.MlflowClient(uri).search_experiments(filter_string="name = 'ds-smoes'")) == 1


def test_sweep_store_creates_a_model_training_experiment(uri):
    store = SweepStore(uri)
    parent = store.create_parent("ds-smoes-sweep", "sweep", {}, {"a": 1})
    assert kind(uri, "ds-smoes-sweep") == MODEL_TRAINING_KIND
    assert store.get(parent).experiment_id == store.experiment_id("ds-smoes-sweep", create=False)
    assert store.experiment_id("absent", create=False) is None
    assert mlflow.MlflowClient(uri).get_experiment_by_name("absent") is None


def test_existing_experiment_without_kind_gets_it(uri):
    client = mlflow.MlflowClient(uri)
    old_id = client.create_experiment("ds-smoes-old")  # as the project created it before
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old_id).tags
    tracker = Tracker(uri, "ds-smoes-old", "run")
    assert tracker.experiment_id == old_id
    assert kind(uri, "ds-smoes-old") == MODEL_TRAINING_KIND


def test_a_kind_chosen_by_the_user_is_kept(uri):
    client = mlflow.MlflowClient(uri)
    client.create_experiment("mine", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert experiment_id(client, "mine") == client.get_experiment_by_name("mine").experiment_id
    assert kind(uri, "mine") == "genai_development"


def view(uri, name):
    raw = mlflow.MlflowClient(uri).get_experiment_by_name(name).tags.get(SHARED_VIEW_TAG_PREFIX + HEADLINE_VIEW_KEY)
    return json.loads(raw) if raw is not None else None


def test_the_headline_view_names_columns_as_the_ui_does(uri):
    Tracker(uri, "ds-smoes-view", "run").end()
    state = view(uri, "ds-smoes-view")
    # the UI's own keys and column names (group.`name`): a shared view with other names shows no column
    assert state["selectedColumns"][:2] == ["metrics.`acc_multimodal`", "metrics.`acc_language`"]
    assert "params.`smoes.gate`" in state["selectedColumns"] and "params.`run.seed`" in state["selectedColumns"]
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`acc_multimodal`", False)
    assert len(state["selectedColumns"]) == len(set(state["selectedColumns"])) >= len(HEADLINE_METRICS)


def test_an_older_experiment_gets_the_headline_view_and_a_changed_one_is_rewritten(uri):
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("ds-smoes-older", tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
    assert view(uri, "ds-smoes-older") is None
    experiment_id(client, "ds-smoes-older")
    assert view(uri, "ds-smoes-older")["orderByKey"] == "metrics.`acc_multimodal`"
    client.set_experiment_tag(exp, SHARED_VIEW_TAG_PREFIX + HEADLINE_VIEW_KEY, json.dumps({"selectedColumns": []}))
    experiment_id(client, "ds-smoes-older")
    assert view(uri, "ds-smoes-older")["selectedColumns"]


def test_the_link_opens_model_training_mode_on_the_shared_view():
    url = runs_table_url("7", "http://127.0.0.1:5000/")
    assert url == ("http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
                   "&viewStateShareKey=ds-smoes-headline")
    assert runs_table_url("7", charts=True).endswith("&compareRunsMode=CHART")


def test_make_mlflow_ui_prints_a_link_per_experiment_with_runs(uri, capsys):
    tracker = Tracker(uri, "ds-smoes-links", "run")
    tracker.end()
    assert main(["--tracking-uri", uri, "--ui", "http://host:1234"]) == 0
    out = capsys.readouterr().out
    assert f"ds-smoes-links: http://host:1234/#/experiments/{tracker.experiment_id}/runs?" in out
    assert "Default:" not in out   # MLflow's own empty experiment is left out


def test_a_resumed_run_ends_the_run_its_killed_processes_left_running(uri):
    killed = Tracker(uri, "ds-smoes-crash", "first")           # never ended: its processes were killed
    resumed = Tracker(uri, "ds-smoes-crash", "second")
    resumed.close_abandoned(killed.run_id, "killed after step 20")
    client = mlflow.MlflowClient(uri)
    first = client.get_run(killed.run_id)
    assert first.info.status == "KILLED" and first.data.tags["end_reason"] == "killed after step 20"
    assert client.get_run(resumed.run_id).data.tags["resumed_from_run"] == killed.run_id
    done = Tracker(uri, "ds-smoes-crash", "third")
    done.end()
    resumed.close_abandoned(done.run_id, "not this one")        # a run that ended is left as it is
    assert client.get_run(done.run_id).info.status == "FINISHED"
