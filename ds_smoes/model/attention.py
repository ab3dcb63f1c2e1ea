"""Multi-head self-attention that can also hand back what each token attended to, for the attention score.

The attention modality score (SMOES.md section 1) needs M~ = A @ M, with A the attention probabilities
averaged over heads and M the keys' modality scores.  With `impl="eager"` A comes from the softmax that
computes the output (float32, unchanged numerics).  With `impl="sdpa"` the output comes from the fused kernel
(which does not return probabilities) and M~ is computed by a second fused call, without gradient, with the
scores as values (`ds_smoes.core.attention_score.head_mean_attention_mix`): no [T, T] tensor is made.

Masks.  The eager path always takes the dense mask of `attention_mask`.  The sdpa path takes `mask_B1TT=None`
when no valid token follows a padding token (no padding, or right padding only): `is_causal=True` is then exact
for every valid query (its keys 0..t are all valid), the fastest kernel on the CPU and CUDA; only the outputs of
padding queries differ from the eager path's, and nothing reads them (the loss, the MoE layers and the score
mask them).  With left padding the caller hands the dense mask and the kernel runs masked (on the CPU: flash
with a boolean mask, measured on torch 2.13, ~3.5x slower than is_causal; on CUDA: memory-efficient; neither
makes a [B, A, T, T] tensor).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ds_smoes.core.attention_score import head_mean_attention_mix


def attention_mask(key_valid_BT: torch.Tensor, causal: bool) -> torch.Tensor:
    """[B, 1, T, T] bool: query t may attend key s.  A token always sees itself, so rows of
    left-padding positions are never empty (no NaN from an all-masked softmax)."""
    b, t = key_valid_BT.shape
    allowed_BTT = key_valid_BT.bool().unsqueeze(1).expand(b, t, t)
    if causal:
        allowed_BTT = allowed_BTT & torch.ones(t, t, dtype=torch.bool, device=key_valid_BT.device).tril()
    allowed_BTT = allowed_BTT | torch.eye(t, dtype=torch.bool, device=key_valid_BT.device)
    return allowed_BTT.unsqueeze(1)


def padding_before_tokens(valid_BT: torch.Tensor) -> torch.Tensor:
    """Whether some valid token follows a padding token (left padding, or holes), as a bool tensor on the
    device: a causal kernel without a mask is exact for the valid queries exactly when this is False."""
    return (valid_BT[:, 1:] & ~valid_BT[:, :-1]).any()


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, impl: str = "sdpa", causal: bool = False) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.impl, self.causal = n_heads, d_model // n_heads, impl, causal
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x_BTD: torch.Tensor, mask_B1TT: torch.Tensor | None = None,
                valid_BT: torch.Tensor | None = None, modality_BTM: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(output, mixed_BTM).  `mask_B1TT`: a dense bool mask (`attention_mask`), or None: every position
        (`self.causal`: every earlier one), for the eager path built here from `valid_BT`.  `valid_BT`: which
        keys are tokens (None: all).  With `modality_BTM` (the keys' scores), mixed_BTM = A @ M float32 (A the
        head-averaged probabilities), else None."""
        b, t, d = x_BTD.shape
        q_BATd, k_BATd, v_BATd = (z.reshape(b, t, self.n_heads, self.head_dim).transpose(1, 2)
                                  for z in self.qkv(x_BTD).chunk(3, dim=-1))
        mixed_BTM = None
        if self.impl == "eager":
            if mask_B1TT is None:
                valid = valid_BT if valid_BT is not None else torch.ones(b, t, dtype=torch.bool, device=x_BTD.device)
                mask_B1TT = attention_mask(valid, self.causal)
            # the softmax in float32 whatever the weights' dtype (as Hugging Face's eager attention does): in bf16
            # its 8-bit mantissa blurs the probabilities, and with them the attention modality score
            scores_BATT = (q_BATd @ k_BATd.transpose(-1, -2)).float() / math.sqrt(self.head_dim)
            attn_BATT = torch.softmax(scores_BATT.masked_fill(~mask_B1TT, float("-inf")), dim=-1)
            y_BATd = attn_BATT.to(v_BATd.dtype) @ v_BATd
            if modality_BTM is not None:
                mixed_BTM = torch.bmm(attn_BATT.detach().mean(1), modality_BTM.float())
        else:
            if mask_B1TT is None:
                y_BATd = F.scaled_dot_product_attention(q_BATd, k_BATd, v_BATd, is_causal=self.causal)
            else:
                y_BATd = F.scaled_dot_product_attention(q_BATd, k_BATd, v_BATd, attn_mask=mask_B1TT)
            if modality_BTM is not None:
                # the keys' validity as a value column, not a mask: the causal kernel whatever the padding; left
                # padding queries (no valid key) keep their own score, as under `attention_mask`'s identity
                mixed_BTM = head_mean_attention_mix(q_BATd.detach(), k_BATd.detach(), modality_BTM, valid_BT,
                                                    causal=self.causal)
        return self.out(y_BATd.transpose(1, 2).reshape(b, t, d)), mixed_BTM
