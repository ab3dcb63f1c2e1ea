"""Load the model behind `--hf-model PATH_OR_CONFIG` and convert or upcycle it."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ds_smoes.core.config import SMoESConfig
from ds_smoes.core.errors import ConfigError
from ds_smoes.hf.adapters import block_adapter_for, model_adapter_for
from ds_smoes.hf.convert import convert_to_smoes
from ds_smoes.hf.model import SMoESHFModel
from ds_smoes.hf.upcycle import upcycle_to_smoes


def load_hf_model(spec: str, attn_implementation: str = "sdpa", seed: int = 0):
    """(transformers model, folder to look for its processor in).  A directory is loaded with
    from_pretrained; a .json file is a config, randomly initialised from `seed` (identical on every rank)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"--hf-model {spec}: the directory has no config.json (a save_pretrained folder needed)")
        model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation=attn_implementation,
                                                            dtype=torch.float32)
        return model, path
    if path.is_file() and path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"--hf-model {spec}: not valid JSON: {err}") from None
        if "model_type" not in data:
            raise ConfigError(f"--hf-model {spec}: a config JSON needs 'model_type' (e.g. 'qwen3_vl_moe')")
        config = AutoConfig.for_model(**data)
        torch.manual_seed(seed)
        return AutoModelForImageTextToText.from_config(config, attn_implementation=attn_implementation), path.parent
    if not path.exists():
        raise ConfigError(f"--hf-model {spec}: not found (give a save_pretrained directory or a config .json file; "
                          f"relative paths are from {Path.cwd()})")
    raise ConfigError(f"--hf-model {spec}: expected a save_pretrained directory or a config .json file")


def has_sparse_blocks(model) -> bool:
    layers = model_adapter_for(model.config).decoder_layers(model)
    return any(block_adapter_for(layer.mlp) is not None for layer in layers)


def to_smoes(model, smoes: SMoESConfig, mode: str, upcycle_layers, seed: int = 0) -> SMoESHFModel:
    """convert (MoE blocks), upcycle (dense MLPs) or auto (convert when the model has sparse blocks)."""
    sparse = has_sparse_blocks(model)
    if mode == "auto":
        mode = "convert" if sparse else "upcycle"
    if mode == "convert":
        return convert_to_smoes(model, smoes)
    if sparse:
        raise ConfigError("hf.mode=upcycle but the model already has sparse-MoE blocks: use hf.mode=convert")
    return upcycle_to_smoes(model, smoes, upcycle_layers, seed=seed)
