"""Qwen3-MoE (`qwen3_moe`): top-k of the softmax, renormalised when `norm_topk_prob`; no shared experts."""
from ds_smoes.hf.adapters.base import register_block
from ds_smoes.hf.adapters.fused import FusedTopKBlock

register_block(FusedTopKBlock("Qwen3MoeSparseMoeBlock"))
