"""MLflow, in one thin layer.  Only this module (and callers' choice of URI) knows MLflow.

Default store: a SQLite file `mlflow.db` in the working directory, addressed by an absolute
URI so every process (DeepSpeed ranks, Ray workers) talks to the same store.  Open the UI with
`mlflow ui --backend-store-uri sqlite:///ABSOLUTE/PATH/mlflow.db --workers 1` (`make mlflow-ui`).
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any


def default_tracking_uri(directory: Path | None = None) -> str:
    path = (Path(directory) if directory else Path.cwd()).resolve() / "mlflow.db"
    return f"sqlite:///{path}"


# MLflow 3's UI keeps a global mode ("GenAI" or "Model training", the switch at its top left, remembered by the
# browser) and opens every experiment on that mode's first page: in a browser that never chose, GenAI's traces
# overview ("Traces 0, No data available"), whatever the experiment holds.  Checked in headless Chromium against
# MLflow 3.17.2 (ci/mlflow_ui_check.py).  Two things of MLflow's own make the runs table what a user sees:
# - the experiment-kind tag ("custom_model_development", the UI's "Model training"; its kind selector writes the
#   same tag), set on every experiment this project creates;
# - a shared view (the UI's "Share" button stores one as the experiment tag `mlflow.sharedViewState.<key>`,
#   a JSON of the table's state): `HEADLINE_VIEW` holds the headline columns and the sort, and `runs_table_url`
#   opens the runs table in Model-training mode with it (`make mlflow-ui` prints the links).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
SHARED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
HEADLINE_VIEW_KEY = "ds-smoes-headline"
HEADLINE_VIEW_TAG = SHARED_VIEW_TAG_PREFIX + HEADLINE_VIEW_KEY
# The figures a reader compares first (a training run's final metrics), then what tells runs apart.
HEADLINE_METRICS = ("acc_multimodal", "acc_language", "msi", "bytes_per_token", "stock_bytes_per_token",
                    "tokens_per_s", "cross_rank_rate")
HEADLINE_PARAMS = ("smoes.gate", "smoes.score_type", "smoes.num_bins", "smoes.dispatch", "run.seed")


def headline_view() -> dict:
    """The runs table's state behind `HEADLINE_VIEW_KEY`: headline metric and parameter columns, the runs sorted by
    multimodal accuracy (the keys and the column naming, group.`name`, are the UI's own)."""
    return {"selectedColumns": [f"metrics.`{m}`" for m in HEADLINE_METRICS]
                               + [f"params.`{p}`" for p in HEADLINE_PARAMS],
            "orderByKey": f"metrics.`{HEADLINE_METRICS[0]}`", "orderByAsc": False}


def runs_table_url(experiment_id: str, ui: str = "http://127.0.0.1:5000", charts: bool = False) -> str:
    """The UI page of an experiment's runs table (or, `charts`, its chart comparison view) in Model-training mode
    with the headline columns, whatever mode the browser was left in."""
    mode = "&compareRunsMode=CHART" if charts else ""
    return (f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={HEADLINE_VIEW_KEY}{mode}")


def experiment_id(client, name: str, create: bool = True) -> str | None:
    """The id of experiment `name` in `client`'s store, as a model-training experiment.

    Every experiment this project creates goes through here: a new one is created with the experiment-kind tag,
    and an existing one without any kind tag gets it (a kind someone chose in the UI is left alone).  None when
    it does not exist and `create` is False.  Safe when several processes create the same name at once."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        if not create:
            return None
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND,
                                                        HEADLINE_VIEW_TAG: json.dumps(headline_view())})
        except MlflowException:  # another process created it in between
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    view = json.dumps(headline_view())
    if exp.tags.get(HEADLINE_VIEW_TAG) != view:
        client.set_experiment_tag(exp.experiment_id, HEADLINE_VIEW_TAG, view)
    return exp.experiment_id


def flatten(prefix: str, obj: Any, out: dict[str, Any] | None = None) -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and paths become strings."""
    out = {} if out is None else out
    if isinstance(obj, dict):
        for k, v in obj.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = obj if isinstance(obj, (int, float, bool)) or obj is None else str(obj)
    return out


class Tracker:
    """One MLflow run.  `active=False` (non-zero ranks, or tracking disabled) makes every call a no-op."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, active: bool = True,
                 tags: dict[str, str] | None = None, parent_run_id: str | None = None,
                 run_id: str | None = None) -> None:
        """`run_id`: reopen that run (status RUNNING again) instead of creating one, e.g. the parent run of a
        comparison that resumes; a new run when the store no longer has it."""
        self.active = active
        self.run_id: str | None = None
        self.tracking_uri = tracking_uri
        if not active:
            return
        import mlflow  # imported here: ranks that do not log never pay for it

        self._mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        run_tags = dict(tags or {})
        if parent_run_id:
            run_tags["mlflow.parentRunId"] = parent_run_id
        self._client = mlflow.MlflowClient(tracking_uri)
        if run_id is not None:
            from mlflow.exceptions import MlflowException

            try:
                self.experiment_id = self._client.get_run(run_id).info.experiment_id
                self._client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                return
            except MlflowException:   # not in this store (any more): a new run
                pass
        exp_id = experiment_id(self._client, experiment)
        run = self._client.create_run(exp_id, run_name=run_name, tags=run_tags)
        self.run_id = run.info.run_id
        self.experiment_id = exp_id

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))]
        for i in range(0, len(items), 500):
            self._client.log_batch(self.run_id, metrics=items[i:i + 500])

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active:
            for k, v in tags.items():
                self._client.set_tag(self.run_id, k, str(v))

    def log_dict(self, obj: Any, name: str) -> None:
        if not self.active:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(obj, indent=2, default=str) if name.endswith(".json") else str(obj))
            self._client.log_artifact(self.run_id, str(path))

    def log_file(self, path: Path, artifact_path: str | None = None) -> None:
        if self.active and Path(path).exists():
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_figure(self, figure, name: str) -> None:
        if self.active:
            self._client.log_figure(self.run_id, figure, name)

    def close_abandoned(self, run_id: str, reason: str) -> None:
        """End another run of this store that is still RUNNING although its processes are gone: KILLED, with
        `reason` as its end_reason tag; this run is tagged resumed_from_run.  Nothing when it ended already."""
        if not self.active or run_id == self.run_id:
            return
        from mlflow.exceptions import MlflowException

        self._client.set_tag(self.run_id, "resumed_from_run", run_id)
        try:
            if self._client.get_run(run_id).info.status != "RUNNING":
                return
        except MlflowException:   # not in this store
            return
        self._client.set_tag(run_id, "end_reason", reason)
        self._client.set_terminated(run_id, status="KILLED")

    def end(self, status: str = "FINISHED") -> None:
        if self.active and self.run_id:
            self._client.set_terminated(self.run_id, status=status)


def ui_links(tracking_uri: str, ui: str = "http://127.0.0.1:5000") -> list[str]:
    """One line per experiment of the store that holds runs: its name, the runs-table link and the charts link
    (the headline view is (re)written on the experiments this project made)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    lines = []
    for exp in client.search_experiments():
        if exp.name == "Default" and not client.search_runs([exp.experiment_id], max_results=1):
            continue
        if exp.tags.get(EXPERIMENT_KIND_TAG) == MODEL_TRAINING_KIND:
            experiment_id(client, exp.name)   # an older store: add the headline view
        lines.append(f"{exp.name}: {runs_table_url(exp.experiment_id, ui)}\n"
                     f"{' ' * len(exp.name)}  charts: {runs_table_url(exp.experiment_id, ui, charts=True)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """`python -m ds_smoes.app.tracking --tracking-uri URI [--ui URL]`: the UI links of every experiment."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m ds_smoes.app.tracking",
                                description="print the MLflow UI links that open each experiment's runs table "
                                            "with the headline columns")
    p.add_argument("--tracking-uri", default=default_tracking_uri())
    p.add_argument("--ui", default="http://127.0.0.1:5000", help="where `mlflow ui` listens")
    args = p.parse_args(argv)
    lines = ui_links(args.tracking_uri, args.ui)
    print("\n".join(lines) if lines else f"no experiment in {args.tracking_uri} yet: run `make demo` first")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
