"""`hard` and `hybrid`: hard modality routing.

hard: experts [0, t) serve text tokens, [t, E) vision tokens (e.g. t32-v32 of 64).
hybrid (MoIIE-style): [0, t) text, [t, t + v) vision, and the last `shared_experts` serve both.
A token's softmax and top-k run over the experts its modality may use; the GShard balance
loss is applied inside each modality's group and averaged over the modalities present.
"""
from __future__ import annotations

import torch

from ds_smoes.moe.gate import ModalityGate
from ds_smoes.core.losses import gshard_balance_loss


def modality_expert_mask(labels_S: torch.Tensor, num_experts: int, text_experts: int, vision_experts: int
                         ) -> torch.Tensor:
    """allowed_SE: text tokens may use [0, t) and the shared tail, vision tokens [t, t + v) and the tail."""
    expert_E = torch.arange(num_experts, device=labels_S.device)
    shared_E = expert_E >= text_experts + vision_experts
    text_E = (expert_E < text_experts) | shared_E
    vision_E = ((expert_E >= text_experts) & (expert_E < text_experts + vision_experts)) | shared_E
    return torch.where((labels_S == 1).unsqueeze(1), vision_E.unsqueeze(0), text_E.unsqueeze(0))


class ModalitySplitGate(ModalityGate):
    def _allowed(self, labels_S: torch.Tensor) -> torch.Tensor:
        text, vision = self.config.modality_split
        return modality_expert_mask(labels_S, self.config.num_experts, text, vision)

    def routing_probs(self, logits_SE, inputs):
        return torch.softmax(logits_SE.masked_fill(~self._allowed(inputs.labels_S), float("-inf")), dim=-1)

    def aux_losses(self, probs_SE, routes, inputs, valid_S):
        allowed_SE = self._allowed(inputs.labels_S)
        losses = []
        for m in (0, 1):
            tokens_S = valid_S & (inputs.labels_S == m)
            if bool(tokens_S.any()):
                cols_E = allowed_SE[tokens_S][0]
                losses.append(gshard_balance_loss(probs_SE[:, cols_E], routes.selected_SE[:, cols_E], tokens_S))
        l_bal = torch.stack(losses).mean() if losses else probs_SE.sum() * 0.0
        return self.config.alpha_bal * l_bal, {"gshard_balance": l_bal}
