"""Run under `deepspeed --num_gpus 2`: sparse upcycling through the training session.  A dense run of the demo
recipe (model.moe_layers none, 20 steps on the small split) saves its checkpoint; the MoE run with
model.start_from = that run is evaluated before any training (ep_size 2, the rank_once dispatch), then trained
10 steps.  Each rank writes OUT/rank{r}.json with the three runs' figures and the upcycling log line;
tests/test_upcycle.py compares them (the upcycled model computes the dense model's function)."""
from pathlib import Path

from rank_report import parse_args, write_report

from ds_smoes.app.config import load_train_config
from ds_smoes.app.session import run_training
from ds_smoes.parallel.launch import init_distributed

FIGURES = ("test_loss", "acc_multimodal", "acc_language", "acc_overall")


def main() -> None:
    args = parse_args(("--config", {"type": Path, "required": True}))
    init_distributed()
    common = ["tracking.enabled=false", "smoes.dispatch=rank_once"]
    dense_dir = args.out / "dense"
    dense = run_training(load_train_config(args.config, [*common, f"run.output_dir={dense_dir}",
                                                         "model.moe_layers=none", "run.save_checkpoint=true"]),
                         log=lambda *a: None)
    lines = []
    moe = [*common, f"model.start_from={dense_dir}"]
    before = run_training(load_train_config(args.config, [*moe, f"run.output_dir={args.out / 'moe0'}"]),
                          log=lines.append, eval_only=True)
    trained = run_training(load_train_config(args.config, [*moe, f"run.output_dir={args.out / 'moe'}",
                                                           "optim.max_steps=10"]), log=lambda *a: None)
    write_report(args.out, {"dense": {k: dense[k] for k in FIGURES},
                            "upcycled": {k: before[k] for k in (*FIGURES, "msi", "bytes_per_token")},
                            "trained": {k: trained[k] for k in (*FIGURES, "steps")},
                            "lines": [str(line) for line in lines if "upcycled from" in str(line)]})


if __name__ == "__main__":
    main()
