"""Start real multi-process runs the way users do: the DeepSpeed launcher on CPU ranks."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    e.pop("RANK", None)
    return e


def deepspeed_run(args: list[str], ranks: int = 2, timeout: int = 420, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), *args]
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def python_run(args: list[str], timeout: int = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=timeout)
