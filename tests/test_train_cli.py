"""The training entry point: a real 2-rank run logged to MLflow, and bad input handled cleanly."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch import ROOT, deepspeed_run, env, python_run


def write_config(tmp_path: Path, data_dir: Path, **sections) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg["data"] = {"train_json": str(data_dir / "train.json"), "val_json": str(data_dir / "val.json"),
                   "test_json": str(data_dir / "test.json"), "image_folder": str(data_dir),
                   "generate_digits": False}
    cfg["run"]["output_dir"] = str(tmp_path / "out")
    cfg["run"]["deepspeed_config"] = str(ROOT / "ds_configs" / "cpu_ep.json")
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_two_rank_training_logs_to_mlflow(demo_run):
    # the demo's command (the session's demo_run: 1,900 steps, log_every 20, MLflow into its own SQLite store)
    proc = demo_run.proc
    m = demo_run.metrics
    assert "[epoch 25 step 1900/1900]" in proc.stdout and "== results" in proc.stdout
    for key in ("acc_multimodal", "acc_language", "msi", "tokens_per_s", "cross_rank_rate", "ranks_per_token",
                "mlflow_run_id", "gate", "score_type", "num_bins"):
        assert key in m, key
    assert m["world_size"] == 2 and m["ep_size"] == 2 and m["gate"] == "smoes" and m["num_bins"] == 2
    assert 0.0 <= m["acc_multimodal"] <= 1.0 and m["tokens_per_s"] > 0
    assert 0.0 < m["cross_rank_rate"] <= 1.0 and 1.0 <= m["ranks_per_token"] <= 2.0
    # the demo's rank_once dispatch: measured from its split sizes, never zero on 2 ranks; the stock dispatch's
    # padded buffers for the same routes hold at least one slot per (token, remote rank) pair, so never less
    assert m["dispatch"] == "rank_once" and m["bytes_per_token"] > 0
    assert m["stock_bytes_per_token"] >= m["bytes_per_token"]
    assert m["num_test_multimodal"] + m["num_test_language"] == 759  # every test question, counted once

    import mlflow

    client = mlflow.MlflowClient(demo_run.tracking_uri)
    run = client.get_run(m["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    for key in ("acc_multimodal", "acc_language", "msi", "tokens_per_s", "cross_rank_rate", "bytes_per_token",
                "train/loss", "train/bytes_per_token"):
        assert key in run.data.metrics, key
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 1900 // 20  # every log_every steps
    assert run.data.params["smoes.score_type"] == "attention" and run.data.tags["gate"] == "smoes"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "metrics.json", "expert_modality_heatmap.png"} <= artifacts
    assert (demo_run.out / "checkpoint" / "final").is_dir()


def _fails_cleanly(proc, *needles):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-2000:]


def _main_fails_cleanly(capsys, argv, *needles):
    """The training command's `main(argv)` in this process (what `python -m ds_smoes.train ARGV` runs): exit
    status 2, one `error:` line on stderr with every needle, and no traceback (an exception would raise here)."""
    from ds_smoes.app.train import main

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "Traceback" not in err, err[-2000:]
    for needle in needles:
        assert needle in err, err[-2000:]


@pytest.mark.parametrize("override, needles", [
    ("smoes.score_type=cosine", ["smoes.score_type", "'attention', 'gaussian' or 'hard'"]),
    ("smoes.num_bins=3", ["num_bins=3 is not a multiple of ep_size=2"]),
    ("smoes.ep_sise=1", ["smoes.ep_sise: unknown field"]),
])
def test_config_errors_exit_2_with_message(capsys, override, needles):
    _main_fails_cleanly(capsys, ["--config", str(ROOT / "configs" / "demo.yaml"), "--set", override, "--no-mlflow"],
                        *needles)


def test_ep_size_larger_than_world(tmp_path, digits_dir, capsys):
    cfg = write_config(tmp_path, digits_dir)
    _main_fails_cleanly(capsys, ["--config", str(cfg), "--no-mlflow"],
                        "smoes.ep_size=2 does not divide the number of ranks (1)",
                        "deepspeed --num_gpus 2 --module ds_smoes.train")   # the launcher's spelling of -m


def test_the_command_line_error_path_is_the_programs(tmp_path):
    # the tests above call main() in-process; once, the real `python -m ds_smoes.train` with its exit status
    proc = python_run(["-m", "ds_smoes.train", "--config", str(ROOT / "configs" / "demo.yaml"), "--set",
                       "smoes.num_bins=3", "--no-mlflow"])
    _fails_cleanly(proc, "num_bins=3 is not a multiple of ep_size=2")


@pytest.mark.slow
def test_a_config_error_under_the_launcher_is_printed_once():
    proc = deepspeed_run(["--module", "ds_smoes.train", "--config", str(ROOT / "configs" / "demo.yaml"),
                          "--set", "smoes.num_binz=4", "--no-mlflow"], timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("error: invalid") == 1, proc.stderr[-3000:]
    assert "did you mean 'num_bins'?" in proc.stderr and "[from --set smoes.num_binz=4]" in proc.stderr


@pytest.mark.parametrize("damage, needles", [
    ("malformed", ["train.json", "line 2"]),
    ("missing_image", ["not found under", "images/0000.png"]),
])
def test_dataset_errors_exit_2_with_message(tmp_path, digits_dir, damage, needles, capsys):
    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    if damage == "malformed":
        (data / "train.json").write_text('[\n {"id": "x", "conversations": [}\n]')
    else:
        (data / "images" / "0000.png").unlink()
        records = json.loads((data / "train.json").read_text())
        records[0]["image"] = "images/0000.png"
        (data / "train.json").write_text(json.dumps(records))
    cfg = write_config(tmp_path, data, smoes={"ep_size": 1})
    _main_fails_cleanly(capsys, ["--config", str(cfg), "--no-mlflow"], *needles)


def test_ports_asked_together_are_distinct_and_free():
    # ray start --port P --dashboard-port D refuses P == D: ports asked one at a time can repeat (CI saw it)
    import socket

    from ds_smoes.parallel.launch import free_ports

    ports = free_ports(16)
    assert len(set(ports)) == 16
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_the_process_group_is_destroyed_before_interpreter_exit():
    # atexit handlers run last-registered first: one registered before init_distributed runs after
    # its handler, and must find the group gone (gloo's threads released while Python is whole)
    script = ("import atexit, torch, torch.distributed as dist\n"
              "atexit.register(lambda: print('group alive at exit:', dist.is_initialized(), flush=True))\n"
              "from ds_smoes.parallel.launch import init_distributed\n"
              "init_distributed(); init_distributed()\n"
              "dist.all_to_all_single(torch.zeros(2), torch.ones(2), async_op=True).wait()\n")
    proc = python_run(["-c", script])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "group alive at exit: False" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_a_left_over_shm_op_build_lock_does_not_stall_the_backend(tmp_path):
    # a rank killed while DeepSpeed JIT-built its CPU shm comm op leaves `lock` in the extensions folder, and
    # torch then waits on it forever; the package never builds that op, so a start must not notice the lock
    (tmp_path / "deepspeed_shm_comm").mkdir()  # torch builds `name` right under TORCH_EXTENSIONS_DIR
    (tmp_path / "deepspeed_shm_comm" / "lock").touch()
    script = ("from ds_smoes.parallel.launch import init_distributed\n"
              "init_distributed()\n"
              "import deepspeed, torch\n"
              "engine, *_ = deepspeed.initialize(model=torch.nn.Linear(2, 2), config={'train_micro_batch_size_per_gpu': 1})\n"
              "print('backend up', flush=True)\n")
    e = dict(env(), TORCH_EXTENSIONS_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], env=e, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "backend up" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert list((tmp_path / "deepspeed_shm_comm").iterdir()) == [tmp_path / "deepspeed_shm_comm" / "lock"]


def test_placement_under_zero_2_is_refused_only_when_the_bins_freeze_in_the_run():
    from ds_smoes.app.config import TrainConfig
    from ds_smoes.app.session import _check_placement_supported
    from ds_smoes.core.errors import ConfigError

    cfg = TrainConfig.model_validate({"smoes": {"num_experts": 4, "ep_size": 2, "num_bins": 2, "binning": "adaptive",
                                                "placement": "bins", "rebin_freeze_step": 100}})
    zero2, s = {"zero_optimization": {"stage": 2}}, cfg.smoes
    _check_placement_supported(s, zero2, 99, "z2.json")               # bins never freeze: nothing moves
    _check_placement_supported(s, {"zero_optimization": {"stage": 0}}, 500, "z0.json")
    with pytest.raises(ConfigError, match=r"freeze \(step 100 of 100\).*z2.json keeps it in DeepSpeed's flat "
                                          r"buffers \(ZeRO stage 2\): set smoes.placement=none"):
        _check_placement_supported(s, zero2, 100, "z2.json")
    with pytest.raises(ConfigError, match=r"bf16.json keeps it in DeepSpeed's flat buffers \(bf16 "):
        _check_placement_supported(s, {"bf16": {"enabled": True}}, 100, "bf16.json")
    _check_placement_supported(s, {"bf16": {"enabled": False}}, 100, "fp32.json")


@pytest.mark.slow
def test_activation_checkpointing_and_bf16_train_the_demo_recipe(two_rank_scenarios):
    # 30 steps (one rebin at 25) of the demo recipe in the training session, 2 ranks (tests/dist_scripts/
    # train_variants.py): DeepSpeed's activation checkpointing recomputes every decoder block in the backward, and
    # the run ends exactly where the plain one does (dropout masks restored, routing state recorded once);
    # DeepSpeed's bf16 trains the same recipe (placement off: its optimizer state is flat)
    for figures in two_rank_scenarios.reports("train_variants"):
        assert figures["plain"]["steps"] == 30 and figures["bf16"]["steps"] == 30
        same = ("final_train_loss", "test_loss", "acc_overall", "msi", "cross_rank_rate")
        assert {k: figures["checkpointed"][k] for k in same} == {k: figures["plain"][k] for k in same}
        assert abs(figures["bf16"]["test_loss"] - figures["plain"]["test_loss"]) < 0.1 * figures["plain"]["test_loss"]


def test_a_diverging_run_stops_without_a_checkpoint_and_its_mlflow_run_says_why(tmp_path, digits_dir, capsys):
    """optim.lr=1000: the loss turns non-finite within the first steps; the run stops at the next log line with
    exit 2 and one message, writes no checkpoint (neither an epoch's nor the final one), and its MLflow run is
    FAILED with the reason."""
    import mlflow

    cfg = write_config(tmp_path, digits_dir, smoes={"ep_size": 1},
                       optim={"lr": 1000.0, "warmup_steps": 0, "max_steps": 60},
                       run={"log_every": 5, "checkpoint_every_epoch": True, "eval_every_epoch": False})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _main_fails_cleanly(capsys, ["--config", str(cfg), "--tracking-uri", uri], "training diverged",
                        "saves no checkpoint", "optim.lr")
    assert not (tmp_path / "out" / "checkpoint").exists() and not (tmp_path / "out" / "metrics.json").exists()
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ds-smoes").experiment_id])
    assert run.info.status == "FAILED" and "training diverged" in run.data.tags["failure_reason"]


@pytest.mark.slow
def test_a_corrupt_image_that_rank_1_checks_stops_the_run_before_step_1_with_one_message(tmp_path, digits_dir):
    """Images load lazily; the run decodes every referenced image up front, the ranks sharing the files.  The
    second distinct training image is rank 1's to check: its problem reaches the user once, through rank 0."""
    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    records = json.loads((data / "train.json").read_text())
    images = list(dict.fromkeys(r["image"] for r in records if "image" in r))
    (data / images[1]).write_bytes(b"not a png at all")
    record = next(r["id"] for r in records if r.get("image") == images[1])
    cfg = write_config(tmp_path, data)
    proc = deepspeed_run(["--module", "ds_smoes.train", "--config", str(cfg), "--no-mlflow"], timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("error: ") == 1, proc.stderr[-3000:]
    assert f"record {record!r}" in proc.stderr and images[1] in proc.stderr and "corrupt image" in proc.stderr
    assert "Traceback" not in proc.stderr and "[epoch 1 step" not in proc.stdout


@pytest.mark.slow
def test_ctrl_c_saves_at_a_step_boundary_and_the_same_command_resumes_to_the_uninterrupted_figures(tmp_path):
    """SIGINT to the whole job (what Ctrl-C sends) on 2 ranks: every rank stops after the same logging step, the
    state (weights, optimizer, schedule, SMoES buffers, each rank's random state) is saved, one line says so,
    the MLflow run is KILLED with the reason; the same command resumes.  The resumed run saves a periodic
    checkpoint (run.checkpoint_every_minutes) and is then killed outright (SIGKILL: nothing can save or end a
    run); the same command resumes from that checkpoint, ends the killed run's MLflow run, and finishes with
    exactly the figures of a run never interrupted (fp32, same machine)."""
    import os
    import signal

    import mlflow

    from launch import DEEPSPEED, free_port

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def command(out):
        return [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "ds_smoes.train",
                "--config", str(ROOT / "configs" / "demo.yaml"), "--set", f"run.output_dir={out}",
                "--set", "optim.max_steps=20", "--set", "run.log_every=5", "--set", "run.eval_every_epoch=false",
                "--set", "run.checkpoint_every_minutes=0.0001",   # a periodic checkpoint at every logging step
                "--tracking-uri", uri]

    def start(out, signal_at: str, sig):
        """The command, sent `sig` (to its whole process group) when a line with `signal_at` appears."""
        proc = subprocess.Popen(command(out), cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if signal_at in line:
                os.killpg(proc.pid, sig)
                if sig == signal.SIGKILL:
                    break
        proc.wait(timeout=120)
        return "".join(lines)

    out = start(tmp_path / "run", "[epoch 1 step 5/20]", signal.SIGINT)
    assert out.count("interrupted at step 10/20 (SIGINT received)") == 1, out[-3000:]
    assert "run the same command to resume" in out
    assert (tmp_path / "run" / "checkpoint" / "latest").read_text().strip() == "interrupted"
    assert not (tmp_path / "run" / "metrics.json").exists()

    out = start(tmp_path / "run", "checkpoint at step 15/20", signal.SIGKILL)   # resumed, then a crash
    assert out.count("resuming the interrupted run") == 1 and "at epoch 0, step 10/20" in out, out[-3000:]
    assert (tmp_path / "run" / "checkpoint" / "latest").read_text().strip() == "periodic"

    again = subprocess.run(command(tmp_path / "run"), cwd=ROOT, env=env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert again.stdout.count("resuming the interrupted run") == 1 and "step 15/20" in again.stdout
    # finished: nothing left to resume (the same command would train afresh)
    assert not (tmp_path / "run" / "checkpoint" / "periodic").exists()
    assert (tmp_path / "run" / "checkpoint" / "latest").read_text().strip() == "final"

    whole = subprocess.run(command(tmp_path / "whole"), cwd=ROOT, env=env(), capture_output=True, text=True,
                           timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    resumed = json.loads((tmp_path / "run" / "metrics.json").read_text())
    uninterrupted = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert resumed["steps_this_run"] == 5 and uninterrupted["steps_this_run"] == 20
    for key in ("acc_multimodal", "acc_language", "msi", "cross_rank_rate", "bytes_per_token"):
        assert resumed[key] == uninterrupted[key], key

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ds-smoes").experiment_id])
    states = sorted((r.info.status, r.data.tags.get("end_reason", "")[:22]) for r in runs)
    assert states == [("FINISHED", ""), ("FINISHED", ""), ("KILLED", "interrupted at step 10"),
                      ("KILLED", "its processes stopped ")], states


def test_runs_of_one_recipe_are_named_by_what_their_command_changed():
    from ds_smoes.app.train import named_overrides

    assert named_overrides(["optim.lr=1000", "run.output_dir=/x", "smoes.gate=topk", "smoes.alpha_mi=0",
                            "tracking.enabled=false", "run.seed=3"]) == "lr=1000 alpha_mi=0"
    assert named_overrides([]) == "" and named_overrides(["run.output_dir=/x"]) == ""
    assert len(named_overrides([f"model.f{i}=1" for i in range(40)])) == 80


def test_eval_only_from_a_folder_without_an_export_says_how_to_make_one(tmp_path, capsys):
    (tmp_path / "train_config.json").write_text("{}")   # a run folder, not its export
    _main_fails_cleanly(capsys, ["--init-from", str(tmp_path), "--eval-only"], "no export there",
                        "python -m ds_smoes.export --run")
