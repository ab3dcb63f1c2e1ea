"""The layout transformers 5 uses for most sparse-MoE blocks: `block.gate` a TopKRouter with
`weight` [E, D] and `top_k`; `block.experts` with fused `gate_up_proj` [E, 2I, D], `down_proj` [E, D, I]
and `act_fn`.  OLMoE, Qwen2-MoE, Qwen3-MoE and Qwen3-VL-MoE differ only in whether top-k weights
are renormalised and in shared experts."""
from __future__ import annotations

import torch
from torch import nn

from ds_smoes.core.errors import ConfigError
from ds_smoes.hf.adapters.base import BlockAdapter, ExpertWeights, RouterSpec


class FusedTopKBlock(BlockAdapter):
    def __init__(self, block_class: str, always_normalize: bool = False) -> None:
        self.block_class = block_class
        self.always_normalize = always_normalize   # the router renormalises unconditionally (no norm_topk_prob)

    def router(self, block: nn.Module) -> RouterSpec:
        gate = block.gate
        normalize = self.always_normalize or bool(getattr(gate, "norm_topk_prob", False))
        return RouterSpec(num_experts=int(gate.num_experts), k=int(gate.top_k), normalize_topk=normalize)

    def weights(self, block: nn.Module) -> ExpertWeights:
        experts = block.experts
        layout = {k: getattr(experts, k, d) for k, d in (("is_transposed", False), ("is_concatenated", True),
                                                        ("has_bias", False), ("has_gate", True))}
        if layout != {"is_transposed": False, "is_concatenated": True, "has_bias": False, "has_gate": True}:
            raise ConfigError(f"{self.block_class}: expert layout {layout} is not the fused [gate; up] layout this "
                              "adapter copies; write an adapter for it (docs/hf.md)")
        return ExpertWeights(block.gate.weight.detach(), experts.gate_up_proj.detach(), experts.down_proj.detach(),
                             experts.act_fn)

    def hf_state(self, weights: ExpertWeights) -> dict[str, torch.Tensor]:
        return {"gate.weight": weights.router_ED, "experts.gate_up_proj": weights.gate_up_EFD,
                "experts.down_proj": weights.down_EDI}


class SharedExpertBlock(FusedTopKBlock):
    """Qwen2-MoE style: out = routed experts + sigmoid(shared_expert_gate(x)) * shared_expert(x)."""

    shared = ("shared_expert", "shared_expert_gate")

    def shared_output(self, owner: nn.Module, x_BTD: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(owner.shared_expert_gate(x_BTD)) * owner.shared_expert(x_BTD)
