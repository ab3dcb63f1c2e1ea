"""`python -m ds_smoes.bench infer` (issue 21, item 2): the figures from the worker's raw result by hand,
argument errors, the phase split of the worker's meters on a real model, the dense recipe's active parameters,
and the whole command on real ranks (slow: short training of three recipes, ep_size 1 and 2)."""
import json

import pytest
import torch

from ds_smoes.app.evaluation import PrefillClock
from ds_smoes.bench import runs
from ds_smoes.bench.cli import main
from ds_smoes.bench.infer.command import assemble, given_runs, markdown_table, variant_figures, worker_args
from ds_smoes.bench.infer.variants import INFER_VARIANTS, REFERENCE
from ds_smoes.bench.infer.worker import TrafficMeter, active_parameters, variant_train_config
from ds_smoes.core.errors import ConfigError
from launch import ROOT, python_run
from test_generation_cache import EOS, build, prompts
from test_train_cli import write_config

CONFIG = str(ROOT / "configs" / "demo.yaml")


def _raw(prefill, decode, **over):
    raw = {"params": {"active": 1000, "total": 1500}, "moe_layers": 2, "prefill_bytes": 6000.0,
           "decode_bytes": 1200.0, "samples": 8.0, "prompt_tokens": 100.0, "decode_tokens": 24.0,
           "prefill_seconds": prefill, "decode_seconds": decode, "acc_multimodal": 0.5, "acc_language": 1.0,
           "acc_overall": 0.75, "num_multimodal": 4, "num_language": 4}
    return {**raw, **over}


def test_figures_by_hand():
    setup = {"world_size": 2, "batch_size": 4, "new_tokens": 4}     # 8 prompts per round, 8 x 3 decode-fed tokens
    ref = _raw([0.010, 0.020, 0.030], [0.10, 0.10, 0.10])
    new = _raw([0.005, 0.030, 0.015], [0.05, 0.20, 0.08])
    f = variant_figures(new, setup, ref)
    assert f["prefill_ms_per_sample"] == pytest.approx(15.0 / 8)          # median 15 ms over 8 prompts
    assert f["decode_tokens_per_s"] == pytest.approx(24 / 0.08)          # median decode 0.08 s
    assert f["bytes_per_generated_token"] == pytest.approx(1200 / 24)
    assert f["bytes_per_prompt_sample"] == pytest.approx(6000 / 8)
    assert f["bytes_per_prompt_token"] == pytest.approx(6000 / 100)
    # per round: 0.5, 1.5, 0.5 -> median 0.5; 0.5, 2.0, 0.8 -> median 0.8
    assert f["prefill_ratio_vs_ref"]["median"] == pytest.approx(0.5)
    assert f["decode_ratio_vs_ref"]["median"] == pytest.approx(0.8)
    assert "prefill_ratio_vs_ref" not in variant_figures(ref, setup, None)
    dense = variant_figures(_raw([0.01], [0.1], decode_tokens=0.0, samples=0.0, prompt_tokens=0.0), setup, None)
    assert dense["bytes_per_generated_token"] is None and dense["bytes_per_prompt_sample"] is None


def test_assemble_and_table():
    setup = {"world_size": 1, "batch_size": 4, "new_tokens": 3, "batches_per_rank": 1, "warmup": 0, "repeats": 1,
             "dtype": "torch.float32", "device": "cpu"}
    raws = {2: {"setup": {**setup, "world_size": 2}, "variants": {"topk": _raw([0.02], [0.1]),
                                                                   "smoes": _raw([0.01], [0.2])}},
            1: {"setup": setup, "variants": {"topk": _raw([0.02], [0.1])}}}
    result = assemble(raws, {})
    assert list(result["ep_sizes"]) == ["1", "2"] and result["reference"] == REFERENCE
    smoes = result["ep_sizes"]["2"]["variants"]["smoes"]
    assert smoes["prefill_ratio_vs_ref"]["median"] == pytest.approx(0.5)
    assert smoes["decode_ratio_vs_ref"]["median"] == pytest.approx(2.0)
    table = markdown_table(result)
    assert "| 2 | SMoES, rank_once | 1k / 2k | 1.250 | 0.500 | 80 | 2.000 | 50 | 750 | 0.5000 | 1.0000 |" in table
    assert "| 2 | DeepSpeed top-k MoE, stock dispatch | 1k / 2k | 2.500 | 1 (ref) | 160 | 1 (ref) |" in table
    assert table.count("\n") == 1 + 3       # header, rule, three rows


def test_run_arguments():
    assert given_runs(["smoes=runs/demo", "dense=/x"]) == {"smoes": runs.Path("runs/demo"), "dense": runs.Path("/x")}
    with pytest.raises(ConfigError, match="write RECIPE=DIR"):
        given_runs(["runs/demo"])
    with pytest.raises(ConfigError, match="unknown recipe 'moe'"):
        given_runs(["moe=runs/demo"])
    args = type("A", (), dict(config="c.yaml", overrides=["optim.lr=0.1"], variants=["dense", "smoes"], batches=2,
                              new_tokens=5, warmup=1, repeats=3, eval_questions=8))()
    out = worker_args(args, {"dense": {"run_dir": "r/dense"}, "smoes": {"run_dir": "r/s"}}, runs.Path("raw.json"), 16)
    assert out[out.index("--batch-size") + 1] == "16" and out[out.index("--new-tokens") + 1] == "5"
    assert "dense=r/dense/checkpoint" in out and "smoes=r/s/checkpoint" in out and "optim.lr=0.1" in out


@pytest.mark.parametrize("argv, needle", [
    (["--variants", "topk", "moe"], "unknown variant(s) ['moe']"),
    (["--new-tokens", "1"], "--new-tokens must be >= 2"),
    (["--ep-sizes", "0"], "--ep-sizes [0]"),
    (["--run", "smoes"], "write RECIPE=DIR"),
    (["--set", "smoes.ep_size=3"], "ep_size"),
])
def test_bad_arguments_exit_2_with_one_message(argv, needle, capsys, tmp_path):
    assert main(["infer", *argv, "--config", CONFIG, "--no-mlflow", "--no-train", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err


def test_missing_model_with_no_train_is_refused(tmp_path, capsys):
    code = main(["infer", "--config", CONFIG, "--no-mlflow", "--variants", "dense", "--no-train",
                 "--out", str(tmp_path)])
    assert code == 2 and "no trained dense model" in capsys.readouterr().err


def test_variant_configs_and_the_dense_recipe_has_the_moe_models_active_parameters():
    from ds_smoes.model import TinyMoEVLM

    counts = {}
    for key in ("dense", "topk", "smoes-bin1"):
        cfg = variant_train_config(ROOT / "configs" / "demo.yaml", [], INFER_VARIANTS[key], 1)
        assert cfg.smoes.ep_size == 1
        model = TinyMoEVLM(cfg.model, 40, 39, cfg.smoes if cfg.model.moe_layers != "none" else None)
        counts[key] = active_parameters(model)
    assert variant_train_config(ROOT / "configs" / "demo.yaml", [], INFER_VARIANTS["topk"], 2).smoes.dispatch == \
        "deepspeed"
    assert variant_train_config(ROOT / "configs" / "demo.yaml", [], INFER_VARIANTS["smoes-bin1"], 2) \
        .smoes.max_bins_per_token == 1
    assert counts["dense"]["active"] == counts["dense"]["total"]
    assert counts["topk"]["active"] < counts["topk"]["total"]
    # the same weights per token up to biases and the router (within 1 %)
    assert counts["dense"]["active"] == pytest.approx(counts["topk"]["active"], rel=0.01)


@pytest.mark.parametrize("new_tokens", [1, 4])
def test_meters_split_prefill_from_decode(new_tokens):
    """One forward (the prefill: each MoE layer called once) then one decode step per further token."""
    model = build("sdpa", dispatch="rank_once")
    ids, valid, mod, image, has_image = prompts()
    meter, clock = TrafficMeter(model), PrefillClock(model.lm_head, torch.device("cpu"))
    meter.arm()
    t0 = clock.start()
    model.generate(ids, valid, mod, image, has_image, max_new_tokens=new_tokens, eos_id=EOS)
    t2 = clock.now()
    layers = len(model.moe_layers())
    assert meter.calls == {"prefill": layers, "decode": layers * (new_tokens - 1)}
    assert meter.bytes == {"prefill": 0, "decode": 0}          # one process: nothing leaves the rank
    assert len(clock.seconds) == 1 and 0 < clock.seconds[0] <= t2 - t0   # the prefill only, once
    meter.remove()
    clock.remove()
    model.generate(ids, valid, mod, image, has_image, max_new_tokens=2, eos_id=EOS)
    assert meter.calls["decode"] == layers * (new_tokens - 1)   # removed: counts no more


@pytest.mark.slow
def test_infer_end_to_end_at_ep_sizes_1_and_2(tmp_path, digits_dir, demo_run):
    # dense and top-k are trained by the command's recipes (0.05 epochs); SMoES is the demo's run (--run)
    cfg = write_config(tmp_path, digits_dir, run={"eval_every_epoch": False})
    out = tmp_path / "bench"
    demo_run.metrics  # noqa: B018  (the demo finished: its checkpoint is there)
    proc = python_run(["-m", "ds_smoes.bench", "infer", "--config", str(cfg), "--variants", "dense", "topk", "smoes",
                       "--run", f"smoes={demo_run.out}",
                       "--epochs", "0.05", "--batches", "1", "--batch-size", "4", "--new-tokens", "3", "--warmup", "0",
                       "--repeats", "2", "--eval-questions", "8", "--out", str(out), "--no-mlflow"], timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "training the dense model" in proc.stdout and "| 2 | SMoES, rank_once |" in proc.stdout
    assert "training the smoes model" not in proc.stdout and not (out / "smoes-epochs0.05").exists()
    result = json.loads((out / "infer.json").read_text())
    assert (out / "infer.md").read_text().count("| 1 |") == 3
    for ep in ("1", "2"):
        block = result["ep_sizes"][ep]
        s = block["setup"]
        assert s["ep_size"] == s["world_size"] == int(ep) and s["new_tokens"] == 3 and s["batch_size"] == 4
        for key, v in block["variants"].items():
            assert v["prefill_ms_per_sample"] > 0 and v["decode_tokens_per_s"] > 0, key
            assert 0.0 <= v["acc_multimodal"] <= 1.0 and v["num_multimodal"] + v["num_language"] == 8
            moe = key != "dense"
            assert v["moe_layers"] == (2 if moe else 0)
            sent = v["bytes_per_generated_token"] + v["bytes_per_prompt_sample"]
            assert (sent > 0) == (moe and ep == "2"), (ep, key, sent)
        assert block["variants"]["smoes"]["decode_ratio_vs_ref"]["rounds"] == 2
    # rank_once sends a token's vector at most once to the other rank and back, per MoE layer
    d, elt, layers = 64, 4, 2
    ro = result["ep_sizes"]["2"]["variants"]["smoes"]["bytes_per_generated_token"]
    assert 0 < ro <= 2 * d * elt * layers
    assert (out / "dense-epochs0.05" / "checkpoint" / "final").is_dir()
