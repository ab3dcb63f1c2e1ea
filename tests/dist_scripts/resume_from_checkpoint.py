"""Run under `deepspeed --num_gpus 2`: `run_training` with an `epoch_callback` that saves a DeepSpeed
checkpoint after each epoch, then `run_training` again from those checkpoints (`resume_from`).
Each rank writes OUT/rank{r}.json; tests/test_sweep_runner.py asserts on them."""
from pathlib import Path

from rank_report import parse_args, write_report

from ds_smoes.app.session import run_training
from ds_smoes.parallel.launch import init_distributed
from ds_smoes.app.config import load_train_config

FIGURES = ("test_loss", "acc_multimodal", "acc_language", "msi", "cross_rank_rate")


def main() -> None:
    args = parse_args(("--config", {"type": Path, "required": True}))
    init_distributed()
    cfg = load_train_config(args.config, ["tracking.enabled=false", f"run.output_dir={args.out / 'run'}"])
    report = {}

    calls = []

    def save(epoch, step, metrics, engine):
        # one folder on this machine for both ranks, as under the DeepSpeed launcher
        engine.save_checkpoint(str(args.out / f"ckpt_e{epoch}"), client_state={"step": step, "epoch": epoch})
        calls.append([epoch, step, sorted(metrics)])

    lines = {"a": [], "b": [], "c": []}
    a = run_training(cfg, log=lines["a"].append, epoch_callback=save)
    report["calls_a"] = calls
    # from the last checkpoint: nothing left to train, so the evaluation sees the saved state exactly
    b = run_training(cfg, log=lines["b"].append, resume_from=args.out / "ckpt_e2")
    # from the epoch-1 checkpoint: only epoch 2's steps are trained
    calls_c = []
    c = run_training(cfg, log=lines["c"].append, resume_from=args.out / "ckpt_e1",
                     epoch_callback=lambda e, s, m, eng: calls_c.append([e, s]))
    report.update(calls_c=calls_c, figures={k: [a[k], b[k], c[k]] for k in FIGURES}, lines=lines)
    write_report(args.out, report)


if __name__ == "__main__":
    main()
