"""Sweeps on a real Ray: every trial a TorchTrainer of 2 DeepSpeed ranks (gloo, ep_size 2), each of the
baseline gates in one of the trials.

The runs use a small copy of the digits data (10 steps per epoch) so that each trial takes
seconds of training; what they test is the machinery: MLflow parent and children, a failing
trial that does not stop the others, a crashed worker group restarted from its checkpoint, an
interrupted sweep resumed without re-running finished trials, and `ray job submit` against a
head node started here.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ds_smoes.parallel.launch import free_ports
from launch import GROUP_ENV, ROOT
from sweep_util import (make_small_split, small_data_fields, start_sweep, sweep, sweep_id, tail, write_base_config,
                        write_sweep)

pytestmark = pytest.mark.slow

REQUIRED_TAGS = ("gate", "score_type", "num_bins", "seed", "sweep.trial_id")
REQUIRED_METRICS = ("acc_multimodal", "acc_language", "acc_overall", "msi", "msi_layer", "tokens_per_s",
                    "cross_rank_rate", "ranks_per_token", "remote_pairs_per_token", "train/loss", "train/msi")


@pytest.fixture(scope="module")
def small(tmp_path_factory, digits_dir):
    folder = tmp_path_factory.mktemp("sweeps")
    small = make_small_split(digits_dir, folder / "small")
    return folder, small_data_fields(digits_dir, small), write_base_config(folder, digits_dir, small)


def store_at(uri):
    from ds_smoes.sweep.store import SweepStore

    return SweepStore(uri)


def check_finished_child(store, run, steps=20):
    assert run.status == "FINISHED", (run.name, run.status, run.tags.get("sweep.error"))
    for tag in REQUIRED_TAGS:
        assert run.tags.get(tag), (run.name, tag)
    for key in REQUIRED_METRICS:
        assert key in run.metrics, (run.name, key)
    assert 0.0 <= run.metrics["acc_multimodal"] <= 1.0 and 0.0 <= run.metrics["acc_language"] <= 1.0
    assert run.metrics["tokens_per_s"] > 0 and 1.0 <= run.metrics["ranks_per_token"] <= 2.0
    assert [s for s, _ in store.history(run.run_id, "train/loss")] == list(range(5, steps + 1, 5))  # every 5 steps
    assert len(store.history(run.run_id, "msi_layer")) == 2  # two MoE layers
    assert run.params["smoes.ep_size"] == "2" and run.params["world_size"] == "2"


# -- failure isolation, crash restart, MLflow contents --------------------------------------------------
@pytest.fixture(scope="module")
def isolation(small):
    """Four trials, two at a time, each with a baseline gate (a gate axis plus a trial with its own knobs; the
    sweep in test_interrupted_sweep... trains SMAR and the SMoES KL ablation, the job-submit one SMoES itself):
    t00 (top-k) loses a worker after epoch 1 (Ray Train restarts the group from the epoch-1 checkpoint), t01
    (LTDR) and t02 (hybrid: hard modality routing with shared experts) train normally, t03 fails when it runs: its batch is larger than its
    data, which only the workers find out (a config that does not validate stops the sweep before it starts,
    test_sweep_spec.py)."""
    folder, _, base = small
    spec = write_sweep(folder, base, "isolation", grid={"smoes.gate": ["topk", "ltdr"]},
                       trials=[{"smoes.gate": "hybrid", "smoes.text_experts": 1, "smoes.shared_experts": 2},
                               {"optim.micro_batch_size": 100000}],
                       inject_crash={"trial": 0, "after_epoch": 1, "rank": 1},
                       resources={"workers_per_trial": 2, "cpus_per_worker": 1, "max_concurrent_trials": 2})
    uri = f"sqlite:///{folder / 'isolation.db'}"
    t0 = time.time()
    proc = sweep(["run", str(spec), "--tracking-uri", uri, "--storage-path", str(folder / "store")], timeout=900)
    print(f"isolation sweep: {time.time() - t0:.0f}s")
    store = store_at(uri)
    parents = store.parents()
    assert len(parents) == 1, tail(proc)
    return proc, store, parents[0], {c.tags.get("sweep.trial_id"): c for c in store.children(parents[0].run_id)}


def test_failing_trial_is_recorded_and_the_others_finish(isolation):
    proc, store, parent, runs = isolation
    assert proc.returncode == 1, tail(proc)  # 1: the sweep ran to its end, with a failed trial
    assert "3 finished, 1 failed" in proc.stdout, tail(proc)
    assert set(runs) == {"t00", "t01", "t02", "t03"}
    assert runs["t03"].status == "FAILED"
    assert "do not fill one batch of optim.micro_batch_size=100000" in runs["t03"].tags["sweep.error"]
    assert runs["t03"].tags["mlflow.parentRunId"] == parent.run_id
    assert all(runs[tid].status == "FINISHED" for tid in ("t00", "t01", "t02"))


def test_every_child_run_carries_the_required_metrics(isolation):
    _, store, parent, runs = isolation
    for tid in ("t00", "t01", "t02"):
        check_finished_child(store, runs[tid])
        assert runs[tid].tags["mlflow.parentRunId"] == parent.run_id


def test_the_baseline_gates_train_through_the_sweep(isolation):
    """A gate axis and a trial with the gate's own knobs reach the workers; each gate's own figures reach
    MLflow (SMAR's KL band and the SMoES KL ablation: test_interrupted_sweep_resumes...)."""
    _, _, _, runs = isolation
    assert {tid: run.tags["gate"] for tid, run in runs.items() if tid != "t03"} == \
        {"t00": "topk", "t01": "ltdr", "t02": "hybrid"}
    assert runs["t02"].params["smoes.shared_experts"] == "2" and runs["t02"].params["smoes.text_experts"] == "1"
    assert "train/gate/tail_share" in runs["t01"].metrics  # LTDR's share of vision tail tokens


def test_crashed_worker_group_restarts_from_the_last_checkpoint(isolation, small):
    proc, store, parent, runs = isolation
    t00 = runs["t00"]
    # the workers' output is in the trial's folder, every attempt appended (the console only says it restarted)
    rank1 = (small[0] / "store" / parent.tags["sweep.id"] / "trials" / "t00" / "worker-rank1.log").read_text()
    assert "inject_crash: killing worker rank 1 after epoch 1" in rank1, rank1[-3000:]
    assert "resuming from step 10" in rank1, rank1[-3000:]
    assert "workers restarted from the step-10 checkpoint" in proc.stdout, tail(proc)
    assert t00.tags["sweep.attempts"] == "2"  # two training runs, folded into one child
    assert t00.tags["sweep.resumed_from_step"] == "10"  # the epoch-1 checkpoint, not step 0
    assert runs["t01"].tags["sweep.attempts"] == "1" and runs["t01"].tags["sweep.resumed_from_step"] == "0"


def test_console_has_one_line_per_trial_event_and_ends_with_the_summary(isolation):
    """No Ray tables, no worker output on the console: each trial starts once and ends once (finished or
    failed), every line about a trial carries the sweep's progress, and the summary comes last."""
    proc, _, _, _ = isolation
    out = proc.stdout
    lines = out.splitlines()
    names = {"t00": "t00:gate=topk", "t01": "t01:gate=ltdr", "t02": "t02:gate=hybrid,text_experts=1,shared_experts=2",
             "t03": "t03:micro_batch_size=100000"}
    for i, (tid, name) in enumerate(names.items()):
        mine = [l for l in lines if l.startswith(f"[trial {i + 1}/4] {name}  ")]
        assert sum(" started  (done " in l for l in mine) == 1, mine
        ends = [l for l in mine if "  finished in " in l or "  failed after " in l]
        assert len(ends) == 1, mine
        assert ("  failed after " in ends[0]) == (tid == "t03"), ends
        assert all(l.endswith(")") and "(done " in l and ", ETA " in l for l in mine), mine
    assert "do not fill one batch" in [l for l in lines if l.startswith("[trial 4/4]") and "failed" in l][0]
    assert any("epoch 1, step 10: loss " in l for l in lines if l.startswith("[trial 2/4]")), out
    assert any(l.startswith("Ray logs: ") for l in lines), out
    for noise in ("TrainingReport(", "RayTrainWorker", "Trial status", "pid="):
        assert noise not in out + proc.stderr, noise
    assert "tensorboard" not in (out + proc.stderr).lower()
    summary = next(i for i, l in enumerate(lines) if l.startswith("== sweep "))
    assert not any(l.startswith("[trial ") for l in lines[summary:]), out
    assert lines[-1].strip().startswith("mlflow ui --backend-store-uri "), out[-2000:]


def test_parent_run_holds_the_comparison(isolation, tmp_path):
    proc, store, parent, runs = isolation
    assert parent.status == "FINISHED" and parent.metrics["trials_failed"] == 1
    artifacts = {a.path for a in store.client.list_artifacts(parent.run_id)}
    assert {"comparison.csv", "comparison.md", "comparison_over_seeds.csv", "accuracy_vs_communication.png",
            "msi_per_layer.png", "sweep.yaml", "trials.json"} <= artifacts
    csv_text = Path(store.client.download_artifacts(parent.run_id, "comparison.csv", str(tmp_path))).read_text()
    lines = csv_text.strip().splitlines()
    assert len(lines) == 5 and lines[0].startswith("trial,smoes.gate,smoes.text_experts,smoes.shared_experts,"
                                                   "optim.micro_batch_size,status,acc_multimodal"), lines[0]
    # each trial's row holds its resolved values of the sweep's axes, then its status
    assert lines[1].startswith("t00,topk,") and ",FINISHED," in lines[1], lines[1]
    assert lines[4].startswith("t03,") and ",100000,FAILED," in lines[4], lines[4]
    # the report command reads the same table back from MLflow alone
    rep = sweep(["report", parent.tags["sweep.id"], "--tracking-uri", store.tracking_uri], timeout=120)
    assert rep.returncode == 0, tail(rep)
    for tid in ("t00", "t01", "t02", "t03"):
        assert f"| {tid} " in rep.stdout
    assert "mean and spread" in rep.stdout and "do not fill one batch" in rep.stdout


# -- resume after interruption ------------------------------------------------------------------------
def _wait_for(predicate, timeout, proc=None, log=None):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"sweep exited early ({proc.returncode}):\n" + tail(log.read_text()))
        time.sleep(1.0)
    raise AssertionError("timed out" + ("\n" + tail(log.read_text()) if log else ""))


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(small):
    """Two trials at a time: t00 (SMAR, 20 steps) finishes, t01 (the SMoES KL ablation with the Gaussian score,
    40 steps) is interrupted by Ctrl+C after its first checkpoint; `resume` leaves t00 alone and continues t01
    from its last checkpoint.  t01 waits after that checkpoint for as long as a hold file exists (the spec's
    testing-only inject_hold), so the Ctrl+C always lands while it runs, on a machine of any speed."""
    folder, _, base = small
    hold = folder / "resume.hold"
    hold.touch()
    spec = write_sweep(folder, base, "resume",
                       trials=[{"run.seed": 0, "smoes.gate": "smar"},
                               {"run.seed": 1, "smoes.bin_objective": "kl", "smoes.score_type": "gaussian",
                                "optim.max_steps": 40}],
                       resources={"workers_per_trial": 2, "cpus_per_worker": 1, "max_concurrent_trials": 2},
                       inject_hold={"trial": 1, "after_epoch": 1, "while_file": str(hold)})
    uri = f"sqlite:///{folder / 'resume.db'}"
    store_path = folder / "store"
    log = folder / "resume-1.log"
    proc = start_sweep(["run", str(spec), "--tracking-uri", uri, "--storage-path", str(store_path)], log)
    try:
        # the driver creates the store (its tables) before anything else opens it
        _wait_for(lambda: "mlflow: parent run" in log.read_text(), 120, proc, log)
        store = store_at(uri)
        parent = store.parents()[0]
        sid = sweep_id(log.read_text())

        def t00_done_t01_checkpointed():  # t00 settled in MLflow and ended in Tune; t01 has a checkpoint
            return "[trial 1/2] t00:seed=0,gate=smar  finished in " in log.read_text() and any(
                c.tags.get("sweep.trial_id") == "t00" and "sweep.attempts" in c.tags
                for c in store.children(parent.run_id)) and \
                any((store_path / sid / "train" / "t01").glob("checkpoint_*"))
        _wait_for(t00_done_t01_checkpointed, 300, proc, log)
        proc.send_signal(signal.SIGINT)  # Ctrl+C: Tune saves its state and stops the running trial
        proc.wait(180)
    finally:
        if proc.poll() is None:
            proc.kill()
        hold.unlink(missing_ok=True)
    out = log.read_text()
    assert proc.returncode == 130, tail(out)
    assert "1 finished, 0 failed, 1 not run (interrupted)" in out, tail(out)
    assert f"resume with: python ray_jobs/sweep.py resume {sid}" in out
    parent = store.get(parent.run_id)
    assert parent.status == "KILLED"
    before = {c.name.split(":")[0]: c for c in store.children(parent.run_id)}  # t01's run is not settled yet
    assert before["t00"].status == "FINISHED" and before["t01"].status == "RUNNING"

    resumed = sweep(["resume", sid, "--storage-path", str(store_path)], timeout=420)
    assert resumed.returncode == 0, tail(resumed)
    assert "2 finished, 0 failed" in resumed.stdout
    assert "[trial 1/2] t00:seed=0,gate=smar  skipped: finished in an earlier session  (done 1/2, " in resumed.stdout
    t01 = "[trial 2/2] t01:seed=1,bin_objective=kl,score_type=gaussian,max_steps=40"
    assert f"{t01}  resumed  (done 1/2, " in resumed.stdout, tail(resumed)
    assert f"{t01}  goes on from the step-" in resumed.stdout, tail(resumed)
    assert "workers restarted" not in resumed.stdout, tail(resumed)
    after = {c.tags.get("sweep.trial_id"): c for c in store.children(parent.run_id)}
    assert set(after) == {"t00", "t01"}
    # t00 was not run again: the same run, untouched, and no other run of it, even a deleted one
    assert after["t00"].run_id == before["t00"].run_id and after["t00"].end_time == before["t00"].end_time
    all_t00 = store.client.search_runs([parent.experiment_id], f"attributes.run_name = '{after['t00'].name}'",
                                       run_view_type=3)  # ViewType.ALL
    assert len(all_t00) == 1
    # t01 went on from a checkpoint of the interrupted session, and kept one run with its whole history
    t01 = after["t01"]
    check_finished_child(store, t01, steps=40)
    assert int(t01.tags["sweep.resumed_from_step"]) >= 10 and t01.tags["sweep.attempts"] == "2"
    # the gates' own figures: SMAR's and the KL ablation's KL band, through the sweep into MLflow
    assert after["t00"].tags["gate"] == "smar" and "train/gate/kl_band" in after["t00"].metrics
    assert t01.tags["gate"] == "smoes" and t01.params["smoes.bin_objective"] == "kl"
    assert t01.tags["score_type"] == "gaussian" and "train/gate/kl_band" in t01.metrics
    assert store.get(parent.run_id).status == "FINISHED"


# -- ray job submit against a head node ------------------------------------------------------------------
def test_ray_job_submit_against_a_local_head_node(small):
    folder, data, _ = small
    bin_dir = Path(sys.executable).parent
    ray = str(bin_dir / "ray")
    # as README says: the venv's python first on PATH, token authentication on for the cluster and the CLI
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", DS_ACCELERATOR="cpu",
               RAY_AUTH_MODE="token")
    for key in ("RAY_ADDRESS", "PYTEST_CURRENT_TEST", *GROUP_ENV):
        env.pop(key, None)
    port, dashboard = free_ports(2)  # distinct: ray start refuses one port for two components
    uri = f"sqlite:///{folder / 'job.db'}"
    token = subprocess.run([ray, "get-auth-token", "--generate"], env=env, capture_output=True, text=True, timeout=60)
    assert token.returncode == 0, token.stderr[-2000:]
    start = subprocess.run([ray, "start", "--head", f"--port={port}", f"--dashboard-port={dashboard}",
                            "--num-cpus=8", "--disable-usage-stats"], env=env, capture_output=True, text=True,
                           timeout=180)
    try:
        assert start.returncode == 0, start.stdout[-3000:] + start.stderr[-3000:]
        small_data = [f"data.{k}={'null' if v is None else v}" for k, v in data.items()] + \
            ["run.log_every=5", "optim.max_steps=20"]
        job = subprocess.run(
            [ray, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", ".", "--",
             "python", "ray_jobs/sweep.py", "run", "configs/sweeps/smoke.yaml", "--max-concurrent-trials", "2",
             "--tracking-uri", uri,
             "--storage-path", str(folder / "job-store"), *(a for s in small_data for a in ("--set", s))],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
        assert job.returncode == 0, tail(job)
        assert "succeeded" in job.stdout and "ray: connecting to " in job.stdout, tail(job)
    finally:
        subprocess.run([ray, "stop"], env=env, capture_output=True, timeout=120)
    store = store_at(uri)
    parent = store.parents()[0]
    assert parent.tags["sweep.name"] == "smoke" and parent.status == "FINISHED"
    children = store.children(parent.run_id)
    assert len(children) == 2
    for run in children:
        check_finished_child(store, run)
    assert json.loads(parent.params["sweep.axes"]) == ["smoes.score_type", "run.seed"]
    shutil.rmtree(folder / "job-store", ignore_errors=True)
