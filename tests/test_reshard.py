"""Checkpoints across ep_size (ds_smoes.app.reshard, python -m ds_smoes.reshard, --resume-from).

Fast: the logical state round trip 2 -> 1 -> 2 (permuted) on a tiny model's state, written in DeepSpeed's
file layout, is bit for bit the state saved (weights and both Adam moments of every expert by logical id,
non-expert state, step and epoch); the optimizer layouts derived across sizes are the model's own.
Slow: real 2-rank runs (tests/dist_scripts/reshard_resume.py)."""
from __future__ import annotations

import json

import pytest
import torch

from ds_smoes.app import reshard
from ds_smoes.core.errors import ConfigError

PREFIX = "blocks.1.ffn.deepspeed_moe.experts.deepspeed_experts."
GATE = "blocks.1.ffn.deepspeed_moe.gate.physical_E"


def tiny(ep_size: int):
    from ds_smoes.app.session import optimizer_groups
    from ds_smoes.core.config import SMoESConfig
    from ds_smoes.model import ModelConfig, TinyMoEVLM

    smoes = SMoESConfig(num_experts=4, k=2, ep_size=ep_size, num_bins=max(2, ep_size), binning="adaptive")
    model = TinyMoEVLM(ModelConfig(d_model=16, n_layers=2, n_heads=2, patch_size=4, vision_dim=16, max_len=16),
                       20, 4, smoes)
    opt = torch.optim.AdamW(optimizer_groups(model, 0.01), lr=1e-3)
    return model, opt, reshard.optimizer_layout(model, opt)


def saved_state(placement: list[int]) -> reshard.LogicalState:
    """A random training state of the tiny model (as if after 3 steps), experts by logical id."""
    g = torch.Generator().manual_seed(0)
    model, opt, layout = tiny(1)
    module, experts, optim = {}, {}, {}
    for name, t in model.state_dict().items():
        value = torch.randn(t.shape, generator=g).to(t.dtype) if t.is_floating_point() else t.clone()
        (experts if name.startswith(PREFIX) else module)[name] = value
    module[GATE] = torch.tensor(placement)
    for name in (n for group in layout for n in group):
        shape = (experts if name.startswith(PREFIX) else module)[name].shape
        optim[name] = {"step": torch.tensor(3.0), "exp_avg": torch.randn(shape, generator=g),
                       "exp_avg_sq": torch.rand(shape, generator=g)}
    groups = [{k: v for k, v in grp.items() if k != "params"} for grp in opt.state_dict()["param_groups"]]
    meta = {"step": 3, "epoch": 1, "lr_scheduler": {"last_epoch": 3}, "num_experts": [4], "global_steps": 3,
            "ds_config": {"zero_optimization": {"stage": 0}}}
    return reshard.LogicalState(module, [experts], optim, groups, meta, 2, [PREFIX])


def test_layouts_across_ep_size_are_the_models_own():
    layout1, layout2 = tiny(1)[2], tiny(2)[2]
    assert reshard.rescale_layout(layout1, 4, 2) == layout2
    assert reshard.rescale_layout(layout2, 2, 4) == layout1
    assert reshard.rescale_layout(layout2, {PREFIX: 2}, {PREFIX: 1}) == tiny(4)[2]
    with pytest.raises(ConfigError, match="not 3 experts"):
        reshard.rescale_layout(layout2, 3, 1)


def test_round_trip_2_to_1_to_2_permuted_is_bit_for_bit(tmp_path):
    layout1, layout2 = tiny(1)[2], tiny(2)[2]
    state = saved_state([1, 3, 0, 2])
    # at ep_size 2 as DeepSpeed lays it out: rank r's optimizer file holds physical experts 2r, 2r+1
    reshard.write_checkpoint(state, tmp_path / "ep2", "s3", 2, layout2, reshard.target_placement(state, 2, "keep"))
    assert reshard.saved_ep_size(tmp_path / "ep2") == 2
    s2 = reshard.read_logical(tmp_path / "ep2", None, layout2)
    assert reshard.states_equal(s2, state) == []

    # ep_size 1 (keep the placement), then ep_size 2 with another permutation
    reshard.reshard_checkpoint(tmp_path / "ep2", None, layout2, tmp_path / "ep1", 1, layout1, "keep")
    s1 = reshard.read_logical(tmp_path / "ep1", "s3", layout1)
    assert s1.ep_size == 1 and reshard.states_equal(s1, state) == []
    permuted = [2, 0, 3, 1]
    _, _, physical = reshard.reshard_checkpoint(tmp_path / "ep1", None, layout1, tmp_path / "back", 2, layout2,
                                                [permuted])
    back = reshard.read_logical(tmp_path / "back", None, layout2)
    assert reshard.states_equal(back, state) == []   # weights, both moments and step of every expert, by logical id
    assert back.module[GATE].tolist() == permuted and back.meta["step"] == 3 and back.meta["epoch"] == 1

    # the files themselves: logical expert 0 sits at physical 2 = local expert 0 of EP rank 1
    folder = tmp_path / "back" / "s3"
    w = torch.load(folder / "layer_0_expert_2_mp_rank_00_model_states.pt")[f"{PREFIX}2.0.weight"]
    assert torch.equal(w, state.experts[0][f"{PREFIX}0.0.weight"])
    opt1 = torch.load(folder / "expp_rank_1_mp_rank_00_optim_states.pt")["optimizer"]
    flat = [n for group in layout2 for n in group]
    index = flat.index(f"{PREFIX}0.0.weight")
    assert torch.equal(opt1["state"][index]["exp_avg"], state.optim[f"{PREFIX}0.0.weight"]["exp_avg"])
    assert torch.equal(opt1["state"][index]["exp_avg_sq"], state.optim[f"{PREFIX}0.0.weight"]["exp_avg_sq"])
    assert [g["name"] for g in opt1["param_groups"] if g.get("moe")] == ["ep_size_2", "ep_size_2"]


def test_placements_and_errors(tmp_path):
    state = saved_state([1, 3, 0, 2])   # bins: expert e in bin bin_E[e]
    state.module["blocks.1.ffn.deepspeed_moe.gate.binning.bin_E"] = torch.tensor([0, 1, 1, 0])
    bins = reshard.target_placement(state, 2, "bins")[0]
    assert (bins // 2).tolist() == [0, 1, 1, 0]        # each expert on its bin's rank
    assert reshard.target_placement(state, 1, "bins")[0].tolist() == [1, 3, 0, 2]   # one rank: nothing moves
    assert reshard.target_placement(state, 2, "identity")[0].tolist() == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="not a permutation"):
        reshard.target_placement(state, 2, [[0, 0, 1, 2]])
    with pytest.raises(ConfigError, match="does not divide"):
        reshard.target_placement(state, 3, "keep")
    (tmp_path / "p.json").write_text(json.dumps({"layers": [{"physical_of_expert": [3, 2, 1, 0]}]}))
    assert reshard.load_placement_file(tmp_path / "p.json") == [[3, 2, 1, 0]]

    state.meta["ds_config"] = {"zero_optimization": {"stage": 1}}
    layout2 = tiny(2)[2]
    reshard.write_checkpoint(state, tmp_path / "z1", "t", 2, layout2, [torch.arange(4)])
    with pytest.raises(ConfigError, match="ZeRO stage 1.*not converted"):
        reshard.read_logical(tmp_path / "z1", "t", layout2)
    with pytest.raises(ConfigError, match="not a DeepSpeed checkpoint"):
        reshard.read_logical(tmp_path / "z1", "nope", layout2)
    with pytest.raises(ConfigError, match="optimizer groups hold"):
        state.meta["ds_config"] = {}
        reshard.write_checkpoint(state, tmp_path / "ok", "t", 2, layout2, [torch.arange(4)])
        reshard.read_logical(tmp_path / "ok", "t", tiny(1)[2])


def test_command_errors_are_one_line(tmp_path, capsys):
    from ds_smoes.reshard import main

    assert main(["--checkpoint", str(tmp_path / "run" / "checkpoint"), "--ep-size", "1",
                 "--out", str(tmp_path / "new")]) == 2
    assert "train_config.json not found" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_across_ep_size_matches_the_uninterrupted_run(two_rank_scenarios):
    reports = two_rank_scenarios.reports("reshard_resume")  # three engines in the 2-rank launch
    for r in range(2):
        rep = reports[r]
        assert rep["ckpt_ep_sizes"] == [2, 1, 2] and rep["physical2"] == [2, 0, 3, 1]
        assert rep["resumed"] == [3, 0] and rep["client2"] == [3, 0]
        assert any("saved at ep_size 2; converted it to ep_size 1" in line for line in rep["logs"]) == (r == 0)
        assert rep["scratch_left"] == []                    # the converted copy is removed after loading
        # the state each resume loaded is the state saved, bit for bit (weights, Adam moments and steps,
        # SMoES buffers; experts by logical id)
        for key in ("loaded1_vs_saved", "loaded2_vs_saved"):
            assert rep[key] == {"missing": [], "unequal": [], "max_rel": 0.0}, (key, rep[key])
        # the next step: the loss is bit for bit the uninterrupted run's at both sizes
        assert rep["loss1"] == rep["ref_loss"] and rep["loss2"] == rep["ref_loss"]
        # ep_size 2, permuted: the same arithmetic (an expert's rows arrive in source-rank order wherever
        # it lives): parameters and moments bit for bit
        assert rep["after2_vs_ref"]["unequal"] == [] and rep["moments2_vs_ref"]["unequal"] == []
        # ep_size 1: an expert's weight gradient is summed over the ranks by the allreduce instead of inside
        # one matmul: only expert tensors differ, within 1e-6 relative (measured ~1e-7 / ~2e-7)
        assert all("deepspeed_experts" in k for k in rep["moments1_vs_ref"]["unequal"])
        assert rep["after1_vs_ref"]["max_rel"] < 1e-6 and rep["moments1_vs_ref"]["max_rel"] < 1e-6
