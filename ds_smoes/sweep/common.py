"""Small shared pieces of the sweep layer, light to import (no torch, Ray or MLflow)."""
from __future__ import annotations

import os
from pathlib import Path

SEED_FIELDS = ("run.seed",)  # axes that the report averages over


def short_names(fields: list[str]) -> dict[str, str]:
    """`smoes.num_bins` -> `num_bins`, unless two fields share their last part."""
    last = [f.rsplit(".", 1)[-1] for f in fields]
    return {f: (l if last.count(l) == 1 else f) for f, l in zip(fields, last)}


def in_ray_job() -> bool:
    """True in the driver of a `ray job submit` job (its working directory is a temporary copy)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def job_home() -> Path:
    return Path.home() / "ray_results" / "ds-smoes"


def default_storage() -> Path:
    """runs/sweeps under the working directory; ~/ray_results/ds-smoes/sweeps inside a Ray job."""
    return job_home() / "sweeps" if in_ray_job() else Path.cwd() / "runs" / "sweeps"


def resolve_tracking_uri(uri: str | None) -> str:
    """One absolute URI for every process.  Default: sqlite:///$PWD/mlflow.db (inside a Ray job,
    ~/ray_results/ds-smoes/mlflow.db); a relative sqlite path is made absolute here."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:
        folder = job_home() if in_ray_job() else Path.cwd()
        return f"sqlite:///{(folder / 'mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri
