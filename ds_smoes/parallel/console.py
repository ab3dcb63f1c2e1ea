"""What a multi-rank command prints: once, from rank 0.

    log0(message, tag="bench")   a progress line (`[bench] message`), rank 0 only
    report_error(err)            a user-fixable error, once, without a traceback; returns exit status 2

Every command of the package (training, the benchmarks' workers, reshard) prints through these, so that a
message reaches the user once however many ranks hit it.
"""
from __future__ import annotations

import os
import sys
import time

from ds_smoes.parallel import distributed

_START = time.time()


def _rank() -> int:
    """This process's rank; before the process group exists, the one the launcher gave it."""
    return distributed.rank() if distributed.is_distributed() else int(os.environ.get("RANK", "0"))


def log0(message: str, tag: str | None = None, elapsed: bool = False) -> None:
    """`message` on rank 0's stdout, flushed; `[tag]` before it, and the seconds since the process started when
    `elapsed`."""
    if _rank() != 0:
        return
    head = f"[{tag}] " if tag else ""
    if elapsed:
        head += f"{time.time() - _START:6.0f}s  "
    print(f"{head}{message}", flush=True)


def report_error(err: Exception, prefix: str = "error: ") -> int:
    """Print a user-fixable error once (on rank 0), without a traceback; the exit status is 2."""
    if _rank() == 0:
        print(f"{prefix}{err}", file=sys.stderr, flush=True)
    return 2
