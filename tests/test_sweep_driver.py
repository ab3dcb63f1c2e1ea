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


def test_an_address_or_ray_address_connects_to_that_cluster(recorded_init, monkeypatch):
    driver.init_ray("127.0.0.1:6390", 9, lambda *a: None)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8290")
    driver.init_ray(None, 9, lambda *a: None)
    assert [c["address"] for c in recorded_init] == ["127.0.0.1:6390", "http://127.0.0.1:8290"]
    assert all("num_cpus" not in c for c in recorded_init)


def test_workers_output_reaches_the_console_only_with_verbose(recorded_init, monkeypatch):
    driver.init_ray(None, 9, lambda *a: None)
    driver.init_ray("127.0.0.1:6390", 9, lambda *a: None, verbose=True)
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
