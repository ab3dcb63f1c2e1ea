"""Converting Hugging Face MoE-VLMs to SMoES: same logits with the SMoES losses off, weights copied, errors."""
import copy

import pytest
import torch

import hf_tiny
from ds_smoes.core.config import SMoESConfig
from ds_smoes.core.errors import ConfigError
from ds_smoes.core.losses import mutual_information_loss
from ds_smoes.core.scores import hard_scores
from ds_smoes.hf import convert_to_smoes
from ds_smoes.hf.block import SMoESBlock
from ds_smoes.moe.collector import RoutingCollector

ARCHS = {"qwen3_vl_moe": hf_tiny.qwen3_vl_moe_config, "llava-olmoe": lambda: hf_tiny.llava_config("olmoe"),
         "llava-qwen3_moe": lambda: hf_tiny.llava_config("qwen3_moe"),
         "llava-qwen2_moe": lambda: hf_tiny.llava_config("qwen2_moe")}
LOSSES_OFF = dict(num_bins=2, alpha_mi=0.0, alpha_bal=0.0)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("score_type", ["attention", "gaussian"])
def test_converted_model_gives_the_original_logits(arch, score_type):
    hf = hf_tiny.build(ARCHS[arch]())
    batch = hf_tiny.batch_for(hf.config.model_type)
    ref = _logits(hf, batch)
    original = copy.deepcopy(hf)
    model = convert_to_smoes(hf, SMoESConfig(**LOSSES_OFF, score_type=score_type)).eval()
    with RoutingCollector(model.moe_layers()) as collector:
        out = model(**batch, labels=batch["input_ids"])
    valid = batch["attention_mask"].bool()
    diff = (out.logits - ref)[valid].abs().max().item()
    print(f"{arch} {score_type}: max |logit diff| = {diff:.3g}")
    assert diff < 1e-5
    layers = model.adapter.decoder_layers(model.hf_model)
    assert all(isinstance(layer.mlp, SMoESBlock) for layer in layers)
    for call in collector.last():
        assert call.stats.num_dropped == 0 and call.stats.num_tokens == int(valid.sum())
    assert out.aux_loss.item() == 0.0 and torch.allclose(out.loss, out.lm_loss)
    # the router and every expert are copies of the original weights
    orig_layers = original.model.language_model.layers
    for i, layer in enumerate(layers):
        src = orig_layers[i].mlp
        assert torch.equal(layer.mlp.moe.gate.wg.weight, src.gate.weight)
        experts = layer.mlp.moe.deepspeed_moe.experts.deepspeed_experts
        for e, expert in enumerate(experts):
            assert torch.equal(expert.gate_up_proj.weight, src.experts.gate_up_proj[e])
            assert torch.equal(expert.down_proj.weight, src.experts.down_proj[e])
        if arch == "llava-qwen2_moe":   # the shared expert and its gate are kept, under their names
            assert layer.mlp.shared_names == ("shared_expert", "shared_expert_gate")
            assert torch.equal(layer.mlp.shared_expert.up_proj.weight, src.shared_expert.up_proj.weight)


def test_smoes_losses_on_change_the_loss_not_the_logits():
    hf = hf_tiny.build(hf_tiny.qwen3_vl_moe_config())
    with torch.no_grad():  # a sharper router, so that the modality-bin MI (~1e-3) stands well above float32 noise
        for name, weight in hf.named_parameters():
            if name.endswith("mlp.gate.weight"):
                weight.mul_(30.0)
    batch = hf_tiny.batch_for("qwen3_vl_moe")
    ref = _logits(hf, batch)
    model = convert_to_smoes(hf, SMoESConfig(num_bins=2, alpha_mi=1e-2, alpha_bal=1e-2)).eval()
    assert model.smoes.score_type == "attention"
    layers = model.moe_layers()
    seen = {}   # what each MoE layer was called with: hidden states, padding mask, labels and scores (kwargs)
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: seen.__setitem__(i, (args[0].detach(), args[1], kwargs)), with_kwargs=True)
    with RoutingCollector(layers, losses=True) as collector:   # in eval, the losses only when asked
        out = model(**batch, labels=batch["input_ids"])
    assert out.aux_loss.item() > 0 and torch.allclose(out.loss, out.lm_loss + out.aux_loss)
    assert (out.logits - ref)[batch["attention_mask"].bool()].abs().max() < 1e-5
    # the MI diagnostic is the reference MI (ds_smoes.core.losses, float64) of the layer's router probabilities
    # and the attention scores the layer was handed; those are soft, and the MI differs from the hard-score MI
    for i, layer in enumerate(layers):
        x_BTD, valid_BT, kwargs = seen[i]
        b, t = x_BTD.shape[:2]
        scores_SM = kwargs["modality_scores"].reshape(-1, 2).double()
        hard_SM = hard_scores(kwargs["modality_labels"].reshape(-1)).double()
        valid_S = valid_BT.reshape(-1).bool()
        assert torch.allclose(scores_SM.sum(-1), torch.ones(b * t, dtype=torch.float64))
        assert not torch.allclose(scores_SM[valid_S], hard_SM[valid_S], atol=1e-3)
        probs_SE = torch.softmax(x_BTD.reshape(b * t, -1).double() @ layer.gate.wg.weight.detach().double().T, dim=-1)
        routing = (layer.gate.binning.bin_E, torch.arange(b).repeat_interleave(t), valid_S)
        soft_mi = -float(mutual_information_loss(probs_SE, scores_SM, *routing, num_bins=2))
        hard_mi = -float(mutual_information_loss(probs_SE, hard_SM, *routing, num_bins=2))
        mi = float(collector.last()[i].stats.mi)
        assert mi == pytest.approx(soft_mi, rel=1e-4) and mi > 1e-4
        assert abs(soft_mi - hard_mi) > 0.2 * soft_mi, (i, soft_mi, hard_mi)


def test_attention_scores_recomputed_for_sdpa_equal_eager_probabilities():
    scores = {}
    for impl in ("eager", "sdpa"):
        hf = hf_tiny.build(hf_tiny.llava_config("olmoe"))
        hf.set_attn_implementation(impl)
        model = convert_to_smoes(hf, SMoESConfig(**LOSSES_OFF, score_type="attention")).eval()
        with torch.no_grad(), RoutingCollector(model.moe_layers(), stats=False, losses=True):  # scores asked for
            model(**hf_tiny.batch_for("llava"))
        scores[impl] = model.context.batch.scores_BTM.clone()
    assert hf.config.text_config._attn_implementation == "smoes_sdpa"
    assert torch.allclose(scores["eager"], scores["sdpa"], atol=1e-5)
    valid = hf_tiny.batch_for("llava")["attention_mask"].bool()
    s = scores["sdpa"][valid]
    assert torch.allclose(s.sum(-1), torch.ones(len(s)))
    # image tokens stay mostly vision, text after the image picks up some vision
    ids = hf_tiny.batch_for("llava")["input_ids"]
    assert scores["sdpa"][ids == hf_tiny.IMAGE_ID][:, 1].mean() > 0.5
    assert 0 < scores["sdpa"][0, 20:, 1].mean() < 1


def test_generation_with_kv_cache_matches_the_original():
    hf = hf_tiny.build(hf_tiny.qwen3_vl_moe_config())
    batch = hf_tiny.batch_for("qwen3_vl_moe")
    one = {k: (v[:1] if k != "pixel_values" and k != "image_grid_thw" else v) for k, v in batch.items()}
    ref = hf.generate(**one, max_new_tokens=4, do_sample=False)
    model = convert_to_smoes(hf, SMoESConfig(**LOSSES_OFF, score_type="attention")).eval()
    out = model.generate(**one, max_new_tokens=4, do_sample=False)     # inference: no attention score carried
    assert torch.equal(out, ref) and model.context.key_scores == {}
    with RoutingCollector(model.moe_layers(), stats=False, losses=True):   # asked for: carried through the cache
        out = model.generate(**one, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref)
    assert model.context.key_scores[0].shape[1] == one["input_ids"].shape[1] + 3   # scores of cached tokens kept


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_a_filled_kv_cache_under_either_keyword_keeps_the_cached_scores(name):
    # transformers >= 5.24 hands the KV cache to the model as `cache`, earlier 5.x as `past_key_values`:
    # under either, a filled cache means a decoding step, whose keys' scores must be kept.
    from transformers import DynamicCache

    model = convert_to_smoes(hf_tiny.build(hf_tiny.qwen3_vl_moe_config()),
                             SMoESConfig(**LOSSES_OFF, score_type="attention")).eval()
    model.context.key_scores = {0: torch.zeros(1, 5, 2)}
    ids = torch.ones(1, 1, dtype=torch.long)
    model._begin_forward(model.hf_model, (), {"input_ids": ids, name: DynamicCache()})   # empty: a new sequence
    assert model.context.key_scores == {}
    filled = DynamicCache()
    filled.update(torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4), 0)
    model.context.key_scores = {0: torch.zeros(1, 5, 2)}
    model._begin_forward(model.hf_model, (), {"input_ids": ids, name: filled})
    assert list(model.context.key_scores) == [0]


def test_expert_parallel_rank_keeps_its_own_experts():
    hf = hf_tiny.build(hf_tiny.qwen3_vl_moe_config())
    src = copy.deepcopy(hf.model.language_model.layers[1].mlp)
    model = convert_to_smoes(hf, SMoESConfig(num_bins=2, ep_size=2), ep_rank=1)
    experts = model.moe_layers()[1].deepspeed_moe.experts.deepspeed_experts
    assert len(experts) == 2
    for local, global_id in enumerate((2, 3)):
        assert torch.equal(experts[local].down_proj.weight, src.experts.down_proj[global_id])


def test_routing_fields_come_from_the_model_and_conflicts_are_errors():
    hf = hf_tiny.build(hf_tiny.llava_config("olmoe"))
    model = convert_to_smoes(copy.deepcopy(hf), SMoESConfig(num_bins=2))
    assert (model.smoes.num_experts, model.smoes.k, model.smoes.normalize_topk) == (4, 2, False)
    with pytest.raises(ConfigError, match="smoes.num_experts=8 but the model's MoE blocks have num_experts=4"):
        convert_to_smoes(copy.deepcopy(hf), SMoESConfig(num_experts=8, num_bins=2))
    with pytest.raises(ConfigError, match="num_bins=8 does not divide num_experts=4"):
        convert_to_smoes(copy.deepcopy(hf), SMoESConfig(num_bins=8))
    k1 = hf_tiny.build(hf_tiny.qwen3_vl_moe_config(k=1))
    with pytest.raises(ConfigError, match="top-1 with renormalised weights"):
        convert_to_smoes(k1, SMoESConfig(num_bins=2))
    with pytest.raises(ConfigError, match="upcycle"):
        convert_to_smoes(hf_tiny.build(hf_tiny.qwen3_vl_config()), SMoESConfig(num_bins=2))


def test_unknown_architecture_is_an_actionable_error():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    text_only = Qwen3ForCausalLM(Qwen3Config(**hf_tiny.LLAVA_TEXT["qwen3"]()))
    with pytest.raises(ConfigError, match="no SMoES adapter for model_type 'qwen3'.*docs/hf.md"):
        convert_to_smoes(text_only, SMoESConfig())
