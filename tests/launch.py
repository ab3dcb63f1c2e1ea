"""Start real multi-process runs the way users do: the DeepSpeed launcher on CPU ranks."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ds_smoes.parallel.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


# what a process group's rendezvous reads from the environment: in-process tests that join a 1-process group
# (ds_smoes.parallel.launch.init_distributed) set them in pytest's own environment, and a child that inherited
# them would try to join that group (its MASTER_PORT is in use) instead of starting its own
GROUP_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def env() -> dict:
    e = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    for key in GROUP_ENV:
        e.pop(key, None)
    return e


def deepspeed_run(args: list[str], ranks: int = 2, timeout: int = 420, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), *args]
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def python_run(args: list[str], timeout: int = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=timeout)
