"""DeepSpeed's AutoEP with the transformers the project pins (issue 33, item 1): the `expert_parallel` section
initialises and trains a tiny Qwen3-MoE on 2 gloo ranks.  It fails when an upgrade of transformers breaks AutoEP's
initialisation again (5.23 changed the output-capture registry DeepSpeed 0.19.8 writes to; pyproject.toml pins
below it)."""
import math

import pytest


@pytest.mark.slow
def test_autoep_trains_a_tiny_qwen3_moe_on_two_ranks(two_rank_scenarios):
    reports = two_rank_scenarios.reports("autoep")
    assert [r["rank"] for r in reports] == [0, 1]
    for r in reports:
        assert r["layers"] == ["AutoEPMoELayer"], r      # the Hugging Face MoE blocks were replaced
        assert r["finite"] and len(r["losses"]) == 3, r
        assert all(math.isclose(r["losses"][0], l, rel_tol=0.2) for l in r["losses"])   # a random model: ~ln(64)
        assert math.isclose(r["losses"][0], math.log(64), rel_tol=0.1), r
    # the same batch on both ranks, one model replicated but for its experts: the same loss on both
    assert reports[0]["losses"] == reports[1]["losses"]
