"""Per-architecture adapters; importing this package registers them all."""
from ds_smoes.hf.adapters import llava, olmoe, qwen2_moe, qwen3_moe, qwen3_vl  # noqa: F401  (registration)
from ds_smoes.hf.adapters.base import (BlockAdapter, ExpertWeights, ModelAdapter, RouterSpec, UpcycleTarget,
                                       block_adapter_for, model_adapter_for, register_block, register_model,
                                       supported_blocks)

__all__ = ["BlockAdapter", "ExpertWeights", "ModelAdapter", "RouterSpec", "UpcycleTarget", "block_adapter_for",
           "model_adapter_for", "register_block", "register_model", "supported_blocks"]
