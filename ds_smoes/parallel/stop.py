"""Stop requests for a training process: SIGINT / SIGTERM, or the launcher that started it gone.

Ctrl-C in a terminal sends SIGINT to every process of the job (the `deepspeed` runner, its `launch.py`, every
rank), and `launch.py` then sends SIGTERM to the ranks and kills them 30 seconds later.  Raising
KeyboardInterrupt inside a rank (Python's default) stops it in the middle of a collective, with a traceback per
rank and nothing saved.  `StopRequests` records the request instead; the training loop reads it at its next
logging step, inside the collective it already makes there, so every rank stops after the same step and the
last state can be saved (`ds_smoes.app.session`).  A second SIGINT stops at once (KeyboardInterrupt).

A rank whose launcher died (a supervisor signalled only the runner's PID) would otherwise train on as an
orphan, holding its port: the launcher's processes (the parent, and its parent when that is the `deepspeed`
runner) are watched, and their end is a stop request too.
"""
from __future__ import annotations

import os
import signal
import threading

NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class StopRequests:
    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}
        self._watched: list[int] = _launcher_pids()

    def install(self) -> "StopRequests":
        """Handle SIGINT and SIGTERM (the main thread only: a Ray Train worker's loop runs in another thread, where
        Python cannot, and its controller stops it)."""
        if threading.current_thread() is threading.main_thread():
            for sig in NAMES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt   # the second Ctrl-C: now
        self.signal = self.signal or signum

    def requested(self) -> bool:
        return self.signal is not None or self.launcher_gone()

    def launcher_gone(self) -> bool:
        import psutil

        return any(not psutil.pid_exists(pid) for pid in self._watched)

    def reason(self) -> str:
        if self.signal is not None:
            return f"{NAMES.get(self.signal, self.signal)} received"
        return "the launcher that started this process has exited"


def _launcher_pids() -> list[int]:
    """The launcher processes of a rank started by one (LOCAL_RANK set before the process group exists): its
    parent, and the parent's parent when that is the `deepspeed` runner."""
    if "LOCAL_RANK" not in os.environ:
        return []
    import psutil

    try:
        parent = psutil.Process(os.getppid())
        pids = [parent.pid]
        grand = parent.parent()
        if grand is not None and any("deepspeed" in part for part in grand.cmdline()[:3]):
            pids.append(grand.pid)
        return pids
    except (psutil.Error, OSError):
        return []
