"""How much chosen query rows attend each key, computed from those rows only (visual token pruning, issue 19).

LearnPruner's stage 2 and the FastV-style baseline keep the vision tokens that the text query attends most at a
middle decoder block.  The score of key s is the block's causal attention probability from the chosen query
rows, averaged over heads and over those rows:

    score_s = 1/|Q| sum_{q in Q} 1/A sum_h softmax_{s' <= p_q, valid}(q_h . k_h,s' / sqrt(d))_s

with p_q the query's position.  Only the |Q| chosen rows of the probability matrix are made: O(Q * U) per head,
never the [T, U] one, so the score exists whatever kernel computed the block's output (the fused
`scaled_dot_product_attention` returns no probabilities).  Each row is the exact softmax over that query's
allowed keys, the row the eager attention materialises (`ds_smoes.model.attention`: float32 softmax).

`keep_top_budget` then keeps, per sample, the `budget` candidate tokens (the vision tokens) of highest score; a
mask keeps the tokens in their original order.

Shapes: B batch, A heads, Q chosen query rows (padded per batch: `query_valid_BQ` says which are real), U key
positions, T sequence positions (U = T here), d head dimension.  Torch only.
"""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def query_attention_scores(query_BAQd: torch.Tensor, key_BAUd: torch.Tensor, query_position_BQ: torch.Tensor,
                           query_valid_BQ: torch.Tensor, key_valid_BU: torch.Tensor | None = None,
                           scaling: float | None = None) -> torch.Tensor:
    """score_BU (float32): the attention each key receives from the valid query rows, averaged over heads and rows.

    - Query q of row b sits at key position `query_position_BQ[b, q]` and sees the keys up to it (causal) that
      `key_valid_BU` marks (None: all), its own position always (as `attention_mask` allows it).
    - A row without a valid query gets zeros (a language-only row with nothing to score, or no query rows).
    - The logits are computed in the inputs' dtype and the softmax in float32, as the eager attention does.
    - `scaling`: None = 1 / sqrt(d).
    """
    b, a, n_q, d = query_BAQd.shape
    u = key_BAUd.shape[2]
    if key_BAUd.shape[:2] != (b, a) or key_BAUd.shape[3] != d:
        raise ValueError(f"keys {tuple(key_BAUd.shape)} do not match queries {tuple(query_BAQd.shape)} "
                         "(B, heads and head dim must agree)")
    if query_position_BQ.shape != (b, n_q) or query_valid_BQ.shape != (b, n_q):
        raise ValueError(f"query positions {tuple(query_position_BQ.shape)} and validity "
                         f"{tuple(query_valid_BQ.shape)} must be [B, Q] = {(b, n_q)}")
    scale = scaling if scaling is not None else 1.0 / math.sqrt(d)
    logits_BAQU = (query_BAQd @ key_BAUd.transpose(-1, -2)).float() * scale
    key_U = torch.arange(u, device=key_BAUd.device)
    allowed_BQU = key_U[None, None, :] <= query_position_BQ[:, :, None]
    if key_valid_BU is not None:
        allowed_BQU = allowed_BQU & key_valid_BU.bool()[:, None, :]
    allowed_BQU = allowed_BQU | (key_U[None, None, :] == query_position_BQ[:, :, None])   # never an empty row
    probs_BQU = torch.softmax(logits_BAQU.masked_fill(~allowed_BQU[:, None], float("-inf")), dim=-1).mean(1)
    weight_BQ = query_valid_BQ.to(probs_BQU.dtype)
    return (probs_BQU * weight_BQ[:, :, None]).sum(1) / weight_BQ.sum(1, keepdim=True).clamp_min(1.0)


def keep_top_budget(score_BT: torch.Tensor, candidate_BT: torch.Tensor, budget_B: torch.Tensor) -> torch.Tensor:
    """keep_BT (bool): per row, the `budget_B[b]` candidates of highest score (all of them when fewer); ties go to
    the earlier position.  Non-candidates are False: the caller decides what else stays.  The mask keeps the
    kept tokens' original order (their indices, `keep_BT[b].nonzero()`, are sorted).  On the device, no host
    read."""
    if score_BT.shape != candidate_BT.shape or budget_B.shape != score_BT.shape[:1]:
        raise ValueError(f"scores {tuple(score_BT.shape)}, candidates {tuple(candidate_BT.shape)} and budgets "
                         f"{tuple(budget_B.shape)} must be [B, T], [B, T] and [B]")
    masked_BT = score_BT.float().masked_fill(~candidate_BT.bool(), float("-inf"))
    order_BT = torch.sort(masked_BT, dim=-1, descending=True, stable=True).indices
    rank_BT = torch.empty_like(order_BT).scatter_(
        1, order_BT, torch.arange(order_BT.shape[1], device=order_BT.device).expand_as(order_BT))
    return candidate_BT.bool() & (rank_BT < budget_B[:, None])
