"""The Hugging Face path through DeepSpeed's AutoEP (`hf.backend: autoep`, docs/hf.md).

The default path (`hf.backend: ds_smoes`) replaces every sparse-MoE block with ds-smoes' own layer on DeepSpeed's
legacy MoE before DeepSpeed sees the model.  This one leaves the blocks to DeepSpeed's AutoEP: the model is wrapped (modality context,
attention-score hooks) but not converted; `autoep_section` completes the DeepSpeed config's `expert_parallel`
section for the wrapper (the blocks' module pattern under it, the preset, experts, top-k, renormalisation and the EP
size); `deepspeed.initialize` builds AutoEP's layers; `adopt_autoep` puts the ds-smoes gate on each of them
(`ds_smoes.moe.autoep`).

    model = prepare_autoep(hf_model, smoes)                       # SMoESHFModel, blocks untouched
    ds_config["expert_parallel"] = autoep_section(model, ds_config.get("expert_parallel", {}))
    engine, *_ = deepspeed.initialize(model=model, optimizer=..., config=ds_config)
    adopt_autoep(model)                                           # the gates, before the first forward
"""
from __future__ import annotations

import copy
import re

from torch import nn

from ds_smoes.core.config import SMoESConfig
from ds_smoes.core.errors import ConfigError
from ds_smoes.hf.adapters import block_adapter_for, model_adapter_for
from ds_smoes.hf.convert import _disable_hf_router_loss, attach_modality_context, smoes_config_for
from ds_smoes.hf.model import SMoESHFModel
from ds_smoes.moe.autoep import SMoESAutoEPLayer, adopt_autoep_layers

# text backbones whose sparse-MoE block (router `gate`, fused experts `experts`, softmax top-k) AutoEP's
# `qwen3_moe` preset reads; its other presets are named by the model type itself
PRESET_OF_MODEL_TYPE = {"qwen3_moe": "qwen3_moe", "qwen2_moe": "qwen3_moe", "qwen3_vl_moe_text": "qwen3_moe",
                        "olmoe": "qwen3_moe", "mixtral": "mixtral", "deepseek_v2": "deepseek_v2",
                        "deepseek_v3": "deepseek_v3"}


def prepare_autoep(model: nn.Module, smoes: SMoESConfig | None = None) -> SMoESHFModel:
    """`model` wrapped for AutoEP: the modality context and hooks of the converted model, its MoE blocks left for
    `deepspeed.initialize` to replace.  The routing fields of `smoes` come from the blocks, as with
    `convert_to_smoes`."""
    adapter = model_adapter_for(model.config)
    layers = adapter.decoder_layers(model)
    sparse = [layer.mlp for layer in layers if block_adapter_for(layer.mlp) is not None]
    if not sparse:
        raise ConfigError(f"no sparse-MoE block in {type(model).__name__}: hf.backend=autoep needs an MoE "
                          "model (a dense one is upcycled through hf.backend=ds_smoes)")
    specs = {block_adapter_for(block).router(block) for block in sparse}
    if len(specs) != 1:
        raise ConfigError(f"the MoE blocks route differently ({sorted(map(str, specs))})")
    cfg = smoes_config_for(specs.pop(), smoes)
    original_config = copy.deepcopy(model.config)
    context, trackers = attach_modality_context(model, adapter, cfg)
    _disable_hf_router_loss(model, adapter)
    wrapped = SMoESHFModel(model, adapter, cfg, context, original_config, upcycled=False, backend="autoep")
    wrapped.trackers = trackers
    return wrapped


def autoep_section(model: SMoESHFModel, section: dict) -> dict:
    """The DeepSpeed config's `expert_parallel` section for the wrapped `model`: the user's, completed with what
    the model decides (module pattern under the wrapper, experts, top-k, renormalisation, a preset for the text
    backbone's type) and `autoep_size` = smoes.ep_size.  A value the user set that contradicts the model is an
    error."""
    smoes = model.smoes
    out = dict(section)
    if out.get("enabled") is False:
        raise ConfigError("hf.backend=autoep but the DeepSpeed config has expert_parallel.enabled=false: "
                          "enable it, or set hf.backend=ds_smoes")
    out["enabled"] = True
    size = out.setdefault("autoep_size", smoes.ep_size)
    if size != smoes.ep_size:
        raise ConfigError(f"expert_parallel.autoep_size={size} but smoes.ep_size={smoes.ep_size}: make them equal "
                          "(or leave autoep_size out of the DeepSpeed config)")
    names = [name for name, module in model.named_modules()
             if name.endswith(".mlp") and block_adapter_for(module) is not None]
    prefixes = {re.sub(r"\.\d+\.mlp$", "", name) for name in names}
    if len(prefixes) != 1:
        raise ConfigError(f"the MoE blocks sit under several module paths ({sorted(prefixes)}): set "
                          "expert_parallel.moe_layer_pattern in the DeepSpeed config")
    out.setdefault("moe_layer_pattern", re.escape(prefixes.pop()) + r"\.\d+\.mlp")
    text_type = model.adapter.text_config(model.hf_model.config).model_type
    if "preset_model" not in out:
        if text_type not in PRESET_OF_MODEL_TYPE:
            raise ConfigError(f"no AutoEP preset known for the text backbone {text_type!r}: set "
                              "expert_parallel.preset_model (or its router/expert patterns) in the DeepSpeed config, "
                              "or use hf.backend=ds_smoes")
        out["preset_model"] = PRESET_OF_MODEL_TYPE[text_type]
    for key, value in (("num_experts", smoes.num_experts), ("top_k", smoes.k), ("route_norm", smoes.normalize_topk)):
        if key in out and out[key] not in (value, "auto"):
            raise ConfigError(f"expert_parallel.{key}={out[key]} but the model's MoE blocks have {value}: remove it")
        out[key] = value
    return out


def adopt_autoep(model: SMoESHFModel) -> list[SMoESAutoEPLayer]:
    """After `deepspeed.initialize`: the ds-smoes gate on every AutoEP layer of `model`, fed by its context; the
    model's `smoes` becomes the config the layers use."""
    layers = adopt_autoep_layers(model, model.smoes, model.context)
    model.smoes = layers[0].config
    return layers
