"""`--hf-model` end to end: a tiny Qwen3-VL-MoE trains on 2 gloo ranks with ep_size 2 and ZeRO-2 through the
DeepSpeed launcher, logs to MLflow, checkpoints, exports; the export loads in transformers; a resumed run
restores every weight from the checkpoint; at ZeRO 0 the experts move onto their bins' ranks when the
bins freeze, as in the built-in model's run (the same session code)."""
import json
from pathlib import Path

import pytest
import torch

import hf_tiny
from launch import ROOT, deepspeed_run

pytestmark = pytest.mark.slow

CONFIG = """
data: {{train_json: data/data.json, val_json: null, test_json: data/data.json, image_folder: data,
        generate_digits: false}}
smoes: {{num_bins: 2, ep_size: 2, score_type: attention, alpha_mi: 0.01, {smoes}}}
optim: {{max_steps: 4, micro_batch_size: 4, lr: 0.002, warmup_steps: 1}}
run: {{output_dir: {out}, eval_batch_size: 8, max_new_tokens: 2, log_every: 2, deepspeed_config: {ds}}}
hf: {{image_size: 16}}
"""


def _launch(tmp: Path, out: str, *extra: str, ds: str = "cpu_zero2.json", smoes: str = "binning: adaptive"):
    (tmp / f"{out}.yaml").write_text(CONFIG.format(out=out, ds=ROOT / "ds_configs" / ds, smoes=smoes))
    return deepspeed_run(["--module", "ds_smoes.train", "--hf-model", str(tmp / "model"),
                          "--config", str(tmp / f"{out}.yaml"), *extra], timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf_train")
    hf_tiny.save_tiny_qwen3_vl_moe(tmp / "model")
    hf_tiny.write_tiny_llava_data(tmp / "data")
    proc = _launch(tmp, "run1", "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--experiment", "hf-test")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return tmp, proc


def test_trains_with_expert_parallelism_logs_to_mlflow_and_exports(trained):
    from transformers import AutoModelForImageTextToText

    tmp, proc = trained
    metrics = json.loads((tmp / "run1" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["ep_size"] == 2 and metrics["world_size"] == 2
    assert metrics["zero_stage"] == 2 and metrics["hf_model_type"] == "qwen3_vl_moe"
    assert metrics["final_train_loss"] > 0 and metrics["test_loss"] > 0
    assert 0 < metrics["cross_rank_rate"] <= 1   # tokens really went to the other EP rank
    ckpt = tmp / "run1" / "checkpoint" / "final"
    assert sorted(p.name for p in ckpt.glob("layer_*_expert_*_model_states.pt")) == [
        f"layer_{l}_expert_{e}_mp_rank_00_model_states.pt" for l in range(2) for e in range(4)]

    import mlflow

    run = mlflow.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}").get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["hf.model_type"] == "qwen3_vl_moe"
    assert {"train/loss", "train/aux_loss", "train/cross_rank_rate", "test_loss"} <= set(run.data.metrics)
    assert run.data.params["smoes.num_experts"] == "4" and run.data.params["smoes.ep_size"] == "2"

    export = tmp / "run1" / "hf_export"
    back = AutoModelForImageTextToText.from_pretrained(export).eval()
    initial = AutoModelForImageTextToText.from_pretrained(tmp / "model").eval()
    assert type(back).__name__ == "Qwen3VLMoeForConditionalGeneration"
    assert set(back.state_dict()) == set(initial.state_dict())
    trained_experts = back.model.language_model.layers[0].mlp.experts.down_proj
    assert not torch.equal(trained_experts, initial.model.language_model.layers[0].mlp.experts.down_proj)
    batch = hf_tiny.batch_for("qwen3_vl_moe")
    with torch.no_grad():
        assert torch.isfinite(back(**batch).logits).all()
    assert (export / "tokenizer.json").is_file() and (export / "chat_template.jinja").is_file()
    from transformers import AutoImageProcessor, AutoTokenizer   # what README says loads here

    assert AutoTokenizer.from_pretrained(export).pad_token is not None
    assert type(AutoImageProcessor.from_pretrained(export)).__name__.startswith("Qwen2VLImageProcessor")


def test_resumed_run_restores_every_weight_from_the_checkpoint(trained):
    from safetensors.torch import load_file

    tmp, _ = trained
    # max_steps 4 = the checkpoint's step: nothing left to train, so the export is the restored model
    proc = _launch(tmp, "run2", "--no-mlflow", "--set", f"hf.resume_from={tmp / 'run1' / 'checkpoint'}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "resumed from" in proc.stdout and "step 4/4" in proc.stdout
    first = load_file(tmp / "run1" / "hf_export" / "model.safetensors")
    again = load_file(tmp / "run2" / "hf_export" / "model.safetensors")
    assert set(first) == set(again)
    assert all(torch.equal(first[k], again[k]) for k in first)
    m1 = json.loads((tmp / "run1" / "metrics.json").read_text())
    m2 = json.loads((tmp / "run2" / "metrics.json").read_text())
    assert m2["steps_this_run"] == 0 and m2["test_loss"] == pytest.approx(m1["test_loss"], abs=1e-6)


def test_experts_are_placed_when_the_bins_freeze_and_the_run_reports_like_the_demo(trained):
    tmp, _ = trained
    proc = _launch(tmp, "run3", "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--experiment", "hf-test",
                   ds="cpu_ep.json", smoes="placement: bins, binning: adaptive, rebin_interval: 1, rebin_freeze_step: 2")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "placement at step 2 (bins frozen): moved" in proc.stdout, proc.stdout[-3000:]
    assert "[epoch 2 step 4/4]" in proc.stdout and " MI " in proc.stdout and "eta " in proc.stdout  # 2 steps an epoch
    assert "== results (held-out test split)" in proc.stdout and "MLflow run " in proc.stdout
    metrics = json.loads((tmp / "run3" / "metrics.json").read_text())
    assert metrics["zero_stage"] == 0 and metrics["steps"] == 4
    assert metrics["num_experts"] == 4 and metrics["k"] == 2   # read from the model, not the config defaults
    assert (tmp / "run3" / "expert_modality_heatmap.png").is_file()
    import mlflow

    run = mlflow.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}").get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "placement/experts_moved" in run.data.metrics
