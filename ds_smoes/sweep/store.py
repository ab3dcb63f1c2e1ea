"""The sweep's side of MLflow: the parent run, its children, and the queries the report needs.

Like `ds_smoes.app.tracking` (which logs one training run), this is a thin layer: the only sweep
module that imports mlflow.  Runs come back as plain `RunRecord`s so the report is pure Python.

A trial's child run is created by its rank-0 worker (`run_training`'s Tracker, nested with the
`mlflow.parentRunId` tag).  When Ray Train restarts a crashed worker group, or a sweep resumes,
the trial starts again from its checkpoint and its new attempt opens a new run; `settle_trial`
then folds the earlier attempts' metric history into the last run and deletes them, so each
trial keeps exactly one child run.
"""
from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRIAL_TAG = "sweep.trial_id"
ROLE_TAG = "sweep.role"
SWEEP_TAG = "sweep.id"


@dataclass
class RunRecord:
    run_id: str
    name: str
    status: str
    start_time: int
    end_time: int | None
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    experiment_id: str = ""


def prepare_tracking_uri(uri: str) -> str:
    """For a SQLite store: create its folder and switch the file to WAL journaling.

    MLflow already waits up to 20 s on a locked database (busy_timeout); in WAL mode readers no
    longer block the writer, so trials logging at the same time as the driver reads do not hit
    "database is locked".  The setting is stored in the file, so every process gets it."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(path, timeout=60)
        try:
            con.execute("PRAGMA journal_mode=WAL")
        finally:
            con.close()
    return uri


class SweepStore:
    def __init__(self, tracking_uri: str) -> None:
        import mlflow

        self.tracking_uri = tracking_uri
        self._mlflow = mlflow
        self.client = mlflow.MlflowClient(tracking_uri)

    # -- experiments and the parent run ------------------------------------------------------------
    def experiment_id(self, name: str, create: bool = True) -> str | None:
        """A model-training experiment, as every experiment of the project (`ds_smoes.app.tracking.experiment_id`)."""
        from ds_smoes.app.tracking import experiment_id

        return experiment_id(self.client, name, create)

    def create_parent(self, experiment: str, name: str, tags: dict[str, str], params: dict[str, Any]) -> str:
        run = self.client.create_run(self.experiment_id(experiment), run_name=name,
                                     tags={ROLE_TAG: "parent", **tags})
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    # -- logging -------------------------------------------------------------------------------------
    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i:i + 500])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, str(v)[:5000])

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def log_figure(self, run_id: str, figure, name: str) -> None:
        self.client.log_figure(run_id, figure, name)

    def log_file(self, run_id: str, path: Path) -> None:
        self.client.log_artifact(run_id, str(path))

    # -- queries ---------------------------------------------------------------------------------------
    def get(self, run_id: str) -> RunRecord:
        return _record(self.client.get_run(run_id))

    def experiment_name(self, experiment_id: str) -> str:
        return self.client.get_experiment(experiment_id).name

    def children(self, parent_run_id: str, run_name: str | None = None) -> list[RunRecord]:
        """Active child runs of a parent, oldest first."""
        parent = self.client.get_run(parent_run_id)
        query = f"tags.mlflow.parentRunId = '{parent_run_id}'"
        if run_name is not None:
            query += f" and attributes.run_name = '{_quote(run_name)}'"
        runs = self._search([parent.info.experiment_id], query)
        return sorted(runs, key=lambda r: r.start_time)

    def parents(self, experiment: str | None = None, sweep: str | None = None) -> list[RunRecord]:
        """Sweep parent runs (of one experiment, or of all), newest first; `sweep` matches the sweep id,
        the sweep's name or the run id."""
        if experiment is None:
            exp_ids = [e.experiment_id for e in self.client.search_experiments()]
        else:
            exp_id = self.experiment_id(experiment, create=False)
            exp_ids = [exp_id] if exp_id is not None else []
        if not exp_ids:
            return []
        runs = self._search(exp_ids, f"tags.`{ROLE_TAG}` = 'parent'")
        if sweep:
            runs = [r for r in runs if sweep in (r.tags.get(SWEEP_TAG), r.tags.get("sweep.name"), r.run_id)]
        return sorted(runs, key=lambda r: r.start_time, reverse=True)

    def default_parent(self, experiment: str | None = None) -> RunRecord | None:
        """The sweep a report shows when none is named: the newest one that ended (FINISHED, or FAILED with some
        trial failed), not one still RUNNING, which is running now or was abandoned (a driver killed, a cluster
        that never answered); the newest of all when none ended."""
        parents = self.parents(experiment)
        return next((p for p in parents if p.status != "RUNNING"), parents[0] if parents else None)

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in sorted(self.client.get_metric_history(run_id, key),
                                                  key=lambda m: (m.step, m.timestamp))]

    def _search(self, experiment_ids: list[str], query: str) -> list[RunRecord]:
        out, token = [], None
        while True:
            page = self.client.search_runs(experiment_ids, query, max_results=1000, page_token=token)
            out += [_record(r) for r in page]
            token = page.token
            if not token:
                return out

    # -- trials ----------------------------------------------------------------------------------------
    def finished_trial(self, parent_run_id: str, run_name: str) -> RunRecord | None:
        """The trial's settled, finished child run, if it has one."""
        return next((run for run in self.children(parent_run_id, run_name) if _settled_finished(run)), None)

    def finished_trial_names(self, parent_run_id: str) -> set[str]:
        """Run names of every trial with a settled, finished child run (one query)."""
        return {run.name for run in self.children(parent_run_id) if _settled_finished(run)}

    def record_failed_trial(self, parent_run_id: str, run_name: str, tags: dict[str, str],
                            params: dict[str, Any], error: str) -> str:
        """A child run for a trial that failed before its training run could open one."""
        parent = self.client.get_run(parent_run_id)
        run = self.client.create_run(parent.info.experiment_id, run_name=run_name,
                                     tags={"mlflow.parentRunId": parent_run_id, **tags})
        self.log_params(run.info.run_id, params)
        self._mark_failed(run.info.run_id, error)
        return run.info.run_id

    def settle_trial(self, parent_run_id: str, run_name: str, tags: dict[str, str], failed: bool,
                     error: str | None = None) -> str | None:
        """Leave exactly one child run for the trial: fold earlier attempts into the last one.

        Returns that run's id (None when no attempt opened a run).  The last attempt's run keeps
        its own metrics; for every metric, earlier attempts contribute the points logged before
        the next attempt's first point (the steps it re-trained from the checkpoint replace them).
        """
        attempts = self.children(parent_run_id, run_name)
        if not attempts:
            return None
        final = attempts[-1]
        if len(attempts) > 1:
            self._fold(final.run_id, [a.run_id for a in attempts[:-1]])
        self.set_tags(final.run_id, {**tags, "sweep.attempts": len(attempts)})
        status = self.get(final.run_id).status
        if failed:
            self._mark_failed(final.run_id, error or "failed")
        elif status != "FINISHED":
            self._mark_failed(final.run_id, f"the training run ended with status {status}")
        return final.run_id

    def _fold(self, final_id: str, older_ids: list[str]) -> None:
        from mlflow.entities import Metric

        first: dict[str, int] = {}  # earliest step already present, per metric
        for key in self.get(final_id).metrics:
            hist = self.client.get_metric_history(final_id, key)
            first[key] = min(m.step for m in hist) if hist else 0
        for run_id in reversed(older_ids):  # newest earlier attempt first
            older = self.get(run_id)
            copied: list[Metric] = []
            lowest: dict[str, int] = {}
            for key in older.metrics:
                bound = first.get(key)
                points = [m for m in self.client.get_metric_history(run_id, key) if bound is None or m.step < bound]
                copied += [Metric(key, m.value, m.timestamp, m.step) for m in points]
                if points:
                    lowest[key] = min(m.step for m in points)
            for i in range(0, len(copied), 500):
                self.client.log_batch(final_id, metrics=copied[i:i + 500])
            for key, step in lowest.items():
                first[key] = min(step, first.get(key, step))
            self.client.delete_run(run_id)

    def _mark_failed(self, run_id: str, error: str) -> None:
        self.set_tags(run_id, {"sweep.error": error, "mlflow.note.content": f"Trial failed:\n\n```\n{error}\n```"})
        self.client.set_terminated(run_id, status="FAILED")


def _settled_finished(run: RunRecord) -> bool:
    """`settle_trial` tags a trial's kept run with its attempts; FINISHED means its training ended well."""
    return run.status == "FINISHED" and "sweep.attempts" in run.tags


def _quote(text: str) -> str:
    return text.replace("'", "\\'")


def _record(run) -> RunRecord:
    return RunRecord(run_id=run.info.run_id, name=run.info.run_name or "", status=run.info.status,
                     start_time=run.info.start_time or 0, end_time=run.info.end_time,
                     params=dict(run.data.params), tags=dict(run.data.tags), metrics=dict(run.data.metrics),
                     experiment_id=run.info.experiment_id)
