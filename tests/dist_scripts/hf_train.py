"""Run under `deepspeed --num_gpus 2`: the `--hf-model` training command (`ds_smoes.app.train.main`, what
`deepspeed --module ds_smoes.train --hf-model ...` runs on each rank) on a tiny random Qwen3-VL-MoE, three times:
run1 trains 4 steps with ZeRO-2 and logs to MLflow; run2 resumes from run1's checkpoint (nothing left to train);
run3 trains at ZeRO 0 with bins that freeze at step 2, so the experts move.  Each run's console goes to
OUT/<run>.rank{r}.out and its exit status into OUT/rank{r}.json; tests/test_hf_train.py asserts on them."""
import contextlib
from pathlib import Path

from rank_report import parse_args, write_report

from ds_smoes.parallel import distributed
from ds_smoes.parallel.launch import init_distributed

ROOT = Path(__file__).resolve().parents[2]
CONFIG = """
data: {{train_json: data/data.json, val_json: null, test_json: data/data.json, image_folder: data,
        generate_digits: false}}
smoes: {{num_bins: 2, ep_size: 2, score_type: attention, alpha_mi: 0.01, {smoes}}}
optim: {{max_steps: 4, micro_batch_size: 4, lr: 0.002, warmup_steps: 1}}
run: {{output_dir: {out}, eval_batch_size: 8, max_new_tokens: 2, log_every: 2, deepspeed_config: {ds}}}
hf: {{image_size: 16}}
"""


def train(tmp: Path, out: str, *extra: str, ds: str = "cpu_zero2.json", smoes: str = "binning: adaptive") -> int:
    from ds_smoes.app.train import main as train_main

    if distributed.rank() == 0:
        (tmp / f"{out}.yaml").write_text(CONFIG.format(out=tmp / out, ds=ROOT / "ds_configs" / ds, smoes=smoes))
    distributed.barrier()
    with open(tmp / f"{out}.rank{distributed.rank()}.out", "w") as console, contextlib.redirect_stdout(console):
        return train_main(["--hf-model", str(tmp / "model"), "--config", str(tmp / f"{out}.yaml"), *extra])


def tiny_model_and_data(tmp: Path) -> None:
    """A tiny random Qwen3-VL-MoE (save_pretrained) in tmp/model and LLaVA-format data in tmp/data, written by rank 0
    (every rank waits for them)."""
    from ds_smoes.hf import tiny as hf_tiny

    if distributed.rank() == 0:
        hf_tiny.save_tiny_qwen3_vl_moe(tmp / "model")
        hf_tiny.write_tiny_llava_data(tmp / "data")
    distributed.barrier()


def main() -> None:
    args = parse_args()
    init_distributed()
    tmp = args.out
    tiny_model_and_data(tmp)
    mlflow = ("--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--experiment", "hf-test")
    codes = {"run1": train(tmp, "run1", *mlflow)}
    codes["run2"] = train(tmp, "run2", "--no-mlflow", "--set", f"hf.resume_from={tmp / 'run1' / 'checkpoint'}")
    codes["run3"] = train(tmp, "run3", *mlflow, ds="cpu_ep.json",
                          smoes="placement: bins, binning: adaptive, rebin_interval: 1, rebin_freeze_step: 2")
    write_report(tmp, {"exit_codes": codes})


if __name__ == "__main__":
    main()
