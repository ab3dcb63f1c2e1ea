"""SMoESBlock: what replaces a Hugging Face sparse-MoE block (router + experts) in the decoder.

It holds an `SMoESMoE` (DeepSpeed MoE with the SMoES gate; one `GatedExpert` per expert) and the
modules the architecture keeps beside the routed experts (shared experts), under their original
names.  Called like the block it replaces (`mlp(hidden_states_BTD) -> hidden_states_BTD`); the
modality labels, padding mask and attention scores come from the model's `ModalityContext`, and
the layer's `l_aux` goes back to it.
"""
from __future__ import annotations

import torch
from torch import nn

from ds_smoes.core.config import SMoESConfig
from ds_smoes.hf.adapters.base import BlockAdapter, ExpertWeights
from ds_smoes.hf.context import ModalityContext
from ds_smoes.hf.experts import GatedExpert, load_expert_, local_expert_ids
from ds_smoes.moe.layer import SMoESMoE


class SMoESBlock(nn.Module):
    def __init__(self, moe: SMoESMoE, adapter: BlockAdapter, context: ModalityContext,
                 shared: dict[str, nn.Module] | None = None, source_class: str = "") -> None:
        super().__init__()
        self.moe = moe
        self.adapter = adapter
        self.context = context
        self.source_class = source_class          # the HF block class this replaced (export writes it back)
        self.shared_names = tuple((shared or {}).keys())
        for name, module in (shared or {}).items():
            setattr(self, name, module)

    def forward(self, hidden_states_BTD: torch.Tensor) -> torch.Tensor:
        batch = self.context.require(tuple(hidden_states_BTD.shape[:-1]))
        out_BTD, l_aux, _ = self.moe(hidden_states_BTD, batch.valid_BT, modality_labels=batch.labels_BT,
                                     modality_scores=batch.scores_BTM)
        self.context.aux_losses.append(l_aux)
        extra_BTD = self.adapter.shared_output(self, hidden_states_BTD) if self.shared_names else None
        return out_BTD if extra_BTD is None else out_BTD + extra_BTD


def build_block(weights: ExpertWeights, adapter: BlockAdapter, config: SMoESConfig, context: ModalityContext,
                ep_rank: int, shared: dict[str, nn.Module] | None = None, source_class: str = "") -> SMoESBlock:
    """An SMoESBlock whose router and this EP rank's experts are copies of `weights` (no re-initialisation)."""
    num_experts, two_i, hidden = weights.gate_up_EFD.shape
    moe = SMoESMoE(hidden, GatedExpert(hidden, two_i // 2, weights.act_fn), config)
    with torch.no_grad():
        moe.gate.wg.weight.copy_(weights.router_ED.float())
    experts = moe.deepspeed_moe.experts.deepspeed_experts
    for local, global_id in enumerate(local_expert_ids(num_experts, config.ep_size, ep_rank)):
        experts[local].to(weights.gate_up_EFD.dtype)
        load_expert_(experts[local], weights.gate_up_EFD[global_id], weights.down_EDI[global_id])
    return SMoESBlock(moe, adapter, context, shared, source_class)
