"""The sweep driver: Ray Tune over the trials of a sweep file, one MLflow parent run over them.

    start:  validate the sweep file, create the MLflow parent run, write `state.json`, fit a Tuner
    resume: read `state.json`, reopen the parent run, `Tuner.restore` (finished trials are kept)
    end:    read the children back from MLflow, log the comparison table and plots to the parent

Ray: a local Ray started in this process unless `--address` or RAY_ADDRESS names a cluster (a
`ray job submit` job always has RAY_ADDRESS).  Files: the sweep's folder `STORAGE/SWEEP_ID` holds
Tune's experiment state, `state.json`, Ray Train's checkpoints (`train/tNN`) and each trial's
output folder (`trials/tNN`); on a multi-node cluster STORAGE must be shared storage.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ds_smoes.core.errors import ConfigError
from ds_smoes.sweep.common import default_storage, resolve_tracking_uri
from ds_smoes.sweep.spec import SweepSpec, load_sweep, precheck, trial_config

STATE_FILE = "state.json"


@dataclass
class SweepOutcome:
    sweep_id: str
    sweep_dir: Path
    parent_run_id: str
    tracking_uri: str
    finished: int
    failed: int
    unfinished: int
    table_markdown: str
    wall_seconds: float

    @property
    def exit_code(self) -> int:
        return 130 if self.unfinished else (1 if self.failed else 0)


def probe_address(address: str, timeout: float = 10.0) -> None:
    """ConfigError within `timeout` seconds when nothing accepts a TCP connection at a `host:port` or
    `ray://host:port` address (ray.init itself retries an unreachable head for minutes).  Other forms (`auto`,
    `local`) are Ray's to resolve."""
    import socket

    scheme, _, target = address.rpartition("://")
    if scheme not in ("", "ray"):
        return
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ConfigError(f"cannot reach a Ray cluster at {address!r} (--address / RAY_ADDRESS): {err}. Start one "
                          f"there (ray start --head --port {port}), give the address `ray start` printed, or leave "
                          "--address out for a local Ray; nothing was started or written") from None


def init_ray(address: str | None, local_cpus: int, log: Callable, verbose: bool = False) -> None:
    """Start or join Ray.  Unless `verbose`, the workers' output stays out of this console
    (`log_to_driver=False`: each trial's workers write theirs to trials/tNN/worker-rankR.log, Ray's
    own processes to the files under its session's logs folder, printed here once)."""
    import ray

    if ray.is_initialized():
        return
    quiet = {} if verbose else {"logging_level": logging.WARNING}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log(f"ray: connecting to {address}")
        probe_address(address)
        try:
            ray.init(address=address, log_to_driver=verbose, **quiet)
        except ConnectionError as err:
            raise ConfigError(f"cannot reach a Ray cluster at {address!r} (--address / RAY_ADDRESS): {err}") from None
        _log_ray_logs(log)
        return
    # Logical CPUs: every trial needs one for its Tune trial plus one per worker, and the workers
    # share the physical cores; too few logical CPUs and the worker group never starts.
    package_root = str(Path(__file__).resolve().parents[2])
    pythonpath = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    log(f"ray: starting a local Ray in this process ({local_cpus} logical CPUs on {os.cpu_count()} cores)")
    # address="local": a new Ray, always.  With no address, ray.init connects to the cluster that the last
    # `ray start` on this machine recorded in /tmp/ray/ray_current_cluster, even when that head has since
    # been stopped by a signal (the file stays): the sweep then failed to start.
    ray.init(address="local", num_cpus=local_cpus, log_to_driver=verbose,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **quiet)
    _log_ray_logs(log)


def _log_ray_logs(log: Callable) -> None:
    """Print where this node's Ray writes its logs (its session folder's logs/; Ray Train's under logs/train)."""
    try:
        import ray._private.worker as ray_worker  # Ray has no public call for the session folder

        log(f"Ray logs: {ray_worker._global_node.get_logs_dir_path()}")
    except Exception:  # noqa: BLE001  (only a hint: a Ray without this private API still runs the sweep)
        pass


def tune_run_config(verbose: bool, callback) -> dict:
    """The RunConfig fields that decide the console: our progress lines always, Tune's own reporter
    only if `verbose`.  Ray 2.60's default ("new") output prints its experiment table and a TensorBoard
    hint even at verbose=0; its older output, chosen by RAY_AIR_NEW_OUTPUT=0, prints nothing at verbose=0.
    TUNE_PRINT_ALL_TRIAL_ERRORS=0: a failed trial's traceback stays in its files (the workers' logs and
    Tune's tNN/error.txt in the sweep folder), its reason on its console line.  `fit` reads both in this
    process."""
    if not verbose:
        os.environ.update(RAY_AIR_NEW_OUTPUT="0", TUNE_PRINT_ALL_TRIAL_ERRORS="0")
        tune_logger = logging.getLogger("ray.tune.tune")
        if not any(isinstance(f, _NoTunerRestoreHint) for f in tune_logger.filters):
            tune_logger.addFilter(_NoTunerRestoreHint())
    return {"verbose": 1 if verbose else 0, "callbacks": [callback]}


class _NoTunerRestoreHint(logging.Filter):
    """Drops Tune's "Experiment has been interrupted ... Resume experiment with: Tuner.restore(...)" after
    Ctrl+C: the sweep prints its own `resume` command with its summary."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Experiment has been interrupted")


def local_cpus_for(spec: SweepSpec) -> int:
    r = spec.resources
    need = r.max_concurrent_trials * (1 + r.workers_per_trial * r.cpus_per_worker) + 1
    return r.local_cpus or max(8, int(need + 0.999))


def _trial_dirname(trial) -> str:
    return trial.config["trial"]["id"]


def _trial_name(trial) -> str:
    return trial.config["trial"]["name"]


def start_sweep(sweep_file: Path, overrides: list[str] | None = None, address: str | None = None,
                storage: Path | None = None, tracking_uri: str | None = None, max_concurrent: int | None = None,
                log: Callable = print, verbose: bool = False) -> SweepOutcome:
    from ds_smoes.sweep.store import SweepStore, prepare_tracking_uri
    from ds_smoes.app.config import load_train_config

    t0 = time.time()
    spec = load_sweep(sweep_file, overrides)
    if max_concurrent is not None:
        if max_concurrent < 1:
            raise ConfigError(f"--max-concurrent-trials {max_concurrent}: give 1 or more")
        spec = spec.model_copy(update={"resources": spec.resources.model_copy(
            update={"max_concurrent_trials": max_concurrent})})
    trials = spec.expand()
    bad = precheck(spec, trials)
    if bad:   # nothing has started yet: no Ray, no MLflow run, no files
        lines = [f"{sweep_file}: {len(bad)} of {len(trials)} trials do not validate, so the sweep was not started:"]
        for t in trials:
            if t["id"] in bad:
                lines += [f"  {t['name']}:"] + [f"    {l.strip()}" for l in bad[t["id"]].splitlines()[1:] or
                                                 bad[t["id"]].splitlines()]
        raise ConfigError("\n".join(lines) + "\nfix those values in the sweep file (grid, trials or overrides) or "
                          "the --set that gave them")
    init_ray(address, local_cpus_for(spec), log, verbose)   # an unreachable cluster: before any run or file
    sweep_id = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = Path(storage or default_storage()).resolve()
    sweep_dir = storage / sweep_id
    if sweep_dir.exists():
        raise ConfigError(f"{sweep_dir} already exists; wait a second and start again")
    uri = prepare_tracking_uri(resolve_tracking_uri(tracking_uri))
    experiment = spec.experiment or load_train_config(spec.base_config).tracking.experiment

    log(f"sweep {sweep_id}: {len(trials)} trials over {', '.join(spec.axes)}")
    for t in trials:
        log(f"  {t['name']}")
    _prepare_data(spec, trials, log)

    store = SweepStore(uri)
    params = {"sweep.axes": json.dumps(spec.axes), "sweep.num_trials": len(trials),
              "sweep.base_config": str(spec.base_config), "sweep.overrides": json.dumps(spec.overrides),
              "sweep.workers_per_trial": spec.resources.workers_per_trial,
              "sweep.max_concurrent_trials": spec.resources.max_concurrent_trials,
              "sweep.max_failures": spec.max_failures,
              **{f"grid.{k}": json.dumps(v) for k, v in spec.grid.items()}}
    parent = store.create_parent(experiment, sweep_id, tags={"sweep.id": sweep_id, "sweep.name": spec.name,
                                                             "sweep.file": str(Path(sweep_file).resolve())},
                                 params=params)
    store.log_text(parent, Path(sweep_file).read_text(), "sweep.yaml")
    store.log_text(parent, json.dumps(trials, indent=2), "trials.json")
    ctx = {"sweep_id": sweep_id, "sweep_name": spec.name, "sweep_dir": str(sweep_dir), "tracking_uri": uri,
           "experiment": experiment, "parent_run_id": parent, "spec": json.loads(spec.model_dump_json())}
    sweep_dir.mkdir(parents=True)
    (sweep_dir / STATE_FILE).write_text(json.dumps({**ctx, "trials": trials, "created": time.time()}, indent=2))
    log(f"mlflow: parent run {parent} in experiment {experiment!r} at {uri}")
    log(f"files: {sweep_dir}")

    from ray import tune

    from ds_smoes.sweep.progress import SweepProgress, progress_callback

    progress = SweepProgress(len(trials), spec.resources.max_concurrent_trials)
    tuner = tune.Tuner(
        trainable({**ctx, "verbose": verbose}),
        param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(max_concurrent_trials=spec.resources.max_concurrent_trials,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name=sweep_id, storage_path=str(storage),
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  **tune_run_config(verbose, progress_callback(progress, log))))
    grid = tuner.fit()
    return _conclude(store, ctx, trials, grid, t0, log)


def resume_sweep(sweep: str, address: str | None = None, storage: Path | None = None,
                 log: Callable = print, verbose: bool = False) -> SweepOutcome:
    """Continue an interrupted sweep: trials that finished (or failed) are not run again."""
    from ds_smoes.sweep.store import SweepStore

    t0 = time.time()
    sweep_dir = Path(sweep) if Path(sweep).is_dir() else Path(storage or default_storage()).resolve() / sweep
    state_path = sweep_dir / STATE_FILE
    if not state_path.is_file():
        raise ConfigError(f"no sweep at {sweep_dir} ({STATE_FILE} missing): give the sweep id printed when it "
                          f"started, with --storage-path if it was not the default")
    state = json.loads(state_path.read_text())
    ctx = {k: state[k] for k in ("sweep_id", "sweep_name", "sweep_dir", "tracking_uri", "experiment",
                                 "parent_run_id", "spec")}
    spec = SweepSpec.model_validate(state["spec"])
    init_ray(address, local_cpus_for(spec), log, verbose)   # an unreachable cluster: before the parent reopens
    store = SweepStore(ctx["tracking_uri"])
    store.reopen(ctx["parent_run_id"])
    log(f"sweep {ctx['sweep_id']}: resuming ({len(state['trials'])} trials); MLflow parent run "
        f"{ctx['parent_run_id']} at {ctx['tracking_uri']}")
    from ray import tune

    from ds_smoes.sweep.progress import SweepProgress, progress_callback

    tuner = tune.Tuner.restore(str(sweep_dir), trainable=trainable({**ctx, "verbose": verbose}),
                               resume_unfinished=True, resume_errored=False, restart_errored=False)
    # The restored RunConfig is the first session's, callbacks included: this session's console replaces
    # them (Tuner.restore takes no RunConfig; its internal tuner's is the one fit() uses).  Through a Ray
    # client (ray://) there is no local tuner, and the first session's console stays.
    local = getattr(tuner, "_local_tuner", None)
    if local is not None:
        progress = SweepProgress(len(state["trials"]), spec.resources.max_concurrent_trials)
        run_config = local.get_run_config()
        for name, value in tune_run_config(verbose, progress_callback(progress, log, resumed=True)).items():
            setattr(run_config, name, value)
    grid = tuner.fit()
    return _conclude(store, ctx, state["trials"], grid, t0, log)


def trainable(ctx: dict):
    """The Tune trainable: `run_trial` with the sweep's context; one logical CPU per Tune trial."""
    from ray import tune

    from ds_smoes.sweep.trial import run_trial

    return tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), {"cpu": 1})


def _prepare_data(spec: SweepSpec, trials: list[dict], log: Callable) -> None:
    """Generate the digits data once here, not in concurrent trials racing to write one folder."""
    from ds_smoes.data import generate_digits_dataset

    done = set()
    for t in trials:
        d = trial_config(spec, t).data
        if d.generate_digits and not Path(d.train_json).exists() and d.image_folder not in done:
            log(f"generating the digits dataset (seed {d.digits_seed}) into {d.image_folder} ...")
            generate_digits_dataset(Path(d.image_folder), seed=d.digits_seed, canvas_size=d.canvas_size)
            done.add(d.image_folder)


def trial_states(grid, trials: list[dict], settled: set[str] = frozenset()) -> dict[str, str]:
    """{trial id: FINISHED | FAILED | UNFINISHED}, from Tune's results and MLflow.

    `settled` holds the ids of trials whose MLflow child run is settled and FINISHED; `run_trial`
    settles a run only after its training finished, so that is proof on its own.  Tune's `done`
    alone is not: Ray 2.60 marks a function trial done by editing its last result in place, and
    an experiment state saved between the trial's last report and that edit is restored
    without `done` (the trial reads TERMINATED yet not done after `resume`)."""
    states = {t["id"]: "UNFINISHED" for t in trials}
    for result in grid:
        tid = (result.config or {}).get("trial", {}).get("id")
        if tid is None:
            continue
        if result.error is not None:
            states[tid] = "FAILED"
        elif (result.metrics or {}).get("done"):
            states[tid] = "FINISHED"
    for tid in settled:
        if states.get(tid) == "UNFINISHED":
            states[tid] = "FINISHED"
    return states


def settled_trials(store, parent_run_id: str, trials: list[dict]) -> set[str]:
    """Ids of the trials whose MLflow child run is settled and FINISHED."""
    names = store.finished_trial_names(parent_run_id)
    return {t["id"] for t in trials if t["name"] in names}


def trial_errors(grid) -> dict[str, str]:
    """{trial id: Tune's error message} for the trials Tune recorded as errored."""
    return {result.config["trial"]["id"]: f"{type(result.error).__name__}: {result.error}"
            for result in grid if result.error is not None and "trial" in (result.config or {})}


def settle_failed_trials(store, ctx: dict, trials: list[dict], states: dict[str, str],
                         errors: dict[str, str]) -> None:
    """Mark FAILED the MLflow run of every failed trial that is still RUNNING.

    A trial settles its own run when training fails; one whose Train controller died under it
    (`trial.controller_lost`) leaves the run open, because that is also how an interrupted trial
    ends.  If Tune then recorded the trial as errored, nobody else will close the run."""
    from ds_smoes.sweep.trial import trial_tags

    for t in trials:
        if states.get(t["id"]) != "FAILED":
            continue
        runs = store.children(ctx["parent_run_id"], t["name"])
        if runs and runs[-1].status == "RUNNING":
            store.settle_trial(ctx["parent_run_id"], t["name"], trial_tags(ctx, t), failed=True,
                               error=errors.get(t["id"], "Tune recorded the trial as failed"))


def _conclude(store, ctx: dict, trials: list[dict], grid, t0: float, log: Callable) -> SweepOutcome:
    from ds_smoes.sweep import report

    parent = ctx["parent_run_id"]
    states = trial_states(grid, trials, settled_trials(store, parent, trials))
    settle_failed_trials(store, ctx, trials, states, trial_errors(grid))
    finished = sum(s == "FINISHED" for s in states.values())
    failed = sum(s == "FAILED" for s in states.values())
    unfinished = len(trials) - finished - failed
    rows = report.collect(store, parent)
    table = report.trial_table(rows)
    summary = report.seed_table(rows)
    report.log_to_parent(store, parent, rows)
    wall = time.time() - t0
    store.log_metrics(parent, {"trials_finished": finished, "trials_failed": failed,
                               "trials_unfinished": unfinished, "wall_seconds": wall})
    log("")
    log(f"== sweep {ctx['sweep_id']}: {finished} finished, {failed} failed"
        + (f", {unfinished} not run (interrupted)" if unfinished else "") + f"  ({wall / 60:.1f} min this session)")
    log(table)
    log("")
    log("mean and spread over seeds:")
    log(summary)
    if unfinished:
        store.finish(parent, "KILLED")
        log(f"\nresume with: python ray_jobs/sweep.py resume {ctx['sweep_id']} "
            f"--storage-path {Path(ctx['sweep_dir']).parent}")
    else:
        store.finish(parent, "FINISHED" if finished else "FAILED")
    log(f"\nMLflow: parent run {parent}, experiment {ctx['experiment']!r}; open the UI with\n"
        f"  mlflow ui --backend-store-uri {ctx['tracking_uri']} --host 127.0.0.1 --port 5000 --workers 1")
    return SweepOutcome(ctx["sweep_id"], Path(ctx["sweep_dir"]), parent, ctx["tracking_uri"], finished, failed,
                        unfinished, table, wall)
