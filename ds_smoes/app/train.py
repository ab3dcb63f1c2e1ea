"""Train and evaluate a small MoE-VLM with the SMoES gate under DeepSpeed.

    deepspeed --num_gpus 2 --module ds_smoes.train --config configs/demo.yaml      # 2 ranks, ep_size 2
    python -m ds_smoes.train --config configs/demo.yaml --set smoes.ep_size=1  # one process
    python -m ds_smoes.train --init-from runs/demo/export --eval-only           # evaluate an export (1 process)
    python -m ds_smoes.train --config configs/demo.yaml --set smoes.ep_size=1 --resume-from runs/demo/checkpoint

Prints progress, evaluates exact-match accuracy separately on multimodal and language-only
held-out questions, and reports tokens/s, MSI and the routing communication figures; every
run is logged to MLflow (SQLite store `mlflow.db` in the working directory unless
--tracking-uri says otherwise).  Errors a user can fix print one message and exit 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ds_smoes.core.errors import ConfigError, RunInterrupted, SMoESError
from ds_smoes.parallel.console import log0, report_error  # noqa: F401 (report_error: for the commands that import it here)
from ds_smoes.parallel.launch import init_distributed


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
    p.add_argument("--resume-from", type=Path, default=None, metavar="CHECKPOINT_DIR",
                   help="continue training from a DeepSpeed checkpoint folder (e.g. RUN/checkpoint; its 'latest' tag); "
                        "one saved at another smoes.ep_size is converted first (fp32, ZeRO stage 0; "
                        "python -m ds_smoes.reshard does it by hand)")
    p.add_argument("--eval-only", action="store_true", help="evaluate without training (with --init-from)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--hf-model", default=None, metavar="PATH_OR_CONFIG",
                   help="fine-tune a Hugging Face VLM (save_pretrained folder or config JSON) converted to SMoES "
                        "(docs/hf.md); the config then has an `hf` section instead of `model`")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # DeepSpeed launcher
    return p.parse_args(argv)


def with_tracking_args(cfg, args: argparse.Namespace):
    """The config with --tracking-uri, --experiment, --run-name and --no-mlflow applied (any config
    with a `tracking` section: TrainConfig, HFTrainConfig)."""
    tracking = cfg.tracking.model_copy(update={
        k: v for k, v in (("tracking_uri", args.tracking_uri), ("experiment", args.experiment),
                          ("run_name", args.run_name)) if v is not None})
    if args.no_mlflow:
        tracking = tracking.model_copy(update={"enabled": False})
    return cfg.model_copy(update={"tracking": tracking})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from ds_smoes.app.session import run_session

        if args.hf_model is not None:  # a Hugging Face VLM converted to SMoES (ds_smoes.hf, docs/hf.md)
            from ds_smoes.app.hf_config import load_hf_train_config
            from ds_smoes.app.hf_family import HFFamily

            cfg = with_tracking_args(load_hf_train_config(args.config, args.overrides, args.hf_model), args)
            family = HFFamily(cfg)
            resume_from = args.resume_from or cfg.hf.resume_from
        else:
            from ds_smoes.app.builtin import BuiltinFamily
            from ds_smoes.app.config import load_train_config

            config, overrides = args.config, args.overrides
            if config is None and args.init_from is not None:  # the export's own config; outputs beside it
                if not (args.init_from / "model.pt").is_file():
                    raise ConfigError(f"--init-from {args.init_from}: no export there (no model.pt); make one from a "
                                      f"finished run with `python -m ds_smoes.export --run RUN_DIR` (it writes "
                                      "RUN_DIR/export), then pass that folder")
                config = args.init_from / "train_config.json"
                given = [o.split("=", 1)[1].strip() for o in overrides if o.split("=", 1)[0].strip() == "smoes.ep_size"]
                # an export loads at any ep_size that keeps its bins whole: by default, one rank per process
                ep = given[-1] if given else os.environ.get("WORLD_SIZE", "1")
                if not given:
                    overrides = [f"smoes.ep_size={ep}", *overrides]
                # each layout's evaluation its own folder: one at ep 2 does not overwrite one at ep 1
                overrides = [f"run.output_dir={(args.init_from / f'eval-ep{ep}').resolve()}", *overrides]
            cfg = with_tracking_args(load_train_config(config, overrides), args)
            family = BuiltinFamily(cfg, init_from=args.init_from)
            if cfg.tracking.run_name is None and named_overrides(args.overrides):
                # runs of one recipe told apart in the MLflow runs table by what this command changed
                name = f"{family.run_name()} {named_overrides(args.overrides)}"
                cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"run_name": name})})
                family = BuiltinFamily(cfg, init_from=args.init_from)
            resume_from = args.resume_from or interrupted_run(cfg)
        run_session(family, output_json=args.output_json, parent_run_id=args.parent_run_id,
                    init_distributed=init_distributed, log=log0, resume_from=resume_from, eval_only=args.eval_only)
    except RunInterrupted as err:
        report_error(err, prefix="")
        return 130
    except SMoESError as err:
        return report_error(err)
    return 0


# --set keys that say where things go, not what the run is: left out of its MLflow name
_PLACES = ("run.output_dir", "run.deepspeed_config", "tracking.", "data.train_json", "data.val_json",
           "data.test_json", "data.image_folder", "run.seed", "smoes.gate", "smoes.score_type", "smoes.num_bins",
           "smoes.k")


def named_overrides(overrides: list[str], width: int = 80) -> str:
    """The `--set` items that change what a run is (not where it writes, nor what its name already says: gate,
    score, bins, k, seed), shortened to their last key: `optim.lr=0.01 smoes.alpha_mi=0` -> `lr=0.01 alpha_mi=0`."""
    items = []
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.strip()
        if not any(key == p or (p.endswith(".") and key.startswith(p)) for p in _PLACES):
            items.append(f"{key.rsplit('.', 1)[-1]}={value.strip()}")
    text = " ".join(items)
    return text if len(text) <= width else text[:width - 3] + "..."


def interrupted_run(cfg) -> Path | None:
    """`run.output_dir/checkpoint` when it holds a run this command did not finish (its `latest` tag is
    `interrupted`, saved on Ctrl-C or SIGTERM, or `periodic`, saved every run.checkpoint_every_minutes): the
    same command resumes it.  ConfigError when that run had other settings."""
    ckpt = Path(cfg.run.output_dir) / "checkpoint"
    latest = ckpt / "latest"
    if not latest.is_file() or latest.read_text().strip() not in ("interrupted", "periodic"):
        return None
    saved = Path(cfg.run.output_dir) / "train_config.json"
    if saved.is_file():
        import json

        def settings(text_or_cfg) -> dict:
            data = json.loads(text_or_cfg) if isinstance(text_or_cfg, str) else json.loads(text_or_cfg.model_dump_json())
            data.pop("tracking", None)
            return data

        if settings(saved.read_text()) != settings(cfg):
            raise ConfigError(f"{ckpt} holds an interrupted run with other settings than these: run the command that "
                              f"started it to resume it, pass --resume-from {ckpt} to continue it with these, or set "
                              "run.output_dir to another folder (or remove that one) to start afresh")
    if int(os.environ.get("RANK", "0")) == 0:   # before the process group: the launcher's rank
        print(f"resuming the interrupted run in {ckpt}", flush=True)
    return ckpt


if __name__ == "__main__":
    sys.exit(main())
