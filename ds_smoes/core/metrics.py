"""Specialisation and communication metrics (docs/method.md, "Metrics").

Shapes: L layers, E experts, K routes per token, S tokens.
"""
from __future__ import annotations

import torch


def modality_specialization_index(load_text_LE: torch.Tensor, load_vision_LE: torch.Tensor) -> torch.Tensor:
    """MSI = mean over layers and experts of 2 * |Ct_e - 0.5|.

    Ct_e is expert e's share of text in its modality-normalised load: with
    t_e = load_text[e] / sum_e load_text and v_e = load_vision[e] / sum_e load_vision,
    Ct_e = t_e / (t_e + v_e).  0 means no specialisation, 1 perfect specialisation.
    Experts that received no token in a layer have no Ct and are left out of the mean;
    a layer missing one modality entirely contributes nothing either (its Ct would be
    trivially 0 or 1).  Returns a 0-dim float tensor (0 when nothing is defined).
    """
    text = load_text_LE.double()
    vision = load_vision_LE.double()
    if text.dim() == 1:
        text, vision = text.unsqueeze(0), vision.unsqueeze(0)
    text_total_L1 = text.sum(-1, keepdim=True)
    vision_total_L1 = vision.sum(-1, keepdim=True)
    layer_ok_L1 = (text_total_L1 > 0) & (vision_total_L1 > 0)
    t_LE = text / text_total_L1.clamp_min(1e-300)
    v_LE = vision / vision_total_L1.clamp_min(1e-300)
    denom_LE = t_LE + v_LE
    defined_LE = layer_ok_L1 & (denom_LE > 0)
    ct_LE = t_LE / denom_LE.clamp_min(1e-300)
    spec_LE = 2.0 * (ct_LE - 0.5).abs()
    if not bool(defined_LE.any()):
        return spec_LE.new_zeros((), dtype=torch.float32)
    return spec_LE[defined_LE].mean().float()


def expert_modality_load(indices_KS: torch.Tensor, labels_S: torch.Tensor, valid_S: torch.Tensor,
                         num_experts: int, weight_SM: torch.Tensor | None = None) -> torch.Tensor:
    """[2, E] tokens routed to each expert per modality (routes with index -1 are dropped ones).

    With `weight_SM` (soft modality scores) each route counts with the token's score instead of
    its hard label.
    """
    if weight_SM is None:   # one-hot of the hard label (a comparison: F.one_hot reads the labels' range back)
        weight_SM = (labels_S.long().unsqueeze(-1) == torch.arange(2, device=labels_S.device)).float()
    return weight_SM.T @ routes_per_column(indices_KS, valid_S, num_experts).to(weight_SM.dtype)


def routes_per_column(indices_KS: torch.Tensor, valid_S: torch.Tensor | None, num_columns: int,
                      column_E: torch.Tensor | None = None) -> torch.Tensor:
    """[S, C] how many of each valid token's routes land in column c (c = expert, or `column_E[expert]`).

    Routes with index -1 are not counted; valid_S None counts every token's routes."""
    keep_KS = indices_KS >= 0
    if valid_S is not None:
        keep_KS = keep_KS & valid_S.bool().unsqueeze(0)
    col_KS = indices_KS.long().clamp_min(0)
    if column_E is not None:
        col_KS = column_E.to(col_KS.device).long()[col_KS]
    col_KS = torch.where(keep_KS, col_KS, num_columns)  # an extra column collects what is not routed
    count_SX = torch.zeros(indices_KS.shape[1], num_columns + 1, dtype=torch.int32, device=indices_KS.device)
    count_SX.scatter_add_(1, col_KS.T, torch.ones_like(col_KS.T, dtype=torch.int32))
    return count_SX[:, :num_columns]


def routing_comm_stats(indices_KS: torch.Tensor, rank_of_expert_E: torch.Tensor, home_rank: int,
                       valid_S: torch.Tensor, ep_size: int) -> dict[str, torch.Tensor]:
    """Routing-level expert-parallel communication of the tokens that live on `home_rank`.

    - cross_rank_rate: share of valid tokens with at least one selected expert on another rank;
    - ranks_per_token: mean number of distinct ranks holding a valid token's selected experts;
    - remote_pairs_per_token: mean number of (token, remote rank) pairs, the number of token
      vectors a token-once-per-rank dispatch would send (each way).
    Values are 0-dim tensors; `num_tokens` is the count they average over.
    """
    hits_SR = routes_per_column(indices_KS, valid_S, ep_size, rank_of_expert_E) > 0
    return rank_hit_stats(hits_SR, home_rank, valid_S)


def rank_hit_stats(hits_SR: torch.Tensor, home_rank: int, valid_S: torch.Tensor) -> dict[str, torch.Tensor]:
    """routing_comm_stats' figures from hits_SR (token s needs EP rank r), over the tokens in `valid_S`."""
    valid_S = valid_S.bool()
    num_tokens = valid_S.sum()
    n = num_tokens.clamp_min(1).float()   # no token: every figure 0 (sums of nothing over 1), no host read
    hits_SR = hits_SR & valid_S.unsqueeze(1)
    ranks_S = hits_SR.sum(1)
    remote_S = ranks_S - hits_SR[:, home_rank].long()
    return {
        "cross_rank_rate": (remote_S > 0).sum().float() / n,
        "ranks_per_token": ranks_S.sum().float() / n,
        "remote_pairs_per_token": remote_S.sum().float() / n,
        "num_tokens": num_tokens,
    }
