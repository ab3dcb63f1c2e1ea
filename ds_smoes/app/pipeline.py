"""The MoE-LLaVA recipe as one command (docs/recipe.md): stage 0 (the vision encoder), the language model, stage I
(projector alignment), stage II (dense tuning), stage III (the MoE upcycled from the dense model), each stage
starting from the previous one's output.

Every stage writes OUT_DIR/seedS/<stage>/ with a `stage.json` (the stage's settings, fingerprinted together with
the stages it starts from) and, once finished, `metrics.json`.  A run of the pipeline

- skips a finished stage whose settings are the ones asked for (so a comparison over gates trains stages 0-II
  once per seed: only `moe-<variant>` differs), and refuses one finished under other settings, naming them;
- resumes an interrupted stage: a training stage from its last epoch checkpoint (`run.checkpoint_every_epoch`),
  stage 0 from its state file; an interrupted stage whose settings changed starts afresh;
- records an MLflow parent run with one child per stage (a reused stage's child says where it came from).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ds_smoes.app.pipeline_config import STAGES, PipelineConfig, variant_settings
from ds_smoes.core.errors import ConfigError, SMoESError
from ds_smoes.parallel.launch import free_port

STAGE_FILE = "stage.json"
METRICS_FILE = "metrics.json"


class StageFailed(SMoESError):
    """A stage's process exited with an error (the message names its log)."""


FINGERPRINT_FORMAT = 2


def _digest(tree: dict) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:16]


def without_defaults(value, default):
    """`value` (a JSON tree) without the entries equal to `default`'s at the same place: a setting a later version
    adds, at its default, leaves a stage's fingerprint as it was."""
    if not (isinstance(value, dict) and isinstance(default, dict)):
        return value
    return {k: without_defaults(v, default[k]) if k in default else v for k, v in value.items()
            if k not in default or v != default[k]}


@dataclass(frozen=True)
class Stage:
    name: str
    directory: Path
    settings: dict          # what defines the stage's result, upstream fingerprint included
    overrides: list[str]    # the training run's --set items (empty for stage 0)
    defaults: dict          # the settings' defaults, where they have one (left out of the fingerprint)
    legacy_upstream: str | None = None

    @property
    def fingerprint(self) -> str:
        """Of the settings that differ from their defaults (and the stage before's fingerprint)."""
        return _digest(without_defaults(self.settings, self.defaults))

    @property
    def legacy_fingerprint(self) -> str:
        """How stage.json files without a format (the pipeline's first version) fingerprinted: every setting."""
        return _digest({**self.settings, **({"upstream": self.legacy_upstream} if self.legacy_upstream else {})})


def stage_dirs(cfg: PipelineConfig) -> dict[str, Path]:
    """OUT/seedS/<stage>, and <stage>-<variant> for the stages the variant changes (from `variant_settings`'s
    first stage on): `moe-topk` for a gate, `align-qmop-0.25` ... `moe-qmop-0.25` for a compression setting."""
    root = Path(cfg.out_dir) / f"seed{cfg.seed}"
    first = STAGES.index(variant_settings(cfg.variant)[0])
    return {s: root / (f"{s}-{cfg.variant}" if i >= first else s) for i, s in enumerate(STAGES)}


def stage_overrides(cfg: PipelineConfig, stage: str, dirs: dict[str, Path]) -> list[str]:
    """The `--set` items of a training stage: what the stage trains, on what, from where; then its epochs,
    learning rate and own `set` items (last, so they win)."""
    from ds_smoes.data.tasks import CAPTION_TASK, LANGUAGE_ONLY

    first, variant = variant_settings(cfg.variant)
    changed = STAGES.index(stage) >= STAGES.index(first)

    frozen = str(cfg.freeze_vision).lower()
    own = {
        "language": ["model.moe_layers=none", f"data.tasks=[{LANGUAGE_ONLY}]",
                     f"model.vision_checkpoint={dirs['vision'] / 'encoder.pt'}", "model.freeze_vision=true",
                     "model.freeze_projector=true"],
        "align": ["model.moe_layers=none", f"data.tasks=[{CAPTION_TASK}]", f"model.start_from={dirs['language']}",
                  "model.freeze_vision=true", "model.freeze_decoder=true"],
        "dense": ["model.moe_layers=none", f"model.start_from={dirs['align']}", f"model.freeze_vision={frozen}"],
        "moe": [f"model.start_from={dirs['dense']}", f"model.freeze_vision={frozen}"],
    }[stage] + (variant if changed else [])
    if changed and first == "align":   # a compression setting: random pruning's draws follow the seed
        own.append(f"model.compress.seed={cfg.seed}")
    st = getattr(cfg, stage)
    return [*own, f"run.seed={cfg.seed}", f"run.output_dir={dirs[stage]}", "run.save_checkpoint=true",
            "run.checkpoint_every_epoch=true", f"optim.epochs={st.epochs}",
            *([f"optim.lr={st.lr}"] if st.lr is not None else []), *st.set]


def plan(cfg: PipelineConfig) -> list[Stage]:
    """Every stage with its settings, validated (a bad override fails here, before anything runs)."""
    from ds_smoes.app.config import load_train_config

    dirs = stage_dirs(cfg)
    base = load_train_config(cfg.train_config)
    if base.data.canvas_size is None:
        raise ConfigError(f"{cfg.train_config}: the recipe pretrains its encoder on the canvas digits: set "
                          "data.canvas_size (configs/canvas.yaml does)")
    from ds_smoes.app.config import DataConfig, TrainConfig
    from ds_smoes.app.pipeline_config import VisionStage
    from ds_smoes.model.config import ModelConfig

    vision_settings = {"stage": "vision", **cfg.vision.model_dump(), "seed": cfg.seed,
                       "model": base.model.model_dump(mode="json"), "data": base.data.model_dump(mode="json")}
    vision_defaults = {**VisionStage().model_dump(), "model": ModelConfig().model_dump(mode="json"),
                       "data": DataConfig().model_dump(mode="json")}
    train_defaults = {k: v for k, v in TrainConfig().model_dump(mode="json").items() if k != "tracking"}
    stages = [Stage("vision", dirs["vision"], vision_settings, [], vision_defaults)]
    for name in STAGES[1:]:
        overrides = stage_overrides(cfg, name, dirs)
        train = load_train_config(cfg.train_config, overrides, origin=f"the pipeline's {name} stage")
        if name == "moe" and train.model.moe_layers == "none":
            raise ConfigError(f"{cfg.train_config} has model.moe_layers: none: stage III needs MoE blocks to upcycle "
                              "into (every_other or all)")
        settings = {"stage": name, "ranks": cfg.ranks, "upstream": stages[-1].fingerprint,
                    **{k: v for k, v in train.model_dump(mode="json").items() if k != "tracking"}}
        stages.append(Stage(name, dirs[name], settings, overrides, train_defaults,
                            legacy_upstream=stages[-1].legacy_fingerprint))
    return stages


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def stage_state(stage: Stage) -> str:
    """'done' (finished with these settings), 'resume' (interrupted with these settings), 'fresh' (nothing, or an
    interrupted run under other settings, which is removed).  ConfigError for a finished stage with other
    settings: its result is not what was asked for, and the stages after it were built on it."""
    record = stage.directory / STAGE_FILE
    if not record.is_file():
        return "fresh"
    saved = json.loads(record.read_text())
    expected = stage.fingerprint if saved.get("format") == FINGERPRINT_FORMAT else stage.legacy_fingerprint
    same = saved.get("fingerprint") == expected
    if (stage.directory / METRICS_FILE).is_file():
        if same:
            return "done"
        changed = _differences(saved.get("settings", {}), stage.settings)
        raise ConfigError(f"the {stage.name} stage in {stage.directory} finished under other settings ("
                          + "; ".join(changed[:6]) + (" ..." if len(changed) > 6 else "")
                          + "): remove that folder (and the stages after it) or give another out_dir")
    if same:
        return "resume"
    shutil.rmtree(stage.directory)
    return "fresh"


def _stream(cmd: list[str], log_path: Path, prefix: str, echo: Callable[[str], None]) -> int:
    """Run `cmd`, every output line to `log_path` and, prefixed, to `echo`; its exit status."""
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})   # progress lines as they come
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                echo(f"{prefix}{line.rstrip()}")
            return proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise


class Pipeline:
    """Runs the stages of `cfg` in order (see the module's text); `tracking_uri` None: no MLflow."""

    def __init__(self, cfg: PipelineConfig, tracking_uri: str | None, experiment: str,
                 echo: Callable[[str], None] = print, parent_run_id: str | None = None) -> None:
        """`parent_run_id`: nest this pipeline's MLflow run under that one (a comparison's)."""
        self.cfg, self.tracking_uri, self.experiment, self.echo = cfg, tracking_uri, experiment, echo
        self.parent_run_id = parent_run_id
        self.stages = plan(cfg)
        self.report: dict[str, dict] = {}

    def run(self) -> dict:
        """Every stage, then the summary (also OUT_DIR/seedS/pipeline-<variant>.json); the stages' report."""
        from ds_smoes.app.tracking import Tracker

        cfg = self.cfg
        parent = Tracker(self.tracking_uri or "", self.experiment, f"recipe-seed{cfg.seed}-{cfg.variant}",
                         active=self.tracking_uri is not None,
                         tags={"kind": "recipe", "seed": str(cfg.seed), "variant": cfg.variant},
                         parent_run_id=self.parent_run_id)
        parent.log_params({"seed": cfg.seed, "variant": cfg.variant, "freeze_vision": cfg.freeze_vision,
                           "train_config": str(cfg.train_config), "out_dir": str(cfg.out_dir),
                           **{f"{s}.epochs": getattr(cfg, s).epochs for s in STAGES}})
        self.parent = parent
        status = "FAILED"
        try:
            for stage in self.stages:
                self._run_stage(stage)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self._close(parent, status)
        return self.report

    # -- one stage -------------------------------------------------------------------------------------------
    def _run_stage(self, stage: Stage) -> None:
        state = stage_state(stage)
        t0 = time.time()
        if state == "done":
            metrics = json.loads((stage.directory / METRICS_FILE).read_text())
            self.echo(f"== {stage.name}: finished before, reused ({stage.directory})")
            self._child_run(stage, metrics, reused=True)
            self.report[stage.name] = {"status": "reused", "seconds": _stage_seconds(metrics), "metrics": metrics}
            return
        stage.directory.mkdir(parents=True, exist_ok=True)
        (stage.directory / STAGE_FILE).write_text(json.dumps(
            {"stage": stage.name, "format": FINGERPRINT_FORMAT, "fingerprint": stage.fingerprint,
             "settings": stage.settings}, indent=1,
            default=str))
        self.echo(f"== {stage.name}: {'resuming' if state == 'resume' else 'starting'} in {stage.directory} "
                  f"(log: {stage.directory / 'train.log'})")
        if stage.name == "vision":
            metrics = self._vision(stage)
            self._child_run(stage, metrics, reused=False)
        else:
            metrics = self._train(stage, resume=state == "resume")
            self._tag_child(metrics.get("mlflow_run_id"), stage)
        seconds = time.time() - t0
        self.report[stage.name] = {"status": "resumed" if state == "resume" else "ran", "seconds": seconds,
                                   "metrics": metrics}
        self.echo(f"== {stage.name}: done in {seconds:.0f}s: {_headline(stage.name, metrics)}")

    def _vision(self, stage: Stage) -> dict:
        """Stage 0 in its own process (`python -m ds_smoes.pretrain_vision`): on a GPU it holds no CUDA memory
        the training stages after it need; it continues from its state file when one is there."""
        v = self.cfg.vision
        cmd = [sys.executable, "-m", "ds_smoes.pretrain_vision", "--config", str(self.cfg.train_config),
               "--set", f"run.seed={self.cfg.seed}", "--seed", str(self.cfg.seed), "--epochs", str(v.epochs),
               "--batch-size", str(v.batch_size), "--lr", str(v.lr), "--out", str(stage.directory)]
        return self._finish(stage, _stream(cmd, stage.directory / "train.log", "[vision] ", self.echo))

    def _train(self, stage: Stage, resume: bool) -> dict:
        cfg = self.cfg
        launcher = str(Path(sys.executable).parent / "deepspeed")
        cmd = [launcher, "--num_gpus", str(cfg.ranks), "--master_port", str(free_port()), "--module",
               "ds_smoes.train", "--config", str(cfg.train_config), "--run-name", f"{stage.name}-seed{cfg.seed}"]
        if self.tracking_uri is None:
            cmd.append("--no-mlflow")
        else:
            cmd += ["--tracking-uri", self.tracking_uri, "--experiment", self.experiment,
                    "--parent-run-id", self.parent.run_id]
        checkpoint = stage.directory / "checkpoint"
        if resume and (checkpoint / "latest").is_file():
            cmd += ["--resume-from", str(checkpoint)]
        for item in stage.overrides:
            cmd += ["--set", item]
        return self._finish(stage, _stream(cmd, stage.directory / "train.log", f"[{stage.name}] ", self.echo))

    @staticmethod
    def _finish(stage: Stage, rc: int) -> dict:
        """The stage's metrics.json; StageFailed when its process failed or wrote none."""
        metrics_path = stage.directory / METRICS_FILE
        if rc != 0 or not metrics_path.is_file():
            raise StageFailed(f"the {stage.name} stage failed (exit status {rc}); its log: "
                              f"{stage.directory / 'train.log'}. Run the same command again to resume it")
        return json.loads(metrics_path.read_text())

    # -- MLflow ----------------------------------------------------------------------------------------------
    def _child_run(self, stage: Stage, metrics: dict, reused: bool) -> None:
        """A child of the parent run for stage 0 (which logs nowhere itself) or for a reused stage."""
        from ds_smoes.app.tracking import Tracker

        if self.tracking_uri is None:
            return
        child = Tracker(self.tracking_uri, self.experiment, f"{stage.name}-seed{self.cfg.seed}",
                        tags={"stage": stage.name, "reused": str(reused).lower(), "stage_dir": str(stage.directory),
                              **({"reused_run_id": metrics["mlflow_run_id"]} if metrics.get("mlflow_run_id") else {})},
                        parent_run_id=self.parent.run_id)
        child.log_params({"fingerprint": stage.fingerprint})
        child.log_metrics(_numeric(metrics))
        child.end("FINISHED")

    def _tag_child(self, run_id: str | None, stage: Stage) -> None:
        if self.tracking_uri is None or not run_id:
            return
        import mlflow

        client = mlflow.MlflowClient(self.tracking_uri)
        for k, v in {"stage": stage.name, "reused": "false", "stage_dir": str(stage.directory)}.items():
            client.set_tag(run_id, k, v)

    def _close(self, parent, status: str) -> None:
        cfg = self.cfg
        summary = {"seed": cfg.seed, "variant": cfg.variant, "status": status,
                   "stages": {k: {"status": v["status"], "seconds": v["seconds"], "headline": _headline(k, v["metrics"])}
                              for k, v in self.report.items()}}
        final = self.report.get("moe", {}).get("metrics")
        if final:
            summary["final"] = {k: final.get(k) for k in ("acc_multimodal", "acc_language", "acc_by_task", "msi",
                                                          "bytes_per_token", "stock_bytes_per_token")}
        root = Path(cfg.out_dir) / f"seed{cfg.seed}"
        root.mkdir(parents=True, exist_ok=True)
        (root / f"pipeline-{cfg.variant}.json").write_text(json.dumps(summary, indent=1, default=str))
        parent.log_metrics({f"seconds/{k}": v["seconds"] for k, v in self.report.items() if v["seconds"] is not None})
        if final:
            parent.log_metrics(_numeric(final))
            parent.log_metrics({f"acc_task/{t}": a for t, a in (final.get("acc_by_task") or {}).items()})
        parent.log_dict(summary, "pipeline.json")
        parent.end(status)
        self.summary = summary


def _numeric(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _stage_seconds(metrics: dict) -> float | None:
    value = metrics.get("wall_seconds", metrics.get("seconds"))
    return float(value) if isinstance(value, (int, float)) else None


def _fmt(value, spec: str = ".3f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) and value == value else "n/a"


def _headline(stage: str, m: dict) -> str:
    """The figures that say whether a stage did its job."""
    if stage == "vision":
        return f"held-out digit {_fmt(m.get('acc_digit'))}, quadrant {_fmt(m.get('acc_quadrant'))}"
    tasks = ", ".join(f"{t} {_fmt(a)}" for t, a in (m.get("acc_by_task") or {}).items())
    if stage == "language":
        return f"language-only {_fmt(m.get('acc_language'))}"
    if stage == "align":
        return f"caption {tasks or 'n/a'}"
    line = f"multimodal {_fmt(m.get('acc_multimodal'))} ({tasks}), language-only {_fmt(m.get('acc_language'))}"
    if stage == "moe":
        line += (f", MSI {_fmt(m.get('msi'))}, {_fmt(m.get('bytes_per_token'), '.0f')} remote bytes per token and "
                 f"MoE layer (stock dispatch {_fmt(m.get('stock_bytes_per_token'), '.0f')})")
    return line


def print_summary(summary: dict, echo: Callable[[str], None] = print) -> None:
    echo("")
    echo(f"== recipe, seed {summary['seed']}, stage III gate {summary['variant']} " + "=" * 30)
    for name, s in summary["stages"].items():
        echo(f"  {name:<8} {s['status']:<8} {_fmt(s['seconds'], '.0f'):>5}s  {s['headline']}")
    if "final" in summary:
        f = summary["final"]
        echo(f"  stage III on the held-out test split: multimodal {_fmt(f['acc_multimodal'], '.4f')}, language-only "
             f"{_fmt(f['acc_language'], '.4f')}, MSI {_fmt(f['msi'], '.4f')}")
