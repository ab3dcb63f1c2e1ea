"""What each token attended to, for the attention modality score, without a [T, U] tensor (docs/method.md).

The score needs M~ = mean_h softmax(q_h k_h^T * scale + mask) @ M, with M the keys' modality scores [B, U, M].
Materialising the head-mean probabilities costs B*A*T*U float32 (3.2 GB and 3.4 s at T=4096, 16 heads, on the
CPU).  `head_mean_attention_mix` computes the same mix as an attention *output*: the fused kernel of
`F.scaled_dot_product_attention` with the scores as the values, zero-padded to the head dimension (the fused
kernels want the value head dim equal to the query's), causal through `is_causal` (or torch's lower-right
`CausalBias` for a KV cache) and key padding through an extra value column instead of a mask:

    V = [M * valid, valid, 0, ...]     out_h = sum_s p_hs V_s
    mixed_h = out_h[:M] / out_h[M] = sum_s p_hs valid_s M_s / sum_s p_hs valid_s

which is exactly the softmax renormalised over the valid keys.  A mask would cost: CUDA's flash kernel takes
none (the memory-efficient one would run), and the CPU's flash kernel with a boolean mask computes every block
(torch 2.13, T=2048, 16 heads: 0.75 s against 0.21 s with `is_causal`).  The mean over heads comes after the
per-head renormalisation, as in the materialised form.

Shapes: B batch, A query heads, a key/value heads (grouped-query attention: A / a query heads share one),
T query positions, U key positions, d head dimension, M modalities.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


@torch.no_grad()
def head_mean_attention_mix(query_BATd: torch.Tensor, key_BaUd: torch.Tensor, values_BUM: torch.Tensor,
                            key_valid_BU: torch.Tensor | None = None, scaling: float | None = None,
                            causal: bool = True, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """mixed_BTM (float32) = mean over heads of softmax(q k^T * scaling + mask) @ values, through the fused kernel.

    - The queries are the last T of the U key positions (bottom-right aligned, as with a KV cache); `causal`
      lets query t see keys up to U - T + t: `is_causal` when T == U, no mask at all for one query (T == 1),
      torch's `causal_lower_right` bias for 1 < T < U.  `causal=False`: every (valid) key.
    - `key_valid_BU` (bool, None = all valid) excludes padded keys exactly (the extra value column above).  A
      query row whose allowed keys are all padding (a left-padding query in a causal model) has no mass to
      renormalise: it gets its own position's values, values_BUM[:, U - T + t], as if it attended only to itself
      (what `ds_smoes.model.attention.attention_mask` gives such rows).  The same happens, in theory, to a valid
      query whose own probability underflows below float32's range (logit gaps beyond ~87 / scaling).
    - Grouped-query attention: the a key heads are expanded to the A query heads (a copy of k, O(U) memory)
      rather than `enable_gqa`, which CUDA's memory-efficient kernel (the fused one for float32) does not take.
    - `scaling`: None = 1 / sqrt(d).  `dtype`: what the kernel computes in, float32 by default (the scores stay
      float32 as in the eager softmax, and the fused kernels exist for float32 on the CPU and, memory-efficient,
      on CUDA); None = the query's dtype (bf16: faster on a GPU, the mix then carries bf16's ~3 significant digits).
    - More value columns (M + 1) than head dims d: several kernel calls of d columns each.

    Masks other than causal + key padding (sliding windows, bidirectional image blocks, packed sequences) are
    not expressed here: callers that meet them use the materialised form
    (`ds_smoes.hf.attention.head_mean_attention_probs`).
    """
    b, n_heads, n_q, d = query_BATd.shape
    n_k = key_BaUd.shape[2]
    m = values_BUM.shape[-1]
    dtype = dtype or query_BATd.dtype
    q = query_BATd.to(dtype)
    k = key_BaUd.to(dtype)
    if k.shape[1] != n_heads:
        group = n_heads // k.shape[1]
        k = k[:, :, None].expand(b, k.shape[1], group, n_k, d).reshape(b, n_heads, n_k, d)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(d)

    columns_BUQ = values_BUM.float()                      # Q = M value columns (+ 1 validity column)
    if key_valid_BU is not None:
        valid_BU1 = key_valid_BU[:, -n_k:].to(torch.float32).unsqueeze(-1)
        columns_BUQ = torch.cat([columns_BUQ * valid_BU1, valid_BU1], dim=-1)
    mask = {}
    if causal and n_q == n_k:
        mask = {"is_causal": True}
    elif causal and 1 < n_q < n_k:
        mask = {"attn_mask": causal_lower_right(n_q, n_k)}
    elif causal and n_q > n_k:
        raise ValueError(f"causal attention of {n_q} queries over {n_k} keys: the queries must be the last of the keys")

    outs = []
    for start in range(0, columns_BUQ.shape[-1], d):
        chunk_BUQ = columns_BUQ[..., start:start + d]
        v_BUd = F.pad(chunk_BUQ, (0, d - chunk_BUQ.shape[-1])).to(dtype)
        v_BAUd = v_BUd.unsqueeze(1).expand(b, n_heads, n_k, d)
        out_BATd = F.scaled_dot_product_attention(q, k, v_BAUd, scale=scale, **mask)
        outs.append(out_BATd[..., :chunk_BUQ.shape[-1]].float())
    out_BATQ = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
    if key_valid_BU is None:
        return out_BATQ.mean(1)
    mass_BAT1 = out_BATQ[..., m:m + 1]
    has_mass_BAT1 = mass_BAT1 > 0
    mixed_BATM = out_BATQ[..., :m] / torch.where(has_mass_BAT1, mass_BAT1, 1.0)
    own_B1TM = values_BUM[:, n_k - n_q:].float().unsqueeze(1)
    return torch.where(has_mass_BAT1, mixed_BATM, own_B1TM).mean(1)
