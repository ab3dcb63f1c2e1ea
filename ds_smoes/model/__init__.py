"""A small MoE vision-language model (MoE-LLaVA style) that trains on CPU.

`TinyMoEVLM`, `VLMOutput` and `model_inputs` are imported from `ds_smoes.model.vlm` on first use: the model
imports the compression suite (`ds_smoes.compress`), whose modules import building blocks of this package
(`model.vision`, `model.attention`), so importing vlm here, eagerly, would make importing a compression module
first a circular import (tests/test_layers.py imports every such module first, in a fresh interpreter).
"""
from ds_smoes.model.config import ModelConfig

__all__ = ["ModelConfig", "TinyMoEVLM", "VLMOutput", "model_inputs"]


def __getattr__(name: str):
    if name in ("TinyMoEVLM", "VLMOutput", "model_inputs"):
        from ds_smoes.model import vlm

        return getattr(vlm, name)
    raise AttributeError(f"module 'ds_smoes.model' has no attribute {name!r}")
