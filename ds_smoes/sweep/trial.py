"""One sweep trial on Ray: a Tune function trial that builds and fits a Ray Train `TorchTrainer`.

Ray 2.60 runs Ray Train V2, where a trainer is no longer passed to `Tuner`: the Tune trial
(`run_trial`) builds the trainer itself and `TuneReportCallback` forwards what the workers
report to Tune.  Each worker (`train_worker`) is one torch.distributed rank (set up by Ray's
`TorchConfig`: NCCL for GPU workers, `resources.gpus_per_worker` > 0, gloo for CPU ones);
DeepSpeed's `init_distributed` joins that group, and `run_training` trains
with expert parallelism over it, exactly as under the DeepSpeed launcher.

After every epoch each worker saves its DeepSpeed checkpoint shard (rank 0 the dense weights,
every EP rank its experts and optimizer state) and hands it to `ray.train.report`; Ray merges
the shards into one checkpoint folder.  A restarted worker group (FailureConfig) and a resumed
sweep get it back from `ray.train.get_checkpoint()` and continue from its step.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import yaml

from ds_smoes.core.errors import SMoESError
from ds_smoes.sweep.spec import SweepSpec, check_layout, trial_config
from ds_smoes.app.tracking import flatten


PROGRESS_FILE = "progress.json"  # {"step", "epoch"} of a checkpoint, beside DeepSpeed's files


class TrialFailed(RuntimeError):
    """Raised by a trial whose configuration or training failed (Tune records it as ERROR)."""


def trial_fixed_fields(ctx: dict, trial: dict) -> dict[str, Any]:
    """What the sweep decides for every trial: where it logs and writes."""
    return {"tracking.tracking_uri": ctx["tracking_uri"], "tracking.experiment": ctx["experiment"],
            "tracking.run_name": trial["name"], "tracking.enabled": True,
            "run.output_dir": str(Path(ctx["sweep_dir"]) / "trials" / trial["id"])}


def trial_tags(ctx: dict, trial: dict) -> dict[str, str]:
    return {"sweep.id": ctx["sweep_id"], "sweep.name": ctx["sweep_name"], "sweep.trial_id": trial["id"],
            "sweep.trial_index": str(trial["index"])}


def run_trial(config: dict, ctx: dict) -> None:
    """The Tune trial: validate the trial's config, fit a TorchTrainer, settle its MLflow run.

    `config` is Tune's: {"trial": {"index", "id", "name", "values"}}; `ctx` is the sweep's (ids,
    folders, tracking URI, the validated sweep file), passed with `tune.with_parameters`."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from ds_smoes.sweep.store import SweepStore

    trial = config["trial"]
    spec = SweepSpec.model_validate(ctx["spec"])
    store = SweepStore(ctx["tracking_uri"])
    tags = trial_tags(ctx, trial)
    done = store.finished_trial(ctx["parent_run_id"], trial["name"])
    if done is not None:  # it finished after Tune last saved its state (a sweep interrupted just then)
        from ray import tune

        tune.report({k: v for k, v in done.metrics.items() if "/" not in k})
        return
    try:
        cfg = trial_config(spec, trial, trial_fixed_fields(ctx, trial))
        check_layout(cfg, spec.resources.workers_per_trial)
    except SMoESError as err:
        store.record_failed_trial(ctx["parent_run_id"], trial["name"], {**tags, **_raw_tags(spec, trial)},
                                  {**flatten("", spec.overrides), **trial["values"]}, str(err))
        raise TrialFailed(f"{trial['name']}: invalid configuration: {err}") from None

    res = spec.resources
    crash = spec.inject_crash.model_dump() if spec.inject_crash and spec.inject_crash.trial == trial["index"] else None
    hold = (spec.inject_hold.model_dump(mode="json") if spec.inject_hold and spec.inject_hold.trial == trial["index"]
            else None)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": json.loads(cfg.model_dump_json()), "parent_run_id": ctx["parent_run_id"],
                           "crash": crash, "hold": hold, "worker_log": not ctx.get("verbose", False)},
        # no backend named: Ray Train takes NCCL for GPU workers, gloo for CPU ones; DeepSpeed joins that group
        torch_config=TorchConfig(),
        scaling_config=ray.train.ScalingConfig(num_workers=res.workers_per_trial, use_gpu=res.gpus_per_worker > 0,
                                               resources_per_worker={"CPU": res.cpus_per_worker,
                                                                     **({"GPU": res.gpus_per_worker}
                                                                        if res.gpus_per_worker > 0 else {})}),
        run_config=ray.train.RunConfig(
            name=trial["id"], storage_path=str(Path(ctx["sweep_dir"]) / "train"),
            failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()],
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            worker_runtime_env={"env_vars": _accelerator_env(res.gpus_per_worker)}),
    )
    try:
        trainer.fit()
    except Exception as err:  # a worker group that failed more than max_failures times, or a lost controller
        message = f"{type(err).__name__}: {err}"
        if controller_lost(err):
            # Tune is stopping this trial (Ctrl+C on the sweep: `resume` continues it from its checkpoint,
            # so its run stays RUNNING) or the controller's node died; if Tune records the trial as
            # failed, the driver settles its run (`driver.settle_failed_trials`).
            raise TrialFailed(f"{trial['name']}: its Ray Train controller stopped: {message}") from None
        if not store.settle_trial(ctx["parent_run_id"], trial["name"], tags, failed=True, error=message):
            store.record_failed_trial(ctx["parent_run_id"], trial["name"], {**tags, **_raw_tags(spec, trial)},
                                      {**flatten("", spec.overrides), **trial["values"]}, message)
        raise TrialFailed(f"{trial['name']}: training failed: {message}") from None
    run_id = store.settle_trial(ctx["parent_run_id"], trial["name"], tags, failed=False)
    if run_id is None or store.get(run_id).status != "FINISHED":
        raise TrialFailed(f"{trial['name']}: training ended without a finished MLflow run")


def _accelerator_env(gpus_per_worker: float) -> dict[str, str]:
    """DS_ACCELERATOR for the workers: the driver's if set, "cpu" for CPU workers (else DeepSpeed decides)."""
    if "DS_ACCELERATOR" in os.environ:
        return {"DS_ACCELERATOR": os.environ["DS_ACCELERATOR"]}
    return {} if gpus_per_worker > 0 else {"DS_ACCELERATOR": "cpu"}


def controller_lost(err: BaseException) -> bool:
    """True when `TorchTrainer.fit()` raised because the trial's Train controller actor died, not
    because training failed.

    Ray Train reports a failed training (workers that failed more than `max_failures` times, a
    controller that gave up) as a `TrainingFailedError`; a controller actor that is gone surfaces as
    the `RayActorError` of fit's `ray.get`.  That happens when Tune stops the trial (the sweep was
    interrupted: the trial actor exits and its controller with it, while fit is still waiting) and
    when the controller's node dies."""
    from ray.exceptions import RayActorError
    from ray.train import TrainingFailedError

    return isinstance(err, RayActorError) and not isinstance(err, TrainingFailedError)


def train_worker(config: dict) -> None:
    """One Ray Train worker = one rank of the trial's DeepSpeed job."""
    import ray.train

    from ds_smoes.app.session import run_training
    from ds_smoes.parallel.launch import init_distributed
    from ds_smoes.app.config import TrainConfig

    cfg = TrainConfig.model_validate(config["cfg"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    checkpoint = ray.train.get_checkpoint()
    crash = config.get("crash") if checkpoint is None else None  # only the first attempt crashes
    hold = config.get("hold")
    start_step = 0

    def log(*args) -> None:  # rank 0 only; sys.stdout, not print, which Ray Train also copies to its logger
        if rank == 0:
            sys.stdout.write(" ".join(map(str, args)) + "\n")
            sys.stdout.flush()

    def on_epoch(epoch: int, step: int, metrics: dict, engine) -> None:
        # Each rank writes its own shard into its own folder; Ray merges them into one checkpoint.
        with tempfile.TemporaryDirectory(prefix="ds_smoes_ckpt_") as tmp:
            engine.save_checkpoint(tmp, tag=f"epoch{epoch}", client_state={"step": step, "epoch": epoch})
            if rank == 0:
                (Path(tmp) / PROGRESS_FILE).write_text(json.dumps({"step": step, "epoch": epoch}))
            ray.train.report({**_numeric(metrics), "epoch": epoch, "step": step, "resumed_from_step": start_step},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if hold and epoch == hold["after_epoch"]:
            sys.stdout.write(f"inject_hold: waiting after epoch {epoch} while {hold['while_file']} exists\n")
            sys.stdout.flush()
            while Path(hold["while_file"]).exists():
                time.sleep(0.2)
        if crash and epoch == crash["after_epoch"] and rank == crash["rank"]:
            time.sleep(6.0)  # let the controller register the checkpoint first
            sys.stdout.write(f"inject_crash: killing worker rank {rank} after epoch {epoch}\n")
            sys.stdout.flush()
            os._exit(17)

    log_file = Path(cfg.run.output_dir) / f"worker-rank{rank}.log" if config.get("worker_log") else None
    with output_to(log_file), (checkpoint.as_directory() if checkpoint else nullcontext(None)) as ckpt_dir:
        if ckpt_dir:
            start_step = json.loads((Path(ckpt_dir) / PROGRESS_FILE).read_text())["step"]
        sys.stdout.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} rank {rank} (pid {os.getpid()}): "
                         f"{f'resuming from step {start_step}' if ckpt_dir else 'starting'}\n")
        final = run_training(cfg, parent_run_id=config["parent_run_id"], init_distributed=init_distributed, log=log,
                             epoch_callback=on_epoch, resume_from=Path(ckpt_dir) if ckpt_dir else None)
    if rank == 0 and final.get("mlflow_run_id"):
        from ds_smoes.sweep.store import SweepStore

        SweepStore(cfg.tracking.tracking_uri).set_tags(final["mlflow_run_id"], {"sweep.resumed_from_step": start_step})
    ray.train.report({**_numeric(final), "resumed_from_step": start_step, "finished": True})


@contextmanager
def output_to(path: Path | None):
    """This process's stdout and stderr (file descriptors 1 and 2: Python's, DeepSpeed's and torch's C++
    output alike) appended to `path` while the block runs; nothing changes for None.  Each attempt of a
    worker group appends to the same file, so a restarted trial keeps its earlier attempts' output."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1), os.dup2(fd, 2)
        try:
            yield
        except BaseException:  # the worker's error belongs in its log too (Ray records it elsewhere as well)
            traceback.print_exc()
            raise
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


def _numeric(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _raw_tags(spec: SweepSpec, trial: dict) -> dict[str, str]:
    """Tags of a trial whose config did not validate, read from the raw values (defaults if unset)."""
    raw = yaml.safe_load(Path(spec.base_config).read_text()) or {}
    values = {**flatten("", raw), **spec.overrides, **trial["values"]}
    return {"gate": str(values.get("smoes.gate", "smoes")), "score_type": str(values.get("smoes.score_type", "")),
            "num_bins": str(values.get("smoes.num_bins", "")), "seed": str(values.get("run.seed", 0))}
