"""Train and evaluate a small MoE-VLM with the SMoES gate under DeepSpeed.

    deepspeed --num_gpus 2 -m ds_smoes.train --config configs/demo.yaml      # 2 ranks, ep_size 2
    python -m ds_smoes.train --config configs/demo.yaml --set smoes.ep_size=1  # one process
    python -m ds_smoes.train --init-from runs/demo/export --eval-only           # evaluate an export

Prints progress, evaluates exact-match accuracy separately on multimodal and language-only
held-out questions, and reports tokens/s, MSI and the routing communication figures; every
run is logged to MLflow (SQLite store `mlflow.db` in the working directory unless
--tracking-uri says otherwise).  Errors a user can fix print one message and exit 2.
"""
from __future__ import annotations

import argparse
import atexit
import os
import socket
import sys
from pathlib import Path

from ds_smoes.errors import SMoESError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ds_smoes.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None, help="YAML or JSON training config (default: built-in)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field, e.g. --set smoes.num_bins=4 (repeatable)")
    p.add_argument("--output-json", type=Path, default=None, help="write the final figures to this JSON file")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///$PWD/mlflow.db)")
    p.add_argument("--experiment", default=None, help="MLflow experiment name")
    p.add_argument("--run-name", default=None, help="MLflow run name")
    p.add_argument("--parent-run-id", default=None, help="nest this run under an MLflow parent run")
    p.add_argument("--init-from", type=Path, default=None, metavar="EXPORT_DIR",
                   help="start from a deployment export (python -m ds_smoes.export); without --config, its "
                        "train_config.json is the config")
    p.add_argument("--eval-only", action="store_true", help="evaluate without training (with --init-from)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--hf-model", default=None, metavar="PATH_OR_CONFIG",
                   help="fine-tune a Hugging Face VLM (save_pretrained folder or config JSON) converted to SMoES "
                        "(docs/hf.md); the config then has an `hf` section instead of `model`")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # DeepSpeed launcher
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Join the launcher's process group, or make a 1-process gloo group when run directly."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    limit_threads_per_rank()
    no_shm_allreduce_segments()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    atexit.unregister(destroy_process_group_at_exit)  # once, however often this is called
    atexit.register(destroy_process_group_at_exit)


def destroy_process_group_at_exit() -> None:
    """Tear the process group down while the interpreter is still whole (registered by `init_distributed`).

    A rank that exits with the group alive leaves gloo's worker threads holding finished async
    work (the rank_once count exchange is one) until interpreter finalisation, where releasing
    their tensors can abort the process ("terminate called without an active exception", exit
    code -6): a finished run then fails under the launcher, now and then.  Calling it twice, or
    after the script destroyed the group itself, does nothing."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def no_shm_allreduce_segments() -> None:
    """Keep DeepSpeed's CPU backend from creating its shared-memory all-reduce workspace.

    When LOCAL_SIZE (set by DeepSpeed's launcher) equals the world size, DeepSpeed 0.19.8's CPU
    comm op creates a 69 MB /dev/shm segment per rank for its inference all-reduce and never
    unlinks it: every 2-rank run left 138 MB of RAM behind until reboot (a day of test runs filled
    17 GB and got Ray workers OOM-killed).  Nothing here uses that all-reduce (training runs on
    gloo), so the variable is dropped before the backend starts."""
    os.environ.pop("LOCAL_SIZE", None)


def limit_threads_per_rank() -> None:
    """Share the CPU cores among the ranks on this machine (unless OMP_NUM_THREADS says otherwise).

    Each rank otherwise starts one intra-op thread per core; with 2 ranks on 2 cores that
    oversubscription made training 6x slower."""
    import torch

    if "OMP_NUM_THREADS" in os.environ:
        return
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_ranks)))


def log0(*args) -> None:
    from ds_smoes import distributed

    if distributed.rank() == 0:
        print(*args, flush=True)


def with_tracking_args(cfg, args: argparse.Namespace):
    """The config with --tracking-uri, --experiment, --run-name and --no-mlflow applied (any config
    with a `tracking` section: TrainConfig, HFTrainConfig)."""
    tracking = cfg.tracking.model_copy(update={
        k: v for k, v in (("tracking_uri", args.tracking_uri), ("experiment", args.experiment),
                          ("run_name", args.run_name)) if v is not None})
    if args.no_mlflow:
        tracking = tracking.model_copy(update={"enabled": False})
    return cfg.model_copy(update={"tracking": tracking})


def report_error(err: SMoESError) -> int:
    """Print a user-fixable error once (on rank 0), without a traceback; the exit status is 2."""
    from ds_smoes import distributed

    if distributed.rank() == 0:
        print(f"error: {err}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.hf_model is not None:  # a Hugging Face VLM converted to SMoES (ds_smoes.hf, docs/hf.md)
            from ds_smoes.hf.train import main_hf

            main_hf(args, init_distributed=init_distributed, log=log0)
            return 0
        from ds_smoes.train_config import load_train_config

        config, overrides = args.config, args.overrides
        if config is None and args.init_from is not None:  # the export's own config; outputs beside it
            config = args.init_from / "train_config.json"
            overrides = [f"run.output_dir={(args.init_from / 'eval').resolve()}", *overrides]
        cfg = with_tracking_args(load_train_config(config, overrides), args)
        from ds_smoes.runner import run_training

        run_training(cfg, output_json=args.output_json, parent_run_id=args.parent_run_id,
                     init_distributed=init_distributed, log=log0, init_from=args.init_from,
                     eval_only=args.eval_only)
    except SMoESError as err:
        return report_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
