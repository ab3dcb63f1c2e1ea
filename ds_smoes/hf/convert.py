"""Convert a loaded transformers MoE-VLM to SMoES: every sparse-MoE block becomes an `SMoESBlock`.

    from ds_smoes.hf import convert_to_smoes
    model = convert_to_smoes(hf_model, SMoESConfig(num_bins=2, score_type="attention", ep_size=2))

The router and expert weights are copied (each EP rank keeps its own experts); `num_experts`, `k`
and `normalize_topk` come from the model.  With `alpha_mi=0`, `alpha_bal=0` and dropless routing
(the default) the converted model computes the same logits as the original: the SMoES gate is a
global softmax and top-k, as the transformers routers are.
"""
from __future__ import annotations

import copy

from torch import nn

from ds_smoes.parallel import distributed
from ds_smoes.core.config import SMoESConfig, validate
from ds_smoes.core.errors import ConfigError
from ds_smoes.hf.adapters import RouterSpec, block_adapter_for, model_adapter_for
from ds_smoes.hf.adapters.base import ModelAdapter
from ds_smoes.hf.attention import AttentionScoreTracker, capturing_implementation
from ds_smoes.hf.block import build_block
from ds_smoes.hf.context import ModalityContext
from ds_smoes.hf.model import SMoESHFModel

ROUTING_FIELDS = ("num_experts", "k", "normalize_topk")


def smoes_config_for(spec: RouterSpec, smoes: SMoESConfig | None = None) -> SMoESConfig:
    """`smoes` with the routing fields the model dictates; a field set explicitly to another value is an error."""
    data = smoes.model_dump() if smoes is not None else {}
    explicit = smoes.model_fields_set if smoes is not None else set()
    for name in ROUTING_FIELDS:
        value = getattr(spec, name)
        if name in explicit and data[name] != value:
            raise ConfigError(f"smoes.{name}={data[name]} but the model's MoE blocks have {name}={value}: remove "
                              f"smoes.{name} (it is taken from the model) or set it to {value}")
        data[name] = value
    if spec.k == 1 and spec.normalize_topk:
        raise ConfigError("the model routes top-1 with renormalised weights (always 1.0); the SMoES gate keeps the "
                          "gate probability for k=1 so that the router gets a gradient, which changes the model's "
                          "outputs: convert a model with k >= 2 or norm_topk_prob=false")
    return validate(SMoESConfig, data, source="smoes config for the converted model")


def default_ep_rank(ep_size: int) -> int:
    """DeepSpeed groups consecutive ranks into expert-parallel groups: EP rank = rank % ep_size."""
    return distributed.rank() % ep_size if ep_size > 1 else 0


def attach_modality_context(model: nn.Module, adapter: ModelAdapter, smoes: SMoESConfig) -> tuple[ModalityContext, list]:
    """The model's ModalityContext and, for attention scores, the per-layer hooks that carry them."""
    track = smoes.effective_score_type == "attention"
    context = ModalityContext(tuple(adapter.placeholder_ids(model.config)), track_scores=track)
    trackers = []
    if context.track_scores:
        layers = adapter.decoder_layers(model)
        text_config = layers[0].self_attn.config
        text_config._attn_implementation = capturing_implementation(text_config._attn_implementation or "sdpa")
        trackers = [AttentionScoreTracker(i, layer, layer.self_attn, context) for i, layer in enumerate(layers)]
    return context, trackers


def _disable_hf_router_loss(model: nn.Module, adapter: ModelAdapter) -> None:
    """The transformers load-balancing loss reads router logits that no longer exist; SMoES's l_aux replaces it."""
    for cfg in (model.config, adapter.text_config(model.config)):
        if hasattr(cfg, "output_router_logits"):
            cfg.output_router_logits = False


def convert_to_smoes(model: nn.Module, smoes: SMoESConfig | None = None, ep_rank: int | None = None) -> SMoESHFModel:
    """Replace every sparse-MoE block of `model` (in place) by an SMoESBlock; return the wrapped model."""
    adapter = model_adapter_for(model.config)
    layers = adapter.decoder_layers(model)
    found = [(i, layer.mlp, block_adapter_for(layer.mlp)) for i, layer in enumerate(layers)]
    sparse = [(i, block, ba) for i, block, ba in found if ba is not None]
    if not sparse:
        kinds = sorted({type(block).__name__ for _, block, _ in found})
        raise ConfigError(f"no sparse-MoE block with an adapter in {type(model).__name__} (decoder MLPs: {kinds}); a "
                          "dense model is upcycled with ds_smoes.hf.upcycle_to_smoes, an unknown MoE block needs an "
                          "adapter (docs/hf.md)")
    specs = {ba.router(block) for _, block, ba in sparse}
    if len(specs) != 1:
        raise ConfigError(f"the MoE blocks route differently ({sorted(map(str, specs))}); one SMoES config per model "
                          "needs one expert count and top-k")
    cfg = smoes_config_for(specs.pop(), smoes)
    rank = default_ep_rank(cfg.ep_size) if ep_rank is None else ep_rank
    original_config = copy.deepcopy(model.config)
    context, trackers = attach_modality_context(model, adapter, cfg)
    for i, block, ba in sparse:
        shared = {name: getattr(block, name) for name in ba.shared}
        layers[i].mlp = build_block(ba.weights(block), ba, cfg, context, rank, shared, type(block).__name__)
    _disable_hf_router_loss(model, adapter)
    wrapped = SMoESHFModel(model, adapter, cfg, context, original_config, upcycled=False)
    wrapped.trackers = trackers
    return wrapped
