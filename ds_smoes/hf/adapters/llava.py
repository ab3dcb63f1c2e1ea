"""LLaVA (`llava`) with any text decoder whose blocks have an adapter (OLMoE, Qwen3-MoE, Qwen2-MoE),
or a dense one for upcycling (Qwen3 upcycles to Qwen3-MoE).

The text decoder is `model.model.language_model.layers`; the image placeholder is
`config.image_token_id` (one per vision-tower patch after the projector).
"""
from __future__ import annotations

from ds_smoes.hf.adapters.base import ModelAdapter, UpcycleTarget, register_model


def _layers(model):
    return model.model.language_model.layers


def _qwen3_moe_text(dense_config, moe_layers: list[int], num_experts: int, k: int, normalize_topk: bool):
    from transformers import LlavaConfig

    data = dense_config.to_dict()
    text = dict(data.pop("text_config"))
    n_layers = int(text["num_hidden_layers"])
    text.update(model_type="qwen3_moe", num_experts=num_experts, num_experts_per_tok=k, norm_topk_prob=normalize_topk,
                moe_intermediate_size=int(text["intermediate_size"]), decoder_sparse_step=1,
                mlp_only_layers=[i for i in range(n_layers) if i not in moe_layers], output_router_logits=False)
    vision = data.pop("vision_config")
    for key in ("model_type", "architectures", "transformers_version"):
        data.pop(key, None)
    return LlavaConfig(text_config=text, vision_config=vision, **data)


def _upcycle_target(config):
    text_type = config.text_config.model_type
    if text_type == "qwen3":
        return UpcycleTarget(_qwen3_moe_text, "LlavaForConditionalGeneration")
    raise ValueError(f"exporting an upcycled LLaVA needs an MoE sibling of its text model {text_type!r}; only qwen3 "
                     "(-> qwen3_moe) is wired up (docs/hf.md, 'Adding an architecture')")


def _image_tokens(config, image_inputs: dict, i: int) -> int:
    """One placeholder per vision-tower patch (plus the CLS token with strategy 'full'), as LlavaProcessor does."""
    vision = config.vision_config
    patches = (int(vision.image_size) // int(vision.patch_size)) ** 2
    return patches + (1 if config.vision_feature_select_strategy == "full" else 0)


register_model(ModelAdapter("llava", _layers, lambda c: c.text_config, lambda c: (int(c.image_token_id),),
                            image_tokens=_image_tokens, upcycle_target=_upcycle_target))
