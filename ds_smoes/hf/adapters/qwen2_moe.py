"""Qwen2-MoE (`qwen2_moe`): routed experts plus a sigmoid-gated shared expert, kept as it is."""
from ds_smoes.hf.adapters.base import register_block
from ds_smoes.hf.adapters.fused import SharedExpertBlock

register_block(SharedExpertBlock("Qwen2MoeSparseMoeBlock"))
