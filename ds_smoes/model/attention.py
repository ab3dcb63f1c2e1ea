"""Multi-head self-attention that can also hand back head-averaged probabilities.

The attention modality score (SMOES.md section 1) needs A[query, key] averaged over heads.
With `impl="eager"` they come from the softmax that computes the output; with `impl="sdpa"`
the output comes from the fused kernel (which does not return probabilities) and A is
recomputed from q and k without gradient, for the score only.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def attention_mask(key_valid_BT: torch.Tensor, causal: bool) -> torch.Tensor:
    """[B, 1, T, T] bool: query t may attend key s.  A token always sees itself, so rows of
    left-padding positions are never empty (no NaN from an all-masked softmax)."""
    b, t = key_valid_BT.shape
    allowed_BTT = key_valid_BT.bool().unsqueeze(1).expand(b, t, t)
    if causal:
        allowed_BTT = allowed_BTT & torch.ones(t, t, dtype=torch.bool, device=key_valid_BT.device).tril()
    allowed_BTT = allowed_BTT | torch.eye(t, dtype=torch.bool, device=key_valid_BT.device)
    return allowed_BTT.unsqueeze(1)


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, impl: str = "sdpa") -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.impl = n_heads, d_model // n_heads, impl
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x_BTD: torch.Tensor, mask_B1TT: torch.Tensor, need_probs: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, t, d = x_BTD.shape
        q_BATd, k_BATd, v_BATd = (z.reshape(b, t, self.n_heads, self.head_dim).transpose(1, 2)
                                  for z in self.qkv(x_BTD).chunk(3, dim=-1))
        probs_BTT = None
        if self.impl == "eager":
            # the softmax in float32 whatever the weights' dtype (as Hugging Face's eager attention does): in bf16
            # its 8-bit mantissa blurs the probabilities, and with them the attention modality score
            scores_BATT = (q_BATd @ k_BATd.transpose(-1, -2)).float() / math.sqrt(self.head_dim)
            attn_BATT = torch.softmax(scores_BATT.masked_fill(~mask_B1TT, float("-inf")), dim=-1)
            y_BATd = attn_BATT.to(v_BATd.dtype) @ v_BATd
            if need_probs:
                probs_BTT = attn_BATT.detach().mean(1)
        else:
            y_BATd = F.scaled_dot_product_attention(q_BATd, k_BATd, v_BATd, attn_mask=mask_B1TT)
            if need_probs:
                with torch.no_grad():
                    scores_BATT = (q_BATd @ k_BATd.transpose(-1, -2)).float() / math.sqrt(self.head_dim)
                    probs_BTT = torch.softmax(scores_BATT.masked_fill(~mask_B1TT, float("-inf")), dim=-1).mean(1)
        return self.out(y_BATd.transpose(1, 2).reshape(b, t, d)), probs_BTT
