"""Multi-head self-attention that can also hand back what each token attended to, for the attention score.

The attention modality score (docs/method.md, "Soft modality scores") needs M~ = A @ M, with A the attention
probabilities averaged over heads and M the keys' modality scores.  With `impl="eager"` A comes from the softmax that
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

KV cache (generation, `ds_smoes.model.kv_cache`).  With a `LayerCache` the forward's T positions are appended to
it and the queries attend the U cached + current keys, the queries being the last T of them.  A decode step
(T = 1) needs no causal mask: with no padding among the keys the sdpa path runs the fused kernel without any
mask; otherwise the caller hands a key-padding mask [B, 1, 1, U] (`attention_mask(valid_BU, True, 1)`).  The
keys' scores come from the cache too, so M~ of the new token is the one a full forward would compute.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from ds_smoes.core.attention_score import head_mean_attention_mix
from ds_smoes.model.kv_cache import LayerCache


def attention_mask(key_valid_BU: torch.Tensor, causal: bool, num_queries: int | None = None) -> torch.Tensor:
    """[B, 1, T, U] bool: query t may attend key s.  The T queries are the last of the U keys (T = U by default;
    fewer with a KV cache); causal: query t sees keys up to U - T + t.  A token always sees itself, so rows of
    left-padding positions are never empty (no NaN from an all-masked softmax)."""
    b, u = key_valid_BU.shape
    t = u if num_queries is None else num_queries
    device = key_valid_BU.device
    allowed_BTU = key_valid_BU.bool().unsqueeze(1).expand(b, t, u)
    if causal:
        allowed_BTU = allowed_BTU & torch.ones(t, u, dtype=torch.bool, device=device).tril(u - t)
    allowed_BTU = allowed_BTU | _own_position_TU(t, u, device)
    return allowed_BTU.unsqueeze(1)


def _own_position_TU(t: int, u: int, device: torch.device) -> torch.Tensor:
    """[T, U] bool: query t's own key, U - T + t."""
    return torch.arange(u, device=device)[None, :] == torch.arange(u - t, u, device=device)[:, None]


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

    def forward(self, x_BTD: torch.Tensor, mask_B1TU: torch.Tensor | None = None,
                valid_BU: torch.Tensor | None = None, modality_BTM: torch.Tensor | None = None,
                cache: LayerCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(output, mixed_BTM).  `mask_B1TU`: a dense bool mask (`attention_mask`), or None: every position
        (`self.causal`: every earlier one), for the eager path built here from `valid_BU`.  `valid_BU`: which
        keys are tokens (None: all).  With `modality_BTM` (this forward's tokens' scores), mixed_BTM = A @ M
        float32 (A the head-averaged probabilities, M the keys' scores), else None.  `cache`: this forward's
        keys, values and scores are appended to it and the queries attend all U cached + current keys (the
        module doc); `valid_BU` and `mask_B1TU` then cover the U keys."""
        b, t, d = x_BTD.shape
        q_BATd, k_BAUd, v_BAUd = (z.reshape(b, t, self.n_heads, self.head_dim).transpose(1, 2)
                                  for z in self.qkv(x_BTD).chunk(3, dim=-1))
        keys_BUM = modality_BTM
        if cache is not None:
            k_BAUd, v_BAUd, keys_BUM = cache.update(k_BAUd, v_BAUd, modality_BTM)
        u = k_BAUd.shape[2]
        mixed_BTM = None
        if self.impl == "eager":
            if mask_B1TU is None:
                valid = valid_BU if valid_BU is not None else torch.ones(b, u, dtype=torch.bool, device=x_BTD.device)
                mask_B1TU = attention_mask(valid, self.causal, t)
            # the softmax in float32 whatever the weights' dtype (as Hugging Face's eager attention does): in bf16
            # its 8-bit mantissa blurs the probabilities, and with them the attention modality score
            scores_BATU = (q_BATd @ k_BAUd.transpose(-1, -2)).float() / math.sqrt(self.head_dim)
            attn_BATU = torch.softmax(scores_BATU.masked_fill(~mask_B1TU, float("-inf")), dim=-1)
            y_BATd = attn_BATU.to(v_BAUd.dtype) @ v_BAUd
            if modality_BTM is not None:
                mixed_BTM = torch.bmm(attn_BATU.detach().mean(1), keys_BUM.float())
        else:
            if mask_B1TU is not None:
                y_BATd = F.scaled_dot_product_attention(q_BATd, k_BAUd, v_BAUd, attn_mask=mask_B1TU)
            elif t == u or not self.causal:
                y_BATd = F.scaled_dot_product_attention(q_BATd, k_BAUd, v_BAUd, is_causal=self.causal)
            elif t == 1:     # one query, the last key: it sees every key, no mask at all
                y_BATd = F.scaled_dot_product_attention(q_BATd, k_BAUd, v_BAUd)
            else:
                y_BATd = F.scaled_dot_product_attention(q_BATd, k_BAUd, v_BAUd, attn_mask=causal_lower_right(t, u))
            if modality_BTM is not None:
                # the keys' validity as a value column, not a mask: the causal kernel whatever the padding; left
                # padding queries (no valid key) keep their own score, as under `attention_mask`'s identity
                mixed_BTM = head_mean_attention_mix(q_BATd.detach(), k_BAUd.detach(), keys_BUM, valid_BU,
                                                    causal=self.causal)
        return self.out(y_BATd.transpose(1, 2).reshape(b, t, d)), mixed_BTM
