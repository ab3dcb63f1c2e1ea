"""Where a sweep's Ray comes from (no Ray is started here: `ray.init` is replaced by a recorder)."""
import os

import pytest

from ds_smoes.sweep import driver


@pytest.fixture
def recorded_init(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def test_without_an_address_the_sweep_starts_its_own_local_ray(recorded_init):
    # not the cluster /tmp/ray/ray_current_cluster names (a head stopped by a signal leaves that file behind)
    driver.init_ray(None, 9, lambda *a: None)
    assert recorded_init[0]["address"] == "local" and recorded_init[0]["num_cpus"] == 9


@pytest.fixture
def listening():
    """A TCP port something listens on (what a Ray head's GCS port looks like to the address probe)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield f"127.0.0.1:{s.getsockname()[1]}"


def test_an_address_or_ray_address_connects_to_that_cluster(recorded_init, monkeypatch, listening):
    driver.init_ray(listening, 9, lambda *a: None)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8290")
    driver.init_ray(None, 9, lambda *a: None)
    assert [c["address"] for c in recorded_init] == [listening, "http://127.0.0.1:8290"]
    assert all("num_cpus" not in c for c in recorded_init)


def test_workers_output_reaches_the_console_only_with_verbose(recorded_init, monkeypatch, listening):
    driver.init_ray(None, 9, lambda *a: None)
    driver.init_ray(listening, 9, lambda *a: None, verbose=True)
    assert [c["log_to_driver"] for c in recorded_init] == [False, True]
    names = ("RAY_AIR_NEW_OUTPUT", "TUNE_PRINT_ALL_TRIAL_ERRORS")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    assert driver.tune_run_config(True, "cb") == {"verbose": 1, "callbacks": ["cb"]}
    assert not any(name in os.environ for name in names)
    for name in names:
        monkeypatch.setenv(name, "1")   # monkeypatch puts them back afterwards
    assert driver.tune_run_config(False, "cb") == {"verbose": 0, "callbacks": ["cb"]}
    # Tune's older output (silent at verbose=0), and no traceback of a failed trial on the console
    assert [os.environ[name] for name in names] == ["0", "0"]


def test_tunes_own_resume_hint_is_dropped_the_sweep_prints_its_command(monkeypatch):
    import logging

    for name in ("RAY_AIR_NEW_OUTPUT", "TUNE_PRINT_ALL_TRIAL_ERRORS"):
        monkeypatch.setenv(name, "1")   # put back afterwards
    driver.tune_run_config(False, "cb")
    driver.tune_run_config(False, "cb")   # one filter, however many sessions
    tune_logger = logging.getLogger("ray.tune.tune")
    assert sum(isinstance(f, driver._NoTunerRestoreHint) for f in tune_logger.filters) == 1
    record = lambda msg: logging.LogRecord("ray.tune.tune", logging.WARNING, "tune.py", 1, msg, None, None)  # noqa: E731
    assert not tune_logger.filter(record("Experiment has been interrupted, but the most recent state was saved.\n"
                                         "Resume experiment with: Tuner.restore(path=..., trainable=...)"))
    assert tune_logger.filter(record("Stop signal received (e.g. via SIGINT/Ctrl+C), ending Ray Tune run."))


def test_an_unreachable_address_fails_in_seconds_before_any_run_or_file(tmp_path):
    """`sweep run ... --address` with nothing listening: one line naming the address, exit 2, well under 30 s,
    and no MLflow store, parent run or sweep folder (Ray's own retries took minutes)."""
    import socket
    import subprocess
    import sys
    import time

    from launch import ROOT, env

    with socket.socket() as s:   # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "ds_smoes.sweep", "run", str(ROOT / "configs" / "sweeps" / "smoke.yaml"),
                           "--address", f"127.0.0.1:{port}", "--storage-path", str(tmp_path / "sweeps"),
                           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert time.time() - t0 < 30 and proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"cannot reach a Ray cluster at '127.0.0.1:{port}'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "mlflow.db").exists()
