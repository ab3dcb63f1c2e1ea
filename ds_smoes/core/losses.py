"""SMoES auxiliary losses (docs/method.md, "Losses"): inter-bin mutual information and bin balance.

Pure functions of one MoE layer's routing.  Shapes (glossary: `ds_smoes/__init__.py`): S tokens, E experts, M modalities,
G bins, N samples.  `probs_SE` is the dense router softmax (differentiable).
"""
from __future__ import annotations

import torch

from ds_smoes.core.binning import bin_one_hot

_TINY = 1e-30


def resolve_num_bins(bin_E: torch.Tensor, num_bins: int | None) -> int:
    return int(bin_E.max()) + 1 if num_bins is None else num_bins


def count_samples(sample_id_S: torch.Tensor) -> int:
    """N, the rows of a per-sample table: the largest sample id + 1 (0 without tokens).  This host read is one the
    per-sample losses need anyway, so it also refuses, at no extra cost, ids that would allocate rows for
    samples the batch cannot hold: at most one sample per token, so ids lie below the token count."""
    if not sample_id_S.numel():
        return 0
    num_samples = int(sample_id_S.max()) + 1
    if num_samples > sample_id_S.numel():
        raise sample_id_error(num_samples - 1, sample_id_S.numel())
    return num_samples


def sample_id_error(largest_id: int, num_tokens: int) -> ValueError:
    return ValueError(f"sample ids reach {largest_id} for {num_tokens} tokens: a sample id numbers the token's sample "
                      "within the batch (0, 1, ...), not within the dataset; pass sample_ids in [0, tokens)")


def modality_bin_table(probs_SE: torch.Tensor, modality_SM: torch.Tensor, bin_E: torch.Tensor,
                       sample_id_S: torch.Tensor, valid_S: torch.Tensor | None = None,
                       num_bins: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """S[i,m,b] = sum_{e in b} sum_j M[j,m] g[j,e] / (N_B sum_j M[j,m]) for every sample i.

    Returns (s_NMG, present_NM): present is False where sample i has no token of modality m
    (its row of S is then 0 instead of 0/0).
    """
    num_bins = resolve_num_bins(bin_E, num_bins)
    experts_per_bin = probs_SE.shape[1] // num_bins
    weight_SM = modality_SM.to(probs_SE.dtype)
    if valid_S is not None:
        weight_SM = weight_SM * valid_S.to(probs_SE.dtype).unsqueeze(-1)
    num_samples = count_samples(sample_id_S)
    probs_SG = probs_SE @ bin_one_hot(bin_E, num_bins).to(probs_SE)
    mass_SMG = weight_SM.unsqueeze(-1) * probs_SG.unsqueeze(1)
    num_NMG = probs_SE.new_zeros(num_samples, *mass_SMG.shape[1:]).index_add(0, sample_id_S, mass_SMG)
    den_NM = probs_SE.new_zeros(num_samples, weight_SM.shape[1]).index_add(0, sample_id_S, weight_SM)
    present_NM = den_NM > 0
    s_NMG = num_NMG / (experts_per_bin * torch.where(present_NM, den_NM, 1.0)).unsqueeze(-1)
    return s_NMG * present_NM.unsqueeze(-1), present_NM


def _safe(t: torch.Tensor) -> torch.Tensor:
    """Zeros replaced by one, so logs in a masked-out branch keep finite gradients."""
    return torch.where(t > 0, t, torch.ones_like(t))


def per_sample_mutual_information(probs_SE: torch.Tensor, modality_SM: torch.Tensor,
                                  bin_E: torch.Tensor, sample_id_S: torch.Tensor,
                                  valid_S: torch.Tensor | None = None,
                                  num_bins: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """I_i between modality and bin for every sample i (natural log).

    P_i(m,b) = S[i,m,b] / sum_{m,b} S[i,m,b]   (S from `modality_bin_table`)
    I_i      = sum_{m,b} P_i(m,b) log(P_i(m,b) / (P_i(m) P_i(b)))

    A modality absent from a sample contributes nothing (0 log 0 = 0), so I_i stays finite.
    Returns (mi_N, has_tokens_N): padding-only samples have has_tokens False.
    """
    s_NMG, _ = modality_bin_table(probs_SE, modality_SM, bin_E, sample_id_S, valid_S, num_bins)
    total_N = s_NMG.sum((1, 2))
    has_tokens_N = total_N > 0
    p_NMG = s_NMG / torch.where(has_tokens_N, total_N, 1.0)[:, None, None]
    p_m_NM = p_NMG.sum(2)
    p_b_NG = p_NMG.sum(1)
    log_ratio = _safe(p_NMG).log() - _safe(p_m_NM).log().unsqueeze(-1) - _safe(p_b_NG).log().unsqueeze(1)
    mi_N = torch.where(p_NMG > 0, p_NMG * log_ratio, torch.zeros_like(p_NMG)).sum((1, 2))
    return mi_N, has_tokens_N


def mutual_information_loss(probs_SE: torch.Tensor, modality_SM: torch.Tensor, bin_E: torch.Tensor,
                            sample_id_S: torch.Tensor, valid_S: torch.Tensor | None = None,
                            num_bins: int | None = None) -> torch.Tensor:
    """L_MI of one layer: minus the batch mean of per-sample modality-bin MI (natural log).

    Samples with no valid token are left out of the mean; an all-padding batch gives 0.
    """
    mi_N, has_tokens_N = per_sample_mutual_information(probs_SE, modality_SM, bin_E, sample_id_S,
                                                       valid_S, num_bins)
    if not bool(has_tokens_N.any()):
        return probs_SE.sum() * 0.0
    return -mi_N[has_tokens_N].mean()


def bin_balance_loss(probs_SE: torch.Tensor, selected_SE: torch.Tensor, bin_E: torch.Tensor,
                     valid_S: torch.Tensor | None = None, num_bins: int | None = None) -> torch.Tensor:
    """L_bal of one layer: sum_b N_B * sum_{e in b} f_e * P_e.

    f_e: share of the bin's routed (token, expert) selections that went to e (no gradient);
    P_e: mean over valid tokens of g_e renormalised inside e's bin (ours).
    Equals N_bins when load and probabilities are uniform inside every bin.
    """
    num_bins = resolve_num_bins(bin_E, num_bins)
    experts_per_bin = probs_SE.shape[1] // num_bins
    onehot_EG = bin_one_hot(bin_E, num_bins).to(probs_SE)
    bin_idx_E = bin_E.long()
    if valid_S is None:
        valid_S = torch.ones(probs_SE.shape[0], dtype=torch.bool, device=probs_SE.device)
    valid_S = valid_S.bool()
    valid_probs_SE = probs_SE[valid_S]
    if valid_probs_SE.shape[0] == 0:
        return probs_SE.sum() * 0.0
    in_bin_SE = valid_probs_SE / (valid_probs_SE @ onehot_EG)[:, bin_idx_E].clamp_min(_TINY)
    p_E = in_bin_SE.mean(0)
    count_E = selected_SE[valid_S].to(probs_SE.dtype).sum(0)
    bin_count_E = (count_E @ onehot_EG)[bin_idx_E]
    f_E = (count_E / bin_count_E.clamp_min(1.0)).detach()
    return experts_per_bin * (f_E * p_E).sum()


def gshard_balance_loss(probs_SE: torch.Tensor, selected_SE: torch.Tensor,
                        tokens_S: torch.Tensor | None = None) -> torch.Tensor:
    """GShard/Switch load balance over the tokens in `tokens_S` (all when None):
    E * sum_e f_e P_e, f_e = share of the selections that went to e, P_e = mean router probability.
    1 when load and probabilities are uniform."""
    if tokens_S is not None:
        probs_SE, selected_SE = probs_SE[tokens_S.bool()], selected_SE[tokens_S.bool()]
    if probs_SE.shape[0] == 0:
        return probs_SE.sum() * 0.0
    count_E = selected_SE.float().sum(0)
    f_E = (count_E / count_E.sum().clamp_min(1.0)).detach()
    return probs_SE.shape[1] * (f_E * probs_SE.mean(0)).sum()


def symmetric_kl(p_Q: torch.Tensor, q_Q: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """KL(p || q) + KL(q || p) over the last dimension Q (any distribution's support; natural log)."""
    p, q = p_Q.clamp_min(eps), q_Q.clamp_min(eps)
    return ((p - q) * (p.log() - q.log())).sum(-1)


def band_penalty(value: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """0 inside [low, high], the distance to the band outside it (linear hinge; ours)."""
    return torch.relu(low - value) + torch.relu(value - high)


def modality_kl_band_loss(probs_SE: torch.Tensor, labels_S: torch.Tensor, valid_S: torch.Tensor, low: float,
                          high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SMAR: symmetric KL between the mean routing distributions of text and vision tokens, penalised
    outside [low, high].  Returns (loss, kl); both 0 when a modality is absent from the batch."""
    valid_S = valid_S.bool()
    text_S, vision_S = valid_S & (labels_S == 0), valid_S & (labels_S == 1)
    if not bool(text_S.any()) or not bool(vision_S.any()):
        zero = probs_SE.sum() * 0.0
        return zero, zero.detach()
    kl = symmetric_kl(probs_SE[text_S].mean(0), probs_SE[vision_S].mean(0))
    return band_penalty(kl, low, high), kl.detach()


def bin_kl_band_loss(probs_SE: torch.Tensor, modality_SM: torch.Tensor, bin_E: torch.Tensor,
                     sample_id_S: torch.Tensor, low: float, high: float, valid_S: torch.Tensor | None = None,
                     num_bins: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SMoES "KL instead of MI" ablation: per sample, symmetric KL between the bin distributions
    of its text and its vision mass (P_i(b | m) from `modality_bin_table`), penalised outside
    [low, high] and averaged over samples holding both modalities.  Returns (loss, mean kl)."""
    s_NMG, present_NM = modality_bin_table(probs_SE, modality_SM, bin_E, sample_id_S, valid_S, num_bins)
    both_N = present_NM.all(1)
    if not bool(both_N.any()):
        zero = probs_SE.sum() * 0.0
        return zero, zero.detach()
    cond_NMG = s_NMG[both_N] / s_NMG[both_N].sum(-1, keepdim=True)
    kl_N = symmetric_kl(cond_NMG[:, 0], cond_NMG[:, 1])
    return band_penalty(kl_N, low, high).mean(), kl_N.mean().detach()
