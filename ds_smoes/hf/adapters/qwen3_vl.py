"""Qwen3-VL-MoE (`qwen3_vl_moe`) and the dense Qwen3-VL (`qwen3_vl`, for upcycling).

The text decoder is `model.model.language_model.layers`; image and video placeholders are
`config.image_token_id` and `config.video_token_id` (the processor expands one per merged patch).
The router always renormalises its top-k weights.  A dense Qwen3-VL upcycles to Qwen3-VL-MoE:
upcycled layers become sparse blocks, the others stay dense MLPs (`mlp_only_layers`).
"""
from __future__ import annotations

from ds_smoes.hf.adapters.base import ModelAdapter, UpcycleTarget, register_block, register_model
from ds_smoes.hf.adapters.fused import FusedTopKBlock

register_block(FusedTopKBlock("Qwen3VLMoeTextSparseMoeBlock", always_normalize=True))


def _layers(model):
    return model.model.language_model.layers


def _placeholders(config) -> tuple[int, ...]:
    return (int(config.image_token_id), int(config.video_token_id))


def _moe_config(dense_config, moe_layers: list[int], num_experts: int, k: int, normalize_topk: bool):
    from transformers import Qwen3VLMoeConfig

    if not normalize_topk:
        raise ValueError("Qwen3-VL-MoE always renormalises the top-k weights: upcycle with normalize_topk=true "
                         "to export to it")
    data = dense_config.to_dict()
    text = dict(data.pop("text_config"))
    vision = dict(data.pop("vision_config"))
    n_layers = int(text["num_hidden_layers"])
    text.update(model_type="qwen3_vl_moe_text", num_experts=num_experts, num_experts_per_tok=k,
                moe_intermediate_size=int(text["intermediate_size"]), decoder_sparse_step=1,
                mlp_only_layers=[i for i in range(n_layers) if i not in moe_layers], output_router_logits=False)
    vision["model_type"] = "qwen3_vl_moe_vision"
    for key in ("model_type", "architectures", "transformers_version"):
        data.pop(key, None)
    return Qwen3VLMoeConfig(text_config=text, vision_config=vision, **data)


def _image_tokens(config, image_inputs: dict, i: int) -> int:
    """One placeholder per merged patch group, as Qwen3VLProcessor expands `<|image_pad|>`."""
    merge = int(config.vision_config.spatial_merge_size)
    return int(image_inputs["image_grid_thw"][i].prod()) // (merge * merge)


def _extra_inputs(config, input_ids_BT):
    """M-RoPE needs the token types (1 image, 2 video) that the processor returns as mm_token_type_ids."""
    types_BT = (input_ids_BT == config.image_token_id).int() + 2 * (input_ids_BT == config.video_token_id).int()
    return {"mm_token_type_ids": types_BT}


for _type, _target in (("qwen3_vl_moe", None),
                       ("qwen3_vl", lambda c: UpcycleTarget(_moe_config, "Qwen3VLMoeForConditionalGeneration"))):
    register_model(ModelAdapter(_type, _layers, lambda c: c.text_config, _placeholders, image_tokens=_image_tokens,
                                extra_inputs=_extra_inputs, upcycle_target=_target))
