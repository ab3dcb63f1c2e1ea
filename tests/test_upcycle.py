"""Sparse upcycling (the recipe's stage III): a dense model's weights into the MoE model, every expert a copy of its
block's FFN.  With exact copies and kept gate weights that sum to 1 the MoE model computes the dense model's
function at the first step; the dense run's checkpoint is read as DeepSpeed writes it."""
from __future__ import annotations

import pytest
import torch

from ds_smoes.core.config import SMoESConfig
from ds_smoes.core.errors import ConfigError
from ds_smoes.model import TinyMoEVLM
from ds_smoes.model.config import ModelConfig
from ds_smoes.model.upcycle import EXPERTS, upcycle_from_dense

VOCAB, IMAGE_ID = 16, 15


def _cfg(moe_layers: str, **fields) -> ModelConfig:
    return ModelConfig(**{"d_model": 32, "n_layers": 4, "n_heads": 4, "patch_size": 4, "vision_dim": 16,
                          "vision_layers": 1, "max_len": 40, "moe_layers": moe_layers, **fields})


def _dense(seed: int = 0, **fields) -> TinyMoEVLM:
    torch.manual_seed(seed)
    model = TinyMoEVLM(_cfg("none", **fields), VOCAB, IMAGE_ID, None)
    with torch.no_grad():   # weights well away from the initialisation's small scale: FFNs that matter
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def _moe(normalize_topk: bool = True, score_type: str = "attention", seed: int = 5) -> TinyMoEVLM:
    torch.manual_seed(seed)
    smoes = SMoESConfig(num_experts=4, k=2, ep_size=1, num_bins=2, score_type=score_type,
                        normalize_topk=normalize_topk, alpha_mi=0.5, alpha_bal=0.5)
    return TinyMoEVLM(_cfg("every_other"), VOCAB, IMAGE_ID, smoes, expert_seed=seed)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, IMAGE_ID, (3, 12), generator=g)
    ids[[0, 2], 1:5] = IMAGE_ID                          # 4 patches of an 8x8 image
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, 9:] = False
    return ids, valid, (ids == IMAGE_ID).long(), torch.rand(3, 1, 8, 8, generator=g), torch.tensor([True, False, True])


@pytest.mark.parametrize("score_type", ["attention", "gaussian"])
def test_exact_copies_compute_the_dense_function(score_type):
    dense, moe = _dense(), _moe(score_type=score_type)
    done = upcycle_from_dense(moe, dense.state_dict())
    assert done["expert_tensors"] == 2 * 4 * 4         # 2 MoE blocks x 4 experts x (2 weights + 2 biases)
    batch = _batch()
    for mode in ("eval", "train"):                      # dropout 0: train mode computes the same function
        getattr(dense, mode)(), getattr(moe, mode)()
        with torch.no_grad():
            want = dense(*batch).logits_BTV
            got = moe(*batch).logits_BTV
        valid = batch[1]
        assert (got[valid] - want[valid]).abs().max() < 1e-5, mode


def test_without_kept_weights_that_sum_to_1_the_function_changes():
    # the condition matters: top-2 gate values that are not renormalised scale each FFN output by their sum < 1
    dense, moe = _dense(), _moe(normalize_topk=False)
    upcycle_from_dense(moe, dense.state_dict())
    batch = _batch()
    dense.eval(), moe.eval()
    with torch.no_grad():
        assert (moe(*batch).logits_BTV - dense(*batch).logits_BTV)[batch[1]].abs().max() > 1e-3


def test_noise_is_relative_seeded_and_per_global_expert():
    dense = _dense()
    a, b = _moe(), _moe()
    upcycle_from_dense(a, dense.state_dict(), noise=0.01, seed=3)
    upcycle_from_dense(b, dense.state_dict(), noise=0.01, seed=3)
    w = dense.state_dict()["blocks.1.ffn.0.weight"]
    experts = [a.state_dict()[f"blocks.1.ffn.{EXPERTS}.{j}.0.weight"] for j in range(4)]
    assert all(torch.equal(x, b.state_dict()[f"blocks.1.ffn.{EXPERTS}.{j}.0.weight"]) for j, x in enumerate(experts))
    assert not torch.equal(experts[0], experts[1])
    for x in experts:
        assert 0 < float((x - w).std()) < 0.02 * float(w.std())
    # on EP rank 1 of 2 (local experts 0, 1 = global 2, 3) the same global experts get the same noise
    torch.manual_seed(5)
    half = TinyMoEVLM(_cfg("every_other"), VOCAB, IMAGE_ID,
                      SMoESConfig(num_experts=4, k=2, ep_size=2, num_bins=2), ep_rank=1)
    upcycle_from_dense(half, dense.state_dict(), noise=0.01, seed=3, ep_rank=1)
    assert torch.equal(half.state_dict()[f"blocks.1.ffn.{EXPERTS}.0.0.weight"], experts[2])


def test_models_that_differ_beyond_the_ffns_are_refused():
    with pytest.raises(ConfigError, match="the model sections differ"):
        upcycle_from_dense(_moe(), _dense(ffn_mult=3).state_dict())


def test_a_dense_model_started_from_a_dense_run_copies_every_tensor():
    """model.start_from on a dense model (the recipe's stages I and II): the same function, bit for bit."""
    source, target = _dense(seed=0), _dense(seed=1)
    done = upcycle_from_dense(target, source.state_dict())
    assert done == {"copied": len(source.state_dict()), "expert_tensors": 0}
    source.eval(), target.eval()
    with torch.no_grad():
        assert torch.equal(target(*_batch()).logits_BTV, source(*_batch()).logits_BTV)


def test_the_dense_runs_checkpoint_is_read_as_deepspeed_writes_it(tmp_path):
    import deepspeed

    from ds_smoes.app.builtin import dense_run_state
    from ds_smoes.app.config import TrainConfig
    from ds_smoes.data import WordTokenizer
    from ds_smoes.parallel.launch import init_distributed

    init_distributed()
    dense = _dense()
    engine, *_ = deepspeed.initialize(model=dense, config={"train_micro_batch_size_per_gpu": 1,
                                                           "steps_per_print": 10 ** 9})
    run = tmp_path / "dense-run"
    engine.save_checkpoint(str(run / "checkpoint"), tag="final")
    tokenizer = WordTokenizer.build(["which digit is this", "seven"])
    tokenizer.save(run / "tokenizer.json")
    (run / "train_config.json").write_text(TrainConfig.model_validate({"model": {"moe_layers": "none"}})
                                           .model_dump_json())
    state, tok = dense_run_state(run)
    assert tok == tokenizer
    assert set(state) == set(dense.state_dict())
    assert all(torch.equal(state[k], v) for k, v in dense.state_dict().items())
    (run / "train_config.json").write_text(TrainConfig().model_dump_json())   # a MoE run
    with pytest.raises(ConfigError, match="upcycle from a dense run"):
        dense_run_state(run)
    with pytest.raises(ConfigError, match="not found: model.start_from must be a dense training run"):
        dense_run_state(tmp_path / "nothing")


@pytest.mark.slow
def test_upcycled_run_on_two_ep_ranks_starts_as_the_dense_run_ended(two_rank_scenarios):
    """Through the training session (tests/dist_scripts/upcycle_run.py): the MoE run upcycled from a dense run,
    evaluated before any training on 2 EP ranks with the rank_once dispatch, gives the dense run's test loss and
    answers; then it trains."""
    for rep in two_rank_scenarios.reports("upcycle_run"):
        dense, upcycled = rep["dense"], rep["upcycled"]
        assert upcycled["test_loss"] == pytest.approx(dense["test_loss"], rel=1e-4), (dense, upcycled)
        for key in ("acc_multimodal", "acc_language"):
            assert abs(upcycled[key] - dense[key]) <= 0.011, (key, dense, upcycled)   # at most 1 of ~100 answers
        assert upcycled["bytes_per_token"] > 0   # the experts really sit on 2 ranks: tokens crossed
        assert rep["trained"]["steps"] == 10
    assert any("upcycled from the dense run" in line and "every expert of the 2 MoE blocks" in line
               for line in two_rank_scenarios.reports("upcycle_run")[0]["lines"])


def test_a_compressor_the_dense_run_did_not_have_starts_fresh():
    """The recipe's compression settings add their module at stage I, after a language stage without one."""
    from ds_smoes.compress.config import CompressConfig

    source = _dense()
    torch.manual_seed(4)
    target = TinyMoEVLM(_cfg("none", compress=CompressConfig(method="learnpruner", keep_ratio=0.5)), VOCAB, IMAGE_ID,
                        None)
    fresh = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("compressor.")}
    assert fresh
    done = upcycle_from_dense(target, source.state_dict())
    assert done["copied"] == len(source.state_dict())
    assert all(torch.equal(target.state_dict()[k], v) for k, v in fresh.items())
    assert torch.equal(target.state_dict()["lm_head.weight"], source.state_dict()["lm_head.weight"])
