"""Real 2-rank gloo runs with expert parallelism (ep_size 2) under the DeepSpeed launcher (the scenarios
ckpt_roundtrip and all_gates of tests/dist_scripts/scenarios.py, run once per test session)."""
import math

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("score_type", ["gaussian", "attention"])
def test_train_checkpoint_reload_identical_smoes_buffers(two_rank_scenarios, score_type):
    reports = two_rank_scenarios.reports(f"ckpt_roundtrip-{score_type}")
    for rep in reports:
        losses = rep["losses"]
        assert len(losses) == 6 and all(math.isfinite(l) for l in losses), losses
        # a fresh model predicts about uniformly over the script's 20-token vocabulary, and 6 AdamW steps
        # (lr 1e-2) on this rank's own batches bring the loss down
        assert abs(losses[0] - math.log(20)) < 0.5 and sum(losses[-3:]) / 3 < losses[0], losses
        smoes_keys = [k for k in rep["compared"] if ".binning." in k or ".scorer." in k]
        assert any(k.endswith("bin_E") for k in smoes_keys)
        if score_type == "gaussian":
            assert any(k.endswith("scorer.mean_MD") for k in smoes_keys)
        # a freshly initialised engine differs in every buffer that carries training state ...
        assert {k for k in smoes_keys if k.endswith(("load_ema_ME", "binning.step", "mean_MD", "var_MD"))} \
            <= set(rep["differed_before_load"])
        # ... and the checkpoint restores all of them, the expert weights and the outputs exactly
        assert rep["mismatched_after_load"] == []
        assert rep["max_logit_diff"] == 0.0
        assert rep["buffers_equal_across_ranks"]
        assert rep["binning_steps"] == [6]


def test_every_gate_trains_on_two_ranks_with_expert_parallelism(two_rank_scenarios):
    reports = two_rank_scenarios.reports("all_gates")
    expected_class = {"smoes": "SMoESGate", "smoes-kl": "SMoESGate", "topk": "DeepSpeedTopKGate",
                      "hard": "ModalitySplitGate", "hybrid": "ModalitySplitGate", "ltdr": "LTDRGate",
                      "smar": "SMARGate", "smoes-rank-once": "SMoESGate"}
    for r in range(2):
        report = reports[r]
        assert set(report) == set(expected_class)
        for name, rep in report.items():
            assert rep["finite"] and len(rep["losses"]) == 3, (name, rep)
            assert rep["gate_class"] == expected_class[name]
            assert rep["routed"] >= rep["num_tokens"] > 0  # every valid token reached >= 1 expert
            assert rep["dispatch"] == ("rank_once" if name == "smoes-rank-once" else "deepspeed")
            assert rep["remote_bytes"] > 0  # ep_size 2: both dispatches send to the other rank
        assert "mi" in report["smoes"]["losses_logged"] and "bin_kl" in report["smoes-kl"]["losses_logged"]
        assert "tail_share" in report["ltdr"]["losses_logged"] and "modality_kl" in report["smar"]["losses_logged"]


def test_the_scenario_launch_exits_cleanly(two_rank_scenarios):
    # every scenario's test reads its reports; the launch itself must also end well (each script, run alone, was
    # checked for exit status 0): no rank failed, and none crashed while tearing down its process group
    for name in two_rank_scenarios.names():
        two_rank_scenarios.reports(name)
    assert two_rank_scenarios.proc.returncode == 0, two_rank_scenarios.output()
