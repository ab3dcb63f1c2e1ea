"""The project's MLflow experiments are model-training experiments (MLflow 3's UI then opens them on the runs
table, not on the GenAI traces overview): every place that creates one goes through
`ds_smoes.app.tracking.experiment_id`, checked here on a real SQLite store."""
import pytest

from ds_smoes.app.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND, Tracker, experiment_id
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
