"""The sweep file: a base training config, overrides for every trial, and a grid of axes.

    name: bins_scores                  # letters, digits, - and _; each run gets id NAME-YYYYmmdd-HHMMSS
    base_config: ../demo.yaml          # a training config (relative to this file)
    experiment: ds-smoes-sweeps        # MLflow experiment (default: the base config's)
    overrides:                         # dotted TrainConfig fields set in every trial
      optim.max_steps: 60
    grid:                              # axes: the trials are their cartesian product, in file order
      smoes.num_bins: [2, 4]
      smoes.score_type: [attention, gaussian, hard]
      run.seed: [0, 1]
    trials:                            # extra trials after the grid, each a mapping of dotted fields
      - {smoes.gate: topk}
    resources: {workers_per_trial: 2, cpus_per_worker: 1, max_concurrent_trials: 1}
    max_failures: 1                    # Ray Train restarts of a crashed worker group, per trial

Any dotted field of `TrainConfig` may be an axis (`smoes.gate`, `optim.lr`, ...): the field
paths are checked against the config models here, so a typo fails before anything starts.
Values are checked per trial before anything starts: a trial whose values do not fit (say num_bins=3
with ep_size=2, or an unknown gate) stops the sweep with one message naming the sweep file, the trial
and the field (exit 2), before Ray or MLflow is touched.  A trial that fails while it runs (its data
does not fill a batch, a worker crashes past max_failures) is recorded as failed, without stopping the others.

No Ray and no MLflow here.
"""
from __future__ import annotations

import difflib
import itertools
import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ds_smoes.core.config import validate
from ds_smoes.core.errors import ConfigError, SMoESError
from ds_smoes.sweep.common import short_names
from ds_smoes.app.config import TrainConfig, load_train_config, parse_override, read_mapping_file


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(_Strict):
    workers_per_trial: int = Field(2, ge=1, description="Ray Train workers (= torch.distributed ranks) per trial")
    cpus_per_worker: float = Field(1.0, gt=0, description="logical CPUs each worker reserves")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs each worker reserves; above 0 the workers train on "
                                                         "their GPU over NCCL (Ray Train picks the backend), at 0 on "
                                                         "the CPU over gloo")
    max_concurrent_trials: int = Field(1, ge=1, description="trials that run at the same time")
    local_cpus: int | None = Field(None, ge=1, description="logical CPUs of the in-process Ray (default: enough "
                                                          "for max_concurrent_trials trials, at least 8)")


class CrashInjection(_Strict):
    """Testing only: kill one worker once, right after the checkpoint of an epoch is reported,
    to exercise Ray Train's restart from the last checkpoint (FailureConfig)."""

    trial: int = Field(0, ge=0, description="index of the trial (0 = the first)")
    after_epoch: int = Field(1, ge=1)
    rank: int = Field(0, ge=0)


class HoldInjection(_Strict):
    """Testing only: the workers of one trial wait, right after the checkpoint of an epoch is reported, for
    as long as a file exists, so that a test can interrupt the sweep while that trial is known to be
    running, whatever the machine's speed (it deletes the file to let the trial go on)."""

    trial: int = Field(0, ge=0, description="index of the trial (0 = the first)")
    after_epoch: int = Field(1, ge=1)
    while_file: Path = Field(..., description="the workers wait while this file exists (an absolute path)")


class SweepSpec(_Strict):
    name: str = Field(..., description="sweep name (letters, digits, - and _)")
    base_config: Path = Field(..., description="training config, relative to the sweep file")
    experiment: str | None = Field(None, description="MLflow experiment (default: the base config's)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted fields set in every trial")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="axes; trials are their product")
    trials: list[dict[str, Any]] = Field(default_factory=list, description="extra trials after the grid")
    resources: Resources = Resources()
    max_failures: int = Field(1, ge=-1, description="Ray Train restarts per trial after a worker crash (-1: no limit)")
    inject_crash: CrashInjection | None = Field(None, description="testing only: crash one worker once")
    inject_hold: HoldInjection | None = Field(None, description="testing only: hold one trial while a file exists")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", v):
            raise ValueError(f"{v!r}: use letters, digits, '-' and '_' (at most 64), starting with a letter or digit")
        return v

    @field_validator("overrides", "grid")
    @classmethod
    def _known_fields(cls, v: dict) -> dict:
        for key in v:
            check_field_path(key)
        return v

    @field_validator("grid")
    @classmethod
    def _axes_non_empty(cls, v: dict) -> dict:
        for key, values in v.items():
            if not values:
                raise ValueError(f"axis {key!r} has no values")
            if len({json.dumps(x, sort_keys=True, default=str) for x in values}) != len(values):
                raise ValueError(f"axis {key!r} repeats a value: {values}")
        return v

    @field_validator("trials")
    @classmethod
    def _trial_fields(cls, v: list) -> list:
        for i, trial in enumerate(v):
            if not trial:
                raise ValueError(f"trials[{i}] is empty")
            for key in trial:
                check_field_path(key)
        return v

    @model_validator(mode="after")
    def _some_trials(self) -> SweepSpec:
        if not self.grid and not self.trials:
            raise ValueError("no trials: give a grid (axis: [values]) or a list of trials")
        if self.inject_crash and self.inject_crash.trial >= self.num_trials:
            raise ValueError(f"inject_crash.trial={self.inject_crash.trial} but the sweep has {self.num_trials} trials")
        if self.inject_hold and self.inject_hold.trial >= self.num_trials:
            raise ValueError(f"inject_hold.trial={self.inject_hold.trial} but the sweep has {self.num_trials} trials")
        if self.inject_crash and self.inject_crash.rank >= self.resources.workers_per_trial:
            raise ValueError(f"inject_crash.rank={self.inject_crash.rank} but trials have "
                             f"{self.resources.workers_per_trial} workers")
        return self

    @property
    def num_trials(self) -> int:
        n = 1
        for values in self.grid.values():
            n *= len(values)
        return (n if self.grid else 0) + len(self.trials)

    @property
    def axes(self) -> list[str]:
        """Every field a trial varies: the grid's axes, then fields only the extra trials set."""
        out = list(self.grid)
        for trial in self.trials:
            out += [k for k in trial if k not in out]
        return out

    def expand(self) -> list[dict]:
        """The trials, in order: [{"index", "id", "name", "values": {field: value}}]."""
        combos = [dict(zip(self.grid, values)) for values in itertools.product(*self.grid.values())] \
            if self.grid else []
        combos += [dict(t) for t in self.trials]
        short = short_names(self.axes)
        width = max(2, len(str(len(combos) - 1)))
        out = []
        for i, values in enumerate(combos):
            tid = f"t{i:0{width}d}"
            label = ",".join(f"{short[k]}={_fmt(v)}" for k, v in values.items())
            out.append({"index": i, "id": tid, "name": f"{tid}:{label}", "values": values})
        return out


def _fmt(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def check_field_path(path: str) -> None:
    """Raise ValueError unless `path` names a field of TrainConfig (`section.field`)."""
    model: type[BaseModel] = TrainConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:i]) or "the training config"
            close = difflib.get_close_matches(part, list(fields), n=1)
            hint = f"; did you mean {'.'.join(parts[:i] + close[:1])!r}?" if close else \
                f"; {where} has: {', '.join(fields)}"
            raise ValueError(f"{path!r}: {where} has no field {part!r}{hint}")
        annotation = fields[part].annotation
        if i < len(parts) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                raise ValueError(f"{path!r}: {'.'.join(parts[:i + 1])!r} is a value, not a section")
            model = annotation
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            raise ValueError(f"{path!r} is a whole section; name one of its fields, e.g. "
                             f"{path}.{next(iter(annotation.model_fields))}")


def load_sweep(path: Path, overrides: list[str] | None = None) -> SweepSpec:
    """Read and validate a sweep file (YAML or JSON); `overrides` are extra `field=value` for every trial."""
    path = Path(path)
    data = read_mapping_file(path, "sweep file", "a mapping with name, base_config and grid (see configs/sweeps/)")
    if isinstance(data.get("base_config"), str) and not Path(data["base_config"]).is_absolute():
        data["base_config"] = str((path.parent / data["base_config"]).resolve())
    extra = dict(parse_override(item, "optim.max_steps=40") for item in overrides or [])
    if extra:
        data["overrides"] = {**(data.get("overrides") or {}), **extra}
    spec = validate(SweepSpec, data, source=f"sweep file {path}")
    if not spec.base_config.is_file():
        raise ConfigError(f"{path}: base_config {str(spec.base_config)!r} not found")
    return spec


def trial_config(spec: SweepSpec, trial: dict, fixed: dict[str, Any] | None = None) -> TrainConfig:
    """The trial's validated TrainConfig: base config, then the sweep's overrides, the trial's
    values and `fixed` (what the sweep decides: run names, output folders, tracking)."""
    items = {**spec.overrides, **trial["values"], **(fixed or {})}
    return load_train_config(spec.base_config, [f"{k}={json.dumps(v)}" for k, v in items.items()],
                             origin="the sweep:", source=f"config of trial {trial['name']} ({spec.base_config.name} + "
                                                        "the sweep's values)")


def precheck(spec: SweepSpec, trials: list[dict]) -> dict[str, str]:
    """{trial id: error} for the trials whose config does not validate (`start_sweep` starts nothing while any
    is listed)."""
    bad = {}
    for trial in trials:
        try:
            cfg = trial_config(spec, trial)
            check_layout(cfg, spec.resources.workers_per_trial)
        except SMoESError as err:
            bad[trial["id"]] = str(err)
    return bad


def check_layout(cfg: TrainConfig, workers: int) -> None:
    ep = cfg.smoes.ep_size
    if cfg.model.moe_layers != "none" and workers % ep:
        raise ConfigError(f"smoes.ep_size={ep} does not divide the {workers} workers of a trial "
                          f"(resources.workers_per_trial)")
