"""Export back to the transformers architecture (save_pretrained, same weight names) and upcycling."""
import copy

import pytest
import torch
from transformers import AutoModelForImageTextToText

import hf_tiny
from ds_smoes.core.config import SMoESConfig
from ds_smoes.hf import convert_to_smoes, export_pretrained, export_state_dict, upcycle_to_smoes
from ds_smoes.hf.upcycle import upcycle_layer_ids

CONVERTED = {"qwen3_vl_moe": hf_tiny.qwen3_vl_moe_config, "llava-olmoe": lambda: hf_tiny.llava_config("olmoe"),
             "llava-qwen2_moe": lambda: hf_tiny.llava_config("qwen2_moe")}
DENSE = {"qwen3_vl": (hf_tiny.qwen3_vl_config, "Qwen3VLMoeForConditionalGeneration"),
         "llava-qwen3": (lambda: hf_tiny.llava_config("qwen3"), "LlavaForConditionalGeneration")}


def _perturb_experts(model):
    """Stand-in for training: change every expert differently, and the router."""
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.gate.wg.weight.add_(0.05)
            for i, expert in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
                expert.down_proj.weight.mul_(1.0 + 0.1 * (i + 1))


def _valid_diff(a, b, batch):
    return (a - b)[batch["attention_mask"].bool()].abs().max().item()


@pytest.mark.parametrize("arch", sorted(CONVERTED))
def test_export_loads_back_with_the_original_names_and_the_trained_logits(arch, tmp_path):
    hf = hf_tiny.build(CONVERTED[arch]())
    original_keys = set(copy.deepcopy(hf).state_dict())
    model = convert_to_smoes(hf, SMoESConfig(num_bins=2, alpha_mi=0.0, alpha_bal=0.0)).eval()
    _perturb_experts(model)
    batch = hf_tiny.batch_for(hf.config.model_type)
    with torch.no_grad():
        trained = model(**batch).logits
    assert set(export_state_dict(model)) == original_keys
    export_pretrained(model, tmp_path)
    back = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(back) is type(hf) and back.config.text_config._attn_implementation != "smoes_sdpa"
    with torch.no_grad():
        diff = _valid_diff(back(**batch).logits, trained, batch)
    print(f"{arch}: exported vs trained max |logit diff| = {diff:.3g}")
    assert diff < 1e-5


def test_export_after_placement_writes_experts_in_router_order():
    """Experts moved onto their bins' ranks (new physical ids) export under their logical ids: the
    exported state equals the unmoved model's, and every expert moved."""
    from ds_smoes.parallel.migration import migrate_experts

    hf = hf_tiny.build(hf_tiny.qwen3_vl_moe_config())
    model = convert_to_smoes(hf, SMoESConfig(num_bins=2, alpha_mi=0.0, alpha_bal=0.0)).eval()
    _perturb_experts(model)
    before = {k: v.clone() for k, v in export_state_dict(model).items()}
    for layer in model.moe_layers():
        new_E = torch.tensor([1, 0, 3, 2])    # a placement that swaps every expert's weights
        migrate_experts(layer.deepspeed_moe.experts.deepspeed_experts, layer.gate.physical_E, new_E)
        layer.gate.physical_E.copy_(new_E)
    after = export_state_dict(model)
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_upcycle_layer_choice():
    assert upcycle_layer_ids(4, "every_other") == [1, 3]
    assert upcycle_layer_ids(3, "all") == [0, 1, 2]
    assert upcycle_layer_ids(4, [2, 0, 2]) == [0, 2]
    with pytest.raises(Exception, match="ids in 0..3"):
        upcycle_layer_ids(4, [4])


@pytest.mark.parametrize("arch", sorted(DENSE))
def test_upcycled_dense_vlm_starts_as_the_dense_model_and_exports_to_its_moe_sibling(arch, tmp_path):
    make_config, target_class = DENSE[arch]
    dense = hf_tiny.build(make_config())
    mlp = copy.deepcopy(dense.model.language_model.layers[1].mlp)
    batch = hf_tiny.batch_for(dense.config.model_type)
    with torch.no_grad():
        ref = dense(**batch).logits
    cfg = SMoESConfig(num_experts=4, k=2, num_bins=2, alpha_mi=0.0, alpha_bal=0.0, score_type="attention")
    model = upcycle_to_smoes(dense, cfg, layers="every_other", seed=3).eval()
    assert sorted(model.blocks()) == [1] and model.upcycled   # 2 layers: layer 1 only
    layer = model.moe_layers()[0]
    for expert in layer.deepspeed_moe.experts.deepspeed_experts:   # every expert is a copy of the MLP
        assert torch.equal(expert.gate_up_proj.weight, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        assert torch.equal(expert.down_proj.weight, mlp.down_proj.weight)
    twin = upcycle_to_smoes(hf_tiny.build(make_config()), cfg, seed=3)   # the fresh router is seeded
    assert torch.equal(twin.moe_layers()[0].gate.wg.weight, layer.gate.wg.weight)
    assert layer.gate.wg.weight.std() > 0
    with torch.no_grad():
        out = model(**batch).logits
    assert _valid_diff(out, ref, batch) < 1e-5   # identical experts, weights summing to 1
    _perturb_experts(model)
    with torch.no_grad():
        trained = model(**batch).logits
    export_pretrained(model, tmp_path)
    back = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(back).__name__ == target_class
    text = back.config.text_config
    assert text.num_experts == 4 and text.num_experts_per_tok == 2 and text.mlp_only_layers == [0]
    with torch.no_grad():
        assert _valid_diff(back(**batch).logits, trained, batch) < 1e-5
