"""`run_training`'s hooks for the sweeps, under the DeepSpeed launcher (2 ranks, ep_size 2):
`epoch_callback` after every epoch, and `resume_from` a DeepSpeed checkpoint saved there."""
import pytest

pytestmark = pytest.mark.slow


def test_epoch_callback_and_resume_from_checkpoint(two_rank_scenarios):
    # the scenario trains the small split of sweep_util (10 steps per epoch, 2 epochs)
    reports = two_rank_scenarios.reports("resume_from_checkpoint")
    for rank in range(2):
        rep = reports[rank]
        # the hook runs on every rank after each epoch, with the latest training figures
        assert [c[:2] for c in rep["calls_a"]] == [[1, 10], [2, 20]]
        assert "train/loss" in rep["calls_a"][0][2] and "train/msi" in rep["calls_a"][0][2]
        # resuming from the final checkpoint trains nothing and evaluates the very same model
        for key, (a, b, _) in rep["figures"].items():
            assert a == b, (key, a, b)
        # resuming from epoch 1 trains epoch 2 only, from step 10
        assert rep["calls_c"] == [[2, 20]]
    lines = rep["lines"]
    assert any("resumed from" in l and "epoch 1, step 10/20" in l for l in lines["c"]), lines["c"]
    steps = [l.split("]")[0] for l in lines["c"] if l.startswith("[epoch")]
    assert steps == ["[epoch 2 step 15/20", "[epoch 2 step 20/20"]
    assert any("epoch 2, step 20/20" in l for l in lines["b"]) and not any(l.startswith("[epoch") for l in lines["b"])
