"""Run under `deepspeed --num_gpus 2`: the demo recipe on the small split (sweep_util), 30 steps with one rebin at
step 25, trained three ways by `run_training` (the training command's session): plainly, under DeepSpeed's
activation checkpointing (`model.activation_checkpointing`), and in DeepSpeed's bf16 (`ds_configs/bf16.json`,
placement off: that optimizer keeps its state in flat buffers).  Each rank writes OUT/rank{r}.json with each
run's final figures; tests/test_train_cli.py compares them."""
from pathlib import Path

from rank_report import parse_args, write_report

from ds_smoes.app.config import load_train_config
from ds_smoes.app.session import run_training
from ds_smoes.parallel.launch import init_distributed

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = {"plain": [], "checkpointed": ["model.activation_checkpointing=true"],
            "bf16": [f"run.deepspeed_config={ROOT / 'ds_configs' / 'bf16.json'}", "smoes.placement=none"]}


def main() -> None:
    args = parse_args(("--config", {"type": Path, "required": True}))
    init_distributed()
    report = {}
    for name, sets in VARIANTS.items():
        cfg = load_train_config(args.config, ["tracking.enabled=false", f"run.output_dir={args.out / name}",
                                              "optim.max_steps=30", "run.log_every=10", *sets])
        report[name] = run_training(cfg, log=lambda *a: None)
    write_report(args.out, report)


if __name__ == "__main__":
    main()
