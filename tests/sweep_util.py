"""Helpers of the sweep tests: a small copy of the digits data, configs and sweep files in a
temporary folder, and the sweep CLI run the way users run it (a subprocess)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from launch import GROUP_ENV, ROOT

SWEEP_SCRIPT = str(ROOT / "ray_jobs" / "sweep.py")


def make_small_split(digits: Path, out: Path) -> Path:
    """A 640-conversation training split (10 steps per epoch on 2 ranks of 32) and a 200-question
    test split of the digits data, written to `out` (the images stay in `digits`, read only), so
    that a trial trains and evaluates in seconds."""
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 640), ("test", 200)):
        records = json.loads((digits / f"{split}.json").read_text())
        (out / f"{split}_small.json").write_text(json.dumps(records[:n]))
    return out


def small_data_fields(digits: Path, small: Path) -> dict:
    return {"train_json": str(small / "train_small.json"), "val_json": None,
            "test_json": str(small / "test_small.json"), "image_folder": str(digits), "generate_digits": False}


def write_base_config(folder: Path, digits: Path, small: Path) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg["data"] = small_data_fields(digits, small)
    cfg["run"].update(output_dir=str(folder / "unused"), deepspeed_config=str(ROOT / "ds_configs" / "cpu_ep.json"),
                      log_every=5, eval_every_epoch=False, save_checkpoint=False)
    cfg["optim"].update(max_steps=20)
    path = folder / "base.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_sweep(folder: Path, base: Path, name: str, **fields) -> Path:
    spec = {"name": name, "base_config": str(base), "experiment": "sweep-tests",
            "resources": {"workers_per_trial": 2, "cpus_per_worker": 1, "max_concurrent_trials": 1},
            "max_failures": 1, **fields}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def env() -> dict:
    e = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    for key in (*GROUP_ENV, "RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PYTEST_CURRENT_TEST"):
        e.pop(key, None)
    return e


def sweep(args: list[str], cwd: Path = ROOT, timeout: int = 420) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SWEEP_SCRIPT, *args], cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def start_sweep(args: list[str], log: Path, cwd: Path = ROOT) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, SWEEP_SCRIPT, *args], cwd=cwd, env=env(), stdout=log.open("w"),
                            stderr=subprocess.STDOUT, text=True)


def tail(proc_or_text, n: int = 6000) -> str:
    if isinstance(proc_or_text, str):
        return proc_or_text[-n:]
    return (proc_or_text.stdout or "")[-n:] + "\n--- stderr ---\n" + (proc_or_text.stderr or "")[-n:]


def sweep_id(output: str) -> str:
    for line in output.splitlines():
        if line.startswith("sweep ") and ": " in line and " trials over " in line:
            return line.split()[1].rstrip(":")
    raise AssertionError("no sweep id in the output:\n" + output[-3000:])
