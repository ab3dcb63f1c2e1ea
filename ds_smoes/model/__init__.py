"""A small MoE vision-language model (MoE-LLaVA style) that trains on CPU."""
from ds_smoes.model.config import ModelConfig
from ds_smoes.model.vlm import TinyMoEVLM, VLMOutput, model_inputs

__all__ = ["ModelConfig", "TinyMoEVLM", "VLMOutput", "model_inputs"]
