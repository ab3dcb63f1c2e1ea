"""Ray sweeps of ds_smoes: the script that `ray job submit` runs (same as `python -m ds_smoes.sweep`).

    python ray_jobs/sweep.py run configs/sweeps/smoke.yaml           # local Ray, in this process
    python ray_jobs/sweep.py run configs/sweeps/smoke.yaml --address auto   # a cluster this node belongs to
    ray job submit --working-dir . -- python ray_jobs/sweep.py run configs/sweeps/smoke.yaml \
        --tracking-uri sqlite:///$PWD/mlflow.db --storage-path $PWD/runs/sweeps      # see docs/sweeps.md
    python ray_jobs/sweep.py resume SWEEP_ID                         # continue an interrupted sweep
    python ray_jobs/sweep.py report [SWEEP]                          # the comparison table, from MLflow
"""
import sys
from pathlib import Path

# The repository this script sits in (under `ray job submit`, the uploaded copy) comes first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds_smoes.sweep.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
