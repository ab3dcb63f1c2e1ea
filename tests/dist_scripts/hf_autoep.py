"""Run under `deepspeed --num_gpus 2`: the `--hf-model` training command with `hf.backend: autoep` on a tiny random
Qwen3-VL-MoE: DeepSpeed's AutoEP replaces the text backbone's MoE blocks (ds_configs/cpu_autoep.json), the SMoES
gate is put on them, 4 steps with bins frozen at step 2 (the experts move), MLflow in OUT/mlflow.db.  The console goes
to OUT/autoep.rank{r}.out, the exit status into OUT/rank{r}.json; tests/test_autoep.py asserts on them."""
from hf_train import tiny_model_and_data, train
from rank_report import parse_args, write_report

from ds_smoes.parallel.launch import init_distributed


def main() -> None:
    args = parse_args()
    init_distributed()
    tmp = args.out
    tiny_model_and_data(tmp)
    code = train(tmp, "autoep", "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--experiment", "hf-autoep",
                 "--set", "hf.backend=autoep", "--set", "hf.export=false", "--set", "smoes.dispatch=rank_once",
                 ds="cpu_autoep.json",
                 smoes="placement: bins, binning: adaptive, rebin_interval: 1, rebin_freeze_step: 2")
    write_report(tmp, {"exit_code": code})


if __name__ == "__main__":
    main()
