"""SMoES auxiliary losses (SMOES.md section 3): inter-bin mutual information and bin balance.

Pure functions of one MoE layer's routing.  Shapes: S tokens, E experts, M modalities,
B bins, N samples.  `probs_SE` is the dense router softmax (differentiable).
"""
from __future__ import annotations

import torch

from ds_smoes.binning import bin_one_hot

_TINY = 1e-30


def _num_bins(bin_of_expert_E: torch.Tensor, num_bins: int | None) -> int:
    return int(bin_of_expert_E.max()) + 1 if num_bins is None else num_bins


def per_sample_mutual_information(probs_SE: torch.Tensor, modality_SM: torch.Tensor,
                                  bin_of_expert_E: torch.Tensor, sample_id_S: torch.Tensor,
                                  valid_S: torch.Tensor | None = None,
                                  num_bins: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """I_i between modality and bin for every sample i (natural log).

    S[i,m,b] = sum_{e in b} sum_j M[j,m] g[j,e] / (N_B sum_j M[j,m])
    P_i(m,b) = S[i,m,b] / sum_{m,b} S[i,m,b]
    I_i      = sum_{m,b} P_i(m,b) log(P_i(m,b) / (P_i(m) P_i(b)))

    A modality absent from a sample contributes nothing (0 log 0 = 0), so I_i stays finite.
    Returns (mi_N, has_tokens_N): padding-only samples have has_tokens False.
    """
    num_bins = _num_bins(bin_of_expert_E, num_bins)
    experts_per_bin = probs_SE.shape[1] // num_bins
    weight_SM = modality_SM.to(probs_SE.dtype)
    if valid_S is not None:
        weight_SM = weight_SM * valid_S.to(probs_SE.dtype).unsqueeze(-1)
    num_samples = int(sample_id_S.max()) + 1 if sample_id_S.numel() else 0
    probs_SB = probs_SE @ bin_one_hot(bin_of_expert_E, num_bins).to(probs_SE)
    mass_SMB = weight_SM.unsqueeze(-1) * probs_SB.unsqueeze(1)
    num_NMB = probs_SE.new_zeros(num_samples, *mass_SMB.shape[1:]).index_add(0, sample_id_S, mass_SMB)
    den_NM = probs_SE.new_zeros(num_samples, weight_SM.shape[1]).index_add(0, sample_id_S, weight_SM)
    present_NM = den_NM > 0
    s_NMB = num_NMB / (experts_per_bin * torch.where(present_NM, den_NM, 1.0)).unsqueeze(-1)
    s_NMB = s_NMB * present_NM.unsqueeze(-1)
    total_N = s_NMB.sum((1, 2))
    has_tokens_N = total_N > 0
    p_NMB = s_NMB / torch.where(has_tokens_N, total_N, 1.0)[:, None, None]
    p_m_NM = p_NMB.sum(2)
    p_b_NB = p_NMB.sum(1)
    positive = p_NMB > 0
    # Replace zeros by one before the logs so the masked-out branch has finite gradients.
    safe = lambda t: torch.where(t > 0, t, torch.ones_like(t))  # noqa: E731
    log_ratio = safe(p_NMB).log() - safe(p_m_NM).log().unsqueeze(-1) - safe(p_b_NB).log().unsqueeze(1)
    mi_N = torch.where(positive, p_NMB * log_ratio, torch.zeros_like(p_NMB)).sum((1, 2))
    return mi_N, has_tokens_N


def mutual_information_loss(probs_SE: torch.Tensor, modality_SM: torch.Tensor, bin_of_expert_E: torch.Tensor,
                            sample_id_S: torch.Tensor, valid_S: torch.Tensor | None = None,
                            num_bins: int | None = None) -> torch.Tensor:
    """L_MI of one layer: minus the batch mean of per-sample modality-bin MI (natural log).

    Samples with no valid token are left out of the mean; an all-padding batch gives 0.
    """
    mi_N, has_tokens_N = per_sample_mutual_information(probs_SE, modality_SM, bin_of_expert_E, sample_id_S,
                                                       valid_S, num_bins)
    if not bool(has_tokens_N.any()):
        return probs_SE.sum() * 0.0
    return -mi_N[has_tokens_N].mean()


def bin_balance_loss(probs_SE: torch.Tensor, selected_SE: torch.Tensor, bin_of_expert_E: torch.Tensor,
                     valid_S: torch.Tensor | None = None, num_bins: int | None = None) -> torch.Tensor:
    """L_bal of one layer: sum_b N_B * sum_{e in b} f_e * P_e.

    f_e: share of the bin's routed (token, expert) selections that went to e (no gradient);
    P_e: mean over valid tokens of g_e renormalised inside e's bin (ours).
    Equals N_bins when load and probabilities are uniform inside every bin.
    """
    num_bins = _num_bins(bin_of_expert_E, num_bins)
    experts_per_bin = probs_SE.shape[1] // num_bins
    onehot_EB = bin_one_hot(bin_of_expert_E, num_bins).to(probs_SE)
    bin_idx_E = bin_of_expert_E.long()
    if valid_S is None:
        valid_S = torch.ones(probs_SE.shape[0], dtype=torch.bool, device=probs_SE.device)
    valid_S = valid_S.bool()
    probs_VE = probs_SE[valid_S]
    if probs_VE.shape[0] == 0:
        return probs_SE.sum() * 0.0
    in_bin_VE = probs_VE / (probs_VE @ onehot_EB)[:, bin_idx_E].clamp_min(_TINY)
    p_E = in_bin_VE.mean(0)
    count_E = selected_SE[valid_S].float().sum(0)
    bin_count_E = (count_E @ onehot_EB)[bin_idx_E]
    f_E = (count_E / bin_count_E.clamp_min(1.0)).detach()
    return experts_per_bin * (f_E * p_E).sum()
