"""`ltdr`: Long-Tailed Distribution-aware Router (arXiv 2507.01351).

Load balancing on text tokens only (vision tokens are free of it).  A vision token is a "tail"
token when the variance of its router probability vector exceeds the mean variance over the
vision tokens of its sample; tail tokens use the top-a experts (a > k), every other token the
top-k, with weights renormalised over the selected experts.  Routes are [a, S]; a non-tail
token's routes k..a-1 are -1 (unused), so capacity is sized from the routes really requested.
"""
from __future__ import annotations

import torch

from ds_smoes.moe.gate import ModalityGate
from ds_smoes.core.losses import count_samples, gshard_balance_loss


def ltdr_tail_tokens(probs_SE: torch.Tensor, labels_S: torch.Tensor, sample_id_S: torch.Tensor,
                     valid_S: torch.Tensor) -> torch.Tensor:
    """tail_S: valid vision tokens whose probability variance exceeds their sample's vision mean."""
    var_S = probs_SE.detach().var(dim=1, unbiased=False)
    vision_S = valid_S.bool() & (labels_S == 1)
    num_samples = count_samples(sample_id_S)
    total_N = var_S.new_zeros(num_samples).index_add(0, sample_id_S, var_S * vision_S)
    count_N = var_S.new_zeros(num_samples).index_add(0, sample_id_S, vision_S.to(var_S.dtype))
    mean_N = total_N / count_N.clamp_min(1.0)
    return vision_S & (var_S > mean_N[sample_id_S])


class LTDRGate(ModalityGate):
    variable_routes = True  # tail tokens take a routes, the others k

    def __init__(self, model_dim, config, ep_group=None) -> None:
        super().__init__(model_dim, config, ep_group, num_routes=config.ltdr_top_a)

    def select(self, probs_SE, inputs, valid_S):
        top_idx_SO = torch.topk(probs_SE, k=self.config.ltdr_top_a, dim=1).indices
        tail_S = ltdr_tail_tokens(probs_SE, inputs.labels_S, inputs.sample_id_S, valid_S)
        extra_SO = torch.arange(self.config.ltdr_top_a, device=probs_SE.device).unsqueeze(0) >= self.config.k
        return torch.where(extra_SO & ~tail_S.unsqueeze(1), torch.full_like(top_idx_SO, -1), top_idx_SO)

    def aux_losses(self, probs_SE, routes, inputs, valid_S):
        l_bal = gshard_balance_loss(probs_SE, routes.selected_SE, valid_S & (inputs.labels_S == 0))
        tail = ltdr_tail_tokens(probs_SE, inputs.labels_S, inputs.sample_id_S, valid_S)
        share = tail.float().sum() / (valid_S & (inputs.labels_S == 1)).float().sum().clamp_min(1.0)
        return self.config.alpha_bal * l_bal, {"gshard_balance_text": l_bal, "tail_share": share}
