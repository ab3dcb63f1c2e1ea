"""The sweep's console: one line per trial event, with the whole sweep's progress and ETA.

    [trial 1/12] t00:num_bins=2,score_type=hard,seed=0  started  (done 0/12, ETA --:--)
    [trial 1/12] t00:num_bins=2,score_type=hard,seed=0  epoch 1, step 75: loss 2.3035, MSI 0.412  (done 0/12, ETA --:--)
    [trial 1/12] t00:num_bins=2,score_type=hard,seed=0  finished in 1m49s: multimodal 0.240, ...  (done 1/12, ETA 00:20)

`SweepProgress` turns events into those lines and knows nothing of Ray (the tests feed it
hand-made events and clocks); `progress_callback` is the thin Ray Tune callback that feeds it.
The ETA is the time left, hours:minutes: the trials still to run, at the mean duration of the
trials that finished in this session, scheduled on `concurrency` slots next to the running ones.
"""
from __future__ import annotations

import heapq
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# final figures of a finished trial, in the order shown: (metric, label, format)
HEADLINE = (("acc_multimodal", "multimodal", "{:.3f}"), ("acc_language", "language", "{:.3f}"),
            ("msi", "MSI", "{:.3f}"), ("tokens_per_s", "tok/s", "{:,.0f}"))
# figures of an epoch report
EPOCH = (("train/loss", "loss", "{:.4f}"), ("train/msi", "MSI", "{:.3f}"),
         ("val/acc_multimodal", "val multimodal", "{:.3f}"), ("val/acc_language", "val language", "{:.3f}"))
REASON_CHARS = 240  # a failure's reason is cut to one line of this length


def eta_seconds(durations: list[float], running_elapsed: list[float], pending: int, concurrency: int) -> float | None:
    """Seconds until the last trial ends, or None before any trial has finished.

    Each trial is taken to last the mean of `durations`; a running trial has that minus its
    elapsed time left (at least 0); the `pending` trials start, one per slot, as the
    `concurrency` slots free up."""
    if not durations:
        return None
    if not running_elapsed and not pending:
        return 0.0
    mean = sum(durations) / len(durations)
    slots = max(1, concurrency, len(running_elapsed))
    free_at = [max(0.0, mean - e) for e in running_elapsed] + [0.0] * (slots - len(running_elapsed))
    heapq.heapify(free_at)
    for _ in range(pending):
        heapq.heappush(free_at, heapq.heappop(free_at) + mean)
    return max(free_at)


def hhmm(seconds: float | None) -> str:
    """Whole minutes, rounded up: 0 -> 00:00, 61 s -> 00:02, None -> --:--."""
    if seconds is None:
        return "--:--"
    minutes = math.ceil(seconds / 60.0)
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def duration(seconds: float) -> str:
    """12s, 1m49s, 1h02m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def figures(metrics: dict, fields: tuple) -> str:
    return ", ".join(f"{label} {fmt.format(metrics[key])}" for key, label, fmt in fields
                     if isinstance(metrics.get(key), (int, float)))


def one_line(reason: str, limit: int = REASON_CHARS) -> str:
    """An error message in one line of at most `limit` characters: its first line, and when it holds a
    traceback (a worker's error, as Ray Train passes it on) the traceback's last line, the error itself."""
    lines = [l.strip() for l in str(reason).splitlines() if l.strip()]
    line = lines[0] if lines else "unknown error"
    if len(lines) > 1 and any(l.startswith("Traceback (most recent call last)") for l in lines):
        line += " " + re.sub(r"^[\w.]+\.(\w+: )", r"\1", lines[-1])  # ds_smoes.core.errors.ConfigError -> ConfigError
    return line if len(line) <= limit else line[:limit - 3] + "..."


@dataclass
class SweepProgress:
    """The events of one sweep session -> its console lines.  Every method returns the lines to print.

    `total` trials in the sweep; `concurrency`: at most this many run at once.  A trial is named
    by its index in the sweep (0-based) and its name; `now` is the event's time (seconds)."""
    total: int
    concurrency: int
    clock: Callable[[], float] = time.time
    done: int = 0
    durations: list[float] = field(default_factory=list)
    running: dict[int, float] = field(default_factory=dict)  # index -> start time
    restarted_from: dict[int, int] = field(default_factory=dict)  # index -> step of the last restart seen
    resuming: set[int] = field(default_factory=set)  # resumed trials whose first report is still to come

    def _now(self, now: float | None) -> float:
        return self.clock() if now is None else now

    def status(self, now: float | None = None) -> str:
        now = self._now(now)
        pending = self.total - self.done - len(self.running)
        eta = eta_seconds(self.durations, [now - t for t in self.running.values()], max(0, pending),
                          self.concurrency)
        return f"done {self.done}/{self.total}, ETA {hhmm(eta)}"

    def _line(self, index: int, name: str, event: str, now: float) -> list[str]:
        return [f"[trial {index + 1}/{self.total}] {name}  {event}  ({self.status(now)})"]

    def skipped(self, index: int, name: str, how: str) -> list[str]:
        """A trial that a resumed sweep does not run again: `how` is "finished" or "failed"."""
        self.done += 1
        return self._line(index, name, f"skipped: {how} in an earlier session", self._now(None))

    def started(self, index: int, name: str, resumed: bool = False, now: float | None = None) -> list[str]:
        """A trial starts; `resumed`: it had reported in an earlier session (its first report says from
        which checkpoint it goes on)."""
        now = self._now(now)
        self.running[index] = now
        if resumed:
            self.resuming.add(index)
        return self._line(index, name, "resumed" if resumed else "started", now)

    def reported(self, index: int, name: str, metrics: dict, now: float | None = None) -> list[str]:
        """A result the trial reported: an epoch's figures (the final result waits for `finished`)."""
        now = self._now(now)
        lines = []
        restart = metrics.get("resumed_from_step")
        if restart and restart != self.restarted_from.get(index):
            self.restarted_from[index] = restart
            what = "goes on" if index in self.resuming else "workers restarted"
            lines += self._line(index, name, f"{what} from the step-{restart} checkpoint", now)
        self.resuming.discard(index)
        if metrics.get("finished") or "epoch" not in metrics or "step" not in metrics:
            return lines
        shown = figures(metrics, EPOCH)
        return lines + self._line(index, name, f"epoch {metrics['epoch']}, step {metrics['step']}"
                                  + (f": {shown}" if shown else ""), now)

    def finished(self, index: int, name: str, metrics: dict, now: float | None = None) -> list[str]:
        now = self._now(now)
        start = self.running.pop(index, None)
        self.done += 1
        took = ""
        if start is not None:
            self.durations.append(now - start)
            took = f" in {duration(now - start)}"
        shown = figures(metrics, HEADLINE)
        return self._line(index, name, f"finished{took}" + (f": {shown}" if shown else ""), now)

    def failed(self, index: int, name: str, reason: str, now: float | None = None) -> list[str]:
        now = self._now(now)
        start = self.running.pop(index, None)
        self.done += 1
        reason = one_line(reason)
        for prefix in (f"TrialFailed: {name}: ", f"{name}: "):  # the trial's own errors name it: once is enough
            reason = reason.removeprefix(prefix)
        after = f" after {duration(now - start)}" if start is not None else ""
        return self._line(index, name, f"failed{after}: {reason}", now)


def trial_error_text(trial) -> str:
    """The reason a Tune trial failed: its error's cause (TrialFailed: ...), else Tune's error text.

    Tune writes both files into the trial's local folder just before it calls `on_trial_error`
    (`Trial.handle_error`); they reach the storage path only at its next sync."""
    from ray import cloudpickle

    err = None
    try:
        if trial.pickled_error_file and os.path.isfile(trial.pickled_error_file):
            with open(trial.pickled_error_file, "rb") as f:
                err = cloudpickle.load(f)
    except Exception:  # noqa: BLE001  (an error that does not unpickle here: fall back to the text)
        err = None
    if isinstance(err, BaseException):
        cause = getattr(err, "cause", None)
        err = cause if isinstance(cause, BaseException) else err
        return f"{type(err).__name__}: {err}"
    try:
        text = Path(trial.error_file).read_text() if trial.error_file else ""
    except OSError:
        text = ""
    lines = [l for l in text.splitlines() if l.strip() and not l.startswith(("Failure #", "Traceback", " "))]
    return lines[-1] if lines else "Tune recorded the trial as failed"


def progress_callback(progress: SweepProgress, log: Callable = print, resumed: bool = False):
    """A Ray Tune callback that prints `progress`'s lines.  In a `resumed` sweep, the trials that
    Tune restored as ended (TERMINATED or ERROR) are printed as skipped at the first step, and a
    trial that had reported before is "resumed" (its first report then names its checkpoint)."""
    from ray.tune import Callback

    def key(trial) -> tuple[int, str]:
        t = trial.config["trial"]
        return t["index"], t["name"]

    class ProgressCallback(Callback):
        def __init__(self) -> None:
            self._skipped_told = not resumed

        def _print(self, lines: list[str]) -> None:
            for line in lines:
                log(line)
            sys.stdout.flush()

        def on_step_begin(self, iteration, trials, **info):
            if self._skipped_told:
                return
            self._skipped_told = True
            for trial in sorted(trials, key=key):
                if trial.status in ("TERMINATED", "ERROR"):
                    how = "finished" if trial.status == "TERMINATED" else "failed"
                    self._print(progress.skipped(*key(trial), how))

        def on_trial_start(self, iteration, trials, trial, **info):
            self._print(progress.started(*key(trial), resumed=resumed and "step" in (trial.last_result or {})))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self._print(progress.reported(*key(trial), result))

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._print(progress.finished(*key(trial), trial.last_result or {}))

        def on_trial_error(self, iteration, trials, trial, **info):
            self._print(progress.failed(*key(trial), trial_error_text(trial)))

    return ProgressCallback()
