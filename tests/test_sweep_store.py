"""The sweep's MLflow layer on a real SQLite store: one child run per trial after restarts,
failed trials recorded, and concurrent writers without "database is locked"."""
import multiprocessing as mp
import sqlite3

import pytest

from ds_smoes.sweep.store import SweepStore, prepare_tracking_uri
from ds_smoes.app.tracking import Tracker


@pytest.fixture
def store(tmp_path):
    return SweepStore(prepare_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}"))


def test_sqlite_store_uses_wal(tmp_path):
    uri = prepare_tracking_uri(f"sqlite:///{tmp_path / 'sub' / 'mlflow.db'}")
    con = sqlite3.connect(uri.removeprefix("sqlite:///"))
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _attempt(store, parent, name, points, final=None, status=None):
    t = Tracker(store.tracking_uri, "e", name, tags={"gate": "smoes"}, parent_run_id=parent)
    for step, metrics in points:
        t.log_metrics(metrics, step=step)
    if final:
        t.log_metrics(final, step=20)
    if status:
        t.end(status)
    return t.run_id


def test_restarted_trial_keeps_one_child_with_the_whole_history(store):
    parent = store.create_parent("e", "sweep-1", {"sweep.id": "sweep-1"}, {"sweep.axes": "[]"})
    # attempt 1 trained to step 15 and crashed (its run stays RUNNING); the last checkpoint was at step 10
    first = _attempt(store, parent, "t00:a", [(5, {"train/loss": 3.0}), (10, {"train/loss": 2.0, "val/acc": 0.1}),
                                              (15, {"train/loss": 1.5})])
    # attempt 2 resumed from step 10: logs from step 15 on, then the final figures
    last = _attempt(store, parent, "t00:a", [(15, {"train/loss": 1.4}), (20, {"train/loss": 1.0})],
                    final={"acc_multimodal": 0.5}, status="FINISHED")
    other = _attempt(store, parent, "t01:b", [(5, {"train/loss": 9.0})], status="FINISHED")
    kept = store.settle_trial(parent, "t00:a", {"sweep.trial_id": "t00"}, failed=False)
    assert kept == last
    children = store.children(parent)
    assert {c.run_id for c in children} == {last, other}
    assert store.history(last, "train/loss") == [(5, 3.0), (10, 2.0), (15, 1.4), (20, 1.0)]
    assert store.history(last, "val/acc") == [(10, 0.1)]
    run = store.get(last)
    assert run.status == "FINISHED" and run.tags["sweep.attempts"] == "2" and run.tags["sweep.trial_id"] == "t00"
    assert store.client.get_run(first).info.lifecycle_stage == "deleted"


def test_failed_trials_are_recorded(store):
    parent = store.create_parent("e", "sweep-2", {"sweep.id": "sweep-2"}, {})
    # a training run that crashed for good: its run is marked FAILED with the error
    crashed = _attempt(store, parent, "t00:a", [(5, {"train/loss": 3.0})])
    assert store.settle_trial(parent, "t00:a", {}, failed=True, error="WorkerGroupError: boom") == crashed
    # a trial whose config was rejected before any run opened
    assert store.settle_trial(parent, "t01:b", {}, failed=True) is None
    rejected = store.record_failed_trial(parent, "t01:b", {"sweep.trial_id": "t01"}, {"smoes.num_bins": 3},
                                         "num_bins=3 is not a multiple of ep_size=2")
    runs = {c.name: c for c in store.children(parent)}
    assert runs["t00:a"].status == "FAILED" and "boom" in runs["t00:a"].tags["sweep.error"]
    assert runs["t01:b"].run_id == rejected and runs["t01:b"].status == "FAILED"
    assert runs["t01:b"].params["smoes.num_bins"] == "3"
    assert runs["t01:b"].tags["mlflow.parentRunId"] == parent


def test_parents_are_found_by_sweep_id_or_name(store):
    a = store.create_parent("e", "s-1", {"sweep.id": "s-1", "sweep.name": "s"}, {})
    b = store.create_parent("f", "s-2", {"sweep.id": "s-2", "sweep.name": "s"}, {})
    assert [p.run_id for p in store.parents()] == [b, a]  # newest first, every experiment
    assert [p.run_id for p in store.parents(sweep="s-1")] == [a]
    assert [p.run_id for p in store.parents("e", sweep="s")] == [a]


def test_a_report_without_a_name_shows_the_newest_sweep_that_ended(store):
    done = store.create_parent("e", "s-1", {"sweep.id": "s-1"}, {})
    store.finish(done)
    store.create_parent("e", "s-2", {"sweep.id": "s-2"}, {})   # abandoned: its cluster never answered
    assert store.default_parent().run_id == done
    store.finish(store.create_parent("e", "s-3", {"sweep.id": "s-3"}, {}), "FAILED")
    assert store.default_parent().tags["sweep.id"] == "s-3"


def _hammer(uri: str, parent: str, worker: int, n: int, errors) -> None:
    try:
        t = Tracker(uri, "e", f"t{worker:02d}:w", parent_run_id=parent)
        for step in range(n):
            t.log_metrics({"train/loss": 1.0 / (step + 1), "train/msi": 0.5}, step=step)
        t.log_params({f"p{i}": i for i in range(50)})
        t.end("FINISHED")
        SweepStore(uri).children(parent)  # and read while the others write
    except Exception as err:  # noqa: BLE001 - reported to the test
        errors.put(f"worker {worker}: {type(err).__name__}: {err}")


@pytest.mark.slow
def test_concurrent_trials_log_to_one_sqlite_store(store):
    parent = store.create_parent("e", "sweep-3", {"sweep.id": "sweep-3"}, {})
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(store.tracking_uri, parent, w, 100, errors)) for w in range(4)]
    for p in procs:
        p.start()
    for step in range(60):  # the driver writes too, as a sweep's driver does
        store.log_metrics(parent, {"driver/tick": step}, step=step)
    for p in procs:
        p.join(240)
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert not found, found
    assert all(p.exitcode == 0 for p in procs)
    children = store.children(parent)
    assert len(children) == 4 and all(c.status == "FINISHED" for c in children)
    assert all(len(store.history(c.run_id, "train/loss")) == 100 for c in children)


def test_trial_states_trust_a_settled_mlflow_run_over_a_lost_done_flag(store):
    """Tune's `done` can be missing from a restored trial's last result (Ray saves its state between
    the last report and marking the trial done); the settled MLflow run still counts it finished."""
    from types import SimpleNamespace

    from ds_smoes.sweep.driver import settled_trials, trial_states

    parent = store.create_parent("e", "sweep-3", {"sweep.id": "sweep-3"}, {})
    trials = [{"id": f"t0{i}", "name": f"t0{i}:x"} for i in range(4)]
    _attempt(store, parent, "t00:x", [(10, {"train/loss": 1.0})], status="FINISHED")
    store.settle_trial(parent, "t00:x", {"sweep.trial_id": "t00"}, failed=False)  # finished, settled
    _attempt(store, parent, "t01:x", [(10, {"train/loss": 2.0})])  # interrupted: RUNNING, not settled
    _attempt(store, parent, "t03:x", [(10, {"train/loss": 2.0})], status="FINISHED")  # ended, not settled

    def result(tid, metrics, error=None):
        return SimpleNamespace(config={"trial": {"id": tid}}, metrics=metrics, error=error)

    grid = [result("t00", {"finished": 1}),  # restored as TERMINATED, but `done` lost
            result("t01", {"step": 10}),
            result("t02", {}, error=RuntimeError("boom")),
            result("t03", {"step": 10})]
    settled = settled_trials(store, parent, trials)
    assert settled == {"t00"}
    assert trial_states(grid, trials, settled) == {"t00": "FINISHED", "t01": "UNFINISHED", "t02": "FAILED",
                                                   "t03": "UNFINISHED"}
    # Tune's own `done` still counts, and a trial Tune never returned stays unfinished
    assert trial_states([result("t01", {"done": True})], trials) == {
        "t00": "UNFINISHED", "t01": "FINISHED", "t02": "UNFINISHED", "t03": "UNFINISHED"}


def test_a_lost_controller_is_not_a_failed_training():
    """When Tune stops a trial (Ctrl+C on the sweep) its Train controller dies while `fit()` waits on
    it: that ActorDiedError must leave the run open for `resume`; Ray Train's own failures do not."""
    from ray.exceptions import ActorDiedError, RayActorError
    from ray.train import ControllerError, WorkerGroupError

    from ds_smoes.sweep.trial import controller_lost

    assert controller_lost(ActorDiedError()) and controller_lost(RayActorError())
    assert not controller_lost(WorkerGroupError("rank 1 died", {1: RuntimeError("boom")}))
    assert not controller_lost(ControllerError(RuntimeError("gave up")))
    assert not controller_lost(RuntimeError("boom"))


def test_failed_trials_whose_run_is_still_open_are_settled_by_the_driver(store):
    from types import SimpleNamespace

    from ds_smoes.sweep.driver import settle_failed_trials, trial_errors

    parent = store.create_parent("e", "sweep-4", {"sweep.id": "sweep-4"}, {})
    ctx = {"parent_run_id": parent, "sweep_id": "sweep-4", "sweep_name": "s"}
    trials = [{"id": f"t0{i}", "name": f"t0{i}:x", "index": i} for i in range(3)]
    lost = _attempt(store, parent, "t00:x", [(10, {"train/loss": 1.0})])  # controller died, Tune: errored
    paused = _attempt(store, parent, "t01:x", [(10, {"train/loss": 2.0})])  # interrupted: resumable
    done = _attempt(store, parent, "t02:x", [(10, {"train/loss": 2.0})], status="FINISHED")
    store.settle_trial(parent, "t02:x", {"sweep.trial_id": "t02"}, failed=False)
    grid = [SimpleNamespace(config={"trial": trials[0]}, metrics={}, error=RuntimeError("controller gone")),
            SimpleNamespace(config={"trial": trials[1]}, metrics={"step": 10}, error=None)]
    errors = trial_errors(grid)
    assert errors == {"t00": "RuntimeError: controller gone"}
    settle_failed_trials(store, ctx, trials, {"t00": "FAILED", "t01": "UNFINISHED", "t02": "FINISHED"}, errors)
    failed = store.get(lost)
    assert failed.status == "FAILED" and failed.tags["sweep.error"] == "RuntimeError: controller gone"
    assert failed.tags["sweep.trial_id"] == "t00" and failed.tags["sweep.attempts"] == "1"
    assert store.get(paused).status == "RUNNING" and store.get(done).status == "FINISHED"
