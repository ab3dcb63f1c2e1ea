"""DeepSpeed's AutoEP with the transformers the project pins (issue 33, item 1): the `expert_parallel` section
initialises and trains a tiny Qwen3-MoE on 2 gloo ranks.  It fails when an upgrade of transformers breaks AutoEP's
initialisation again (5.23 changed the output-capture registry DeepSpeed 0.19.8 writes to; pyproject.toml pins
below it)."""
import math

import pytest
import torch
from torch import nn


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


# -- the ds-smoes gate on AutoEP's layers (issue 33, items 2-5): tests/dist_scripts/autoep_smoes.py --------------
@pytest.fixture(scope="module")
def smoes_on_autoep(two_rank_scenarios):
    reports = two_rank_scenarios.reports("autoep_smoes")
    assert [r["rank"] for r in reports] == [0, 1]
    return reports


@pytest.mark.slow
def test_the_adopted_layer_computes_what_autoep_computed_with_both_dispatches(smoes_on_autoep):
    for r in smoes_on_autoep:
        assert r["layers"] == ["SMoESAutoEPLayer"]
        pair, once = r["parity"]["deepspeed"], r["parity"]["rank_once"]
        assert pair["max_abs_diff"] < 1e-5 and once["max_abs_diff"] < 1e-5, r["parity"]
        assert pair["dispatch"] == "autoep" and once["dispatch"] == "rank_once"
        # 32 tokens of 64 float32: AutoEP sends one row per (token, remote expert) pair, rank_once one per
        # (token, remote rank); a token with both experts on the other rank costs AutoEP two rows, rank_once one
        assert pair["remote_bytes"] % (64 * 4) == 0 and once["remote_bytes"] % (64 * 4) == 0
        assert once["remote_bytes"] < pair["remote_bytes"]
        assert once["ranks_per_token"] == pair["ranks_per_token"]   # the same routes


@pytest.mark.slow
def test_smoes_trains_through_autoep_bins_freeze_experts_move_and_the_mi_loss_separates(smoes_on_autoep):
    first, second = smoes_on_autoep
    assert first["losses"] == second["losses"]          # the same batches: one model, its experts split over ranks
    assert all(math.isfinite(l) for l in first["losses"])
    assert first["frozen"] and first["placed"] and first["placed_at"] == 3   # bins frozen at step 4 (0-based 3)
    assert first["experts_moved"] > 0 and first["physical_E"] == second["physical_E"]
    assert any(p != list(range(8)) for p in first["physical_E"])
    # the MI term moves the modality routing apart: over the last 3 steps, the MI is well above the same run's
    # without it (same seeds and batches)
    with_mi, control = sum(first["mi"][-3:]) / 3, sum(first["mi_control"][-3:]) / 3
    assert with_mi > 1.5 * control > 0, (first["mi"], first["mi_control"])


@pytest.mark.slow
def test_a_deepspeed_checkpoint_restores_the_smoes_state_and_the_experts_bit_for_bit(smoes_on_autoep):
    for r in smoes_on_autoep:
        assert r["state_keys"] >= 2 * 8 and r["mismatched"] == [], r["mismatched"]
        assert r["next_loss"] == r["next_loss_restored"]   # and the next step is the same step


@pytest.mark.slow
def test_the_hf_training_command_runs_on_autoep_and_logs_to_mlflow(two_rank_scenarios):
    import json

    import mlflow

    reports = two_rank_scenarios.reports("hf_autoep")
    tmp = two_rank_scenarios.out / "hf_autoep"
    console = (tmp / "autoep.rank0.out").read_text()
    assert [r["exit_code"] for r in reports] == [0, 0], console[-3000:]
    assert "AutoEP 2 MoE layers" in console
    assert "placement at step 2 (bins frozen): moved" in console
    metrics = json.loads((tmp / "autoep" / "metrics.json").read_text())
    assert metrics["ep_size"] == 2 and metrics["steps"] == 4 and 0 < metrics["cross_rank_rate"] <= 1
    assert metrics["bytes_per_token"] > 0
    run = mlflow.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}").get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["hf.backend"] == "autoep"
    assert {"train/loss", "train/aux_loss", "train/mi", "train/gate/bin_balance", "msi",
            "placement/experts_moved", "test_loss"} <= set(run.data.metrics)


# -- one process, one EP rank: the adopted layer against AutoEP's own, and what adoption refuses --------------------
def _autoep_layer(**overrides):
    """DeepSpeed's AutoEPMoELayer (one EP rank) from a tiny Qwen3-MoE block, as deepspeed.initialize builds it."""
    import transformers
    from deepspeed.module_inject.auto_ep import AutoEP
    from deepspeed.module_inject.auto_ep_config import parse_autoep_config
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=8, hidden_size=16, intermediate_size=8, moe_intermediate_size=12,
                                      num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=8,
                                      num_experts=4, num_experts_per_tok=2)
    holder = nn.Module()
    holder.config = cfg
    holder.model = nn.Module()
    holder.model.layers = nn.ModuleList([nn.Module()])
    holder.model.layers[0].mlp = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(cfg)
    for p in holder.parameters():
        nn.init.normal_(p, std=0.3)
    config = parse_autoep_config({"enabled": True, "autoep_size": 1, "preset_model": "qwen3_moe", **overrides})
    [spec] = AutoEP(holder, config).ep_parser()
    return AutoEPMoELayer(spec, holder.model.layers[0].mlp, 1, 0, config)


def _context(labels_BT):
    from ds_smoes.hf.context import ModalityContext

    context = ModalityContext((1,), track_scores=False)
    context.begin(labels_BT, None, cached=False)   # id 1 plays the image token
    return context


@pytest.mark.parametrize("dispatch", ["deepspeed", "rank_once"])
def test_adopted_layer_computes_autoeps_output_and_a_gradient_for_every_weight(dispatch):
    from ds_smoes.core.config import SMoESConfig
    from ds_smoes.moe.autoep import SMoESAutoEPLayer

    layer = _autoep_layer()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = layer(x)
    router_weight = layer.router.gate.weight
    ids = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    adopted = SMoESAutoEPLayer.adopt(layer, SMoESConfig(num_bins=2, score_type="hard", dispatch=dispatch),
                                     _context(ids))
    assert adopted is layer and adopted.gate.wg.weight is router_weight   # the optimizer's parameter, not a copy
    assert adopted.config.num_experts == 4 and adopted.config.k == 2 and adopted.config.ep_size == 1
    out = adopted(x.clone().requires_grad_(True))
    assert torch.allclose(out, ref, atol=1e-5)
    (out.square().sum() + sum(adopted.routing_context.aux_losses)).backward()
    for name, p in adopted.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert "smoes_gate.binning.bin_E" in adopted.state_dict() and "smoes_gate.physical_E" in adopted.state_dict()


def test_adoption_refuses_what_the_gate_cannot_stand_in_for():
    from ds_smoes.core.config import SMoESConfig
    from ds_smoes.core.errors import ConfigError
    from ds_smoes.moe.autoep import SMoESAutoEPLayer

    with pytest.raises(ConfigError, match="score_apply='pre'"):
        SMoESAutoEPLayer.adopt(_autoep_layer(score_apply="pre"), SMoESConfig(), None)
    with pytest.raises(ConfigError, match="smoes.k=4 but the AutoEP layers have k=2"):
        SMoESAutoEPLayer.adopt(_autoep_layer(), SMoESConfig(k=4), None)
    with pytest.raises(ConfigError, match="drop_tokens"):
        SMoESAutoEPLayer.adopt(_autoep_layer(), SMoESConfig(drop_tokens=True), None)
    layer = SMoESAutoEPLayer.adopt(_autoep_layer(), SMoESConfig(score_type="hard"), None)
    with pytest.raises(RuntimeError, match="without modality information"):
        layer(torch.zeros(1, 2, 16))


# -- the Hugging Face path's switch (hf.backend) ----------------------------------------------------------------
def test_the_expert_parallel_section_is_completed_from_the_model_and_contradictions_refused():
    from ds_smoes.core.config import SMoESConfig
    from ds_smoes.core.errors import ConfigError
    from ds_smoes.hf import tiny
    from ds_smoes.hf.autoep import autoep_section, prepare_autoep

    hf_model = tiny.build(tiny.qwen3_vl_moe_config(num_experts=4, k=2))
    model = prepare_autoep(hf_model, SMoESConfig(ep_size=2, num_bins=2))
    assert model.backend == "autoep" and model.moe_layers() == []   # the blocks wait for deepspeed.initialize
    assert type(hf_model.model.language_model.layers[0].mlp).__name__ == "Qwen3VLMoeTextSparseMoeBlock"
    section = autoep_section(model, {"enabled": True})
    assert section == {"enabled": True, "autoep_size": 2, "preset_model": "qwen3_moe", "num_experts": 4, "top_k": 2,
                       "route_norm": True, "moe_layer_pattern": r"hf_model\.model\.language_model\.layers\.\d+\.mlp"}
    import re

    names = [n for n, _ in model.named_modules() if re.fullmatch(section["moe_layer_pattern"], n)]
    assert names == ["hf_model.model.language_model.layers.0.mlp", "hf_model.model.language_model.layers.1.mlp"]
    assert autoep_section(model, {"preset_model": "mixtral", "top_k": "auto"})["preset_model"] == "mixtral"
    for section, message in (({"enabled": False}, "expert_parallel.enabled=false"),
                             ({"autoep_size": 4}, "autoep_size=4 but smoes.ep_size=2"),
                             ({"top_k": 4}, "expert_parallel.top_k=4 but the model's MoE blocks have 2")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            autoep_section(model, section)


def test_the_hf_config_refuses_what_the_autoep_backend_cannot_do(tmp_path):
    from ds_smoes.app.hf_config import load_hf_train_config
    from ds_smoes.core.errors import ConfigError

    ok = load_hf_train_config(None, ["hf.backend=autoep", "hf.export=false"], "MODEL")
    assert ok.hf.backend == "autoep"
    with pytest.raises(ConfigError, match="set hf.export=false"):
        load_hf_train_config(None, ["hf.backend=autoep"], "MODEL")
    with pytest.raises(ConfigError, match="upcycling a dense model needs hf.backend=ds_smoes"):
        load_hf_train_config(None, ["hf.backend=autoep", "hf.export=false", "hf.mode=upcycle"], "MODEL")
    from ds_smoes.app.hf_family import HFFamily

    family = HFFamily(load_hf_train_config(None, [], "MODEL"))
    with pytest.raises(ConfigError, match="set hf.backend=autoep, or remove the expert_parallel section"):
        family.deepspeed_config({"expert_parallel": {"enabled": True}})
    assert family.deepspeed_config({"zero_optimization": {"stage": 0}}) == {"zero_optimization": {"stage": 0}}


@pytest.mark.parametrize("gate", ["smoes", "topk", "hard", "hybrid", "ltdr", "smar"])
def test_every_gate_of_the_registry_routes_an_autoep_layer(gate):
    from ds_smoes.core.config import SMoESConfig
    from ds_smoes.moe.autoep import SMoESAutoEPLayer
    from ds_smoes.moe.collector import RoutingCollector
    from ds_smoes.moe.registry import GATES

    fields = {"hybrid": {"shared_experts": 2, "text_experts": 1}, "hard": {"text_experts": 2},
              "ltdr": {"ltdr_top_a": 3}}.get(gate, {})
    ids = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    layer = SMoESAutoEPLayer.adopt(_autoep_layer(), SMoESConfig(gate=gate, score_type="hard", dispatch="rank_once",
                                                                **fields), _context(ids))
    assert type(layer.gate) is GATES[gate]
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)
    with RoutingCollector([layer]) as collector:
        out = layer(x)
    (out.square().sum() + sum(layer.routing_context.aux_losses)).backward()
    [[call]] = collector.take()
    assert torch.isfinite(out).all() and x.grad.abs().sum() > 0
    assert int(call.stats.num_tokens) == 10 and call.stats.load_ME.sum() >= 10


@pytest.mark.slow
def test_the_checkpoint_loads_at_another_autoep_size_with_the_experts_where_placement_put_them(smoes_on_autoep):
    for r in smoes_on_autoep:
        resharded = r["resharded"]
        # DeepSpeed stores AutoEP's experts by physical slot, the gate's physical_E rides in the module state: at
        # autoep_size 1 every rank holds all 8 slots and routes as the 2-rank model did
        assert resharded["physical_E"] == r["physical_E"] and resharded["bins_equal"]
        assert resharded["max_abs_diff"] < 1e-5, resharded
