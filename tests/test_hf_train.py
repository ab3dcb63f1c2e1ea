"""`--hf-model` end to end: a tiny Qwen3-VL-MoE trains on 2 gloo ranks with ep_size 2 and ZeRO-2 through the
training command, logs to MLflow, checkpoints, exports; the export loads in transformers; a resumed run
restores every weight from the checkpoint; at ZeRO 0 the experts move onto their bins' ranks when the
bins freeze, as in the built-in model's run (the same session code).  The three runs are the hf_train scenario
of tests/dist_scripts/ (the command's `main` on each of 2 DeepSpeed-launched ranks, in the session's one launch)."""
import json

import pytest
import torch

import hf_tiny

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(two_rank_scenarios):
    """(folder, exit codes, console of run1..run3 on rank 0)"""
    (report, _) = two_rank_scenarios.reports("hf_train")
    tmp = two_rank_scenarios.out / "hf_train"
    consoles = {run: (tmp / f"{run}.rank0.out").read_text() for run in ("run1", "run2", "run3")}
    return tmp, report["exit_codes"], consoles


def test_trains_with_expert_parallelism_logs_to_mlflow_and_exports(trained):
    from transformers import AutoModelForImageTextToText

    tmp, codes, _ = trained
    assert codes["run1"] == 0
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

    tmp, codes, consoles = trained
    # max_steps 4 = the checkpoint's step: nothing left to train, so the export is the restored model
    assert codes["run2"] == 0, consoles["run2"][-3000:]
    assert "resumed from" in consoles["run2"] and "step 4/4" in consoles["run2"]
    first = load_file(tmp / "run1" / "hf_export" / "model.safetensors")
    again = load_file(tmp / "run2" / "hf_export" / "model.safetensors")
    assert set(first) == set(again)
    assert all(torch.equal(first[k], again[k]) for k in first)
    m1 = json.loads((tmp / "run1" / "metrics.json").read_text())
    m2 = json.loads((tmp / "run2" / "metrics.json").read_text())
    assert m2["steps_this_run"] == 0 and m2["test_loss"] == pytest.approx(m1["test_loss"], abs=1e-6)


def test_experts_are_placed_when_the_bins_freeze_and_the_run_reports_like_the_demo(trained):
    tmp, codes, consoles = trained
    out = consoles["run3"]
    assert codes["run3"] == 0, out[-3000:]
    assert "placement at step 2 (bins frozen): moved" in out, out[-3000:]
    assert "[epoch 2 step 4/4]" in out and " MI " in out and "eta " in out  # 2 steps an epoch
    assert "== results (held-out test split)" in out and "MLflow run " in out
    metrics = json.loads((tmp / "run3" / "metrics.json").read_text())
    assert metrics["zero_stage"] == 0 and metrics["steps"] == 4
    assert metrics["num_experts"] == 4 and metrics["k"] == 2   # read from the model, not the config defaults
    assert (tmp / "run3" / "expert_modality_heatmap.png").is_file()
    import mlflow

    run = mlflow.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}").get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "placement/experts_moved" in run.data.metrics
