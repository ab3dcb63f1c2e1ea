"""The attention modality score inside a Hugging Face decoder (SMOES.md section 1, "attention").

Per decoder layer l, with x the layer's input (the residual stream) and attn_out the self-attention's
output, the score is carried as in `ds_smoes.model.vlm`:

    M^(l+1) = (|attn_out| * A @ M^(l) + |x| * M^(l)) / (|attn_out| + |x|)

A is the head-averaged attention probability matrix.  Where it comes from:
- `eager` attention returns the probabilities; they are used as they are (detached).
- fused attention (`sdpa`, the default, which does not return them): the text config's attention
  implementation is switched to `smoes_<base>`, a registered wrapper that runs `<base>` unchanged and,
  for the decoder's attention modules only, recomputes head-averaged A from the post-RoPE q and k and
  the same mask, without gradient, for the score only.

With a KV cache (generation), A has more keys than this forward's tokens; the scores of the earlier
tokens are kept per layer in the context.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ds_smoes.hf.context import ModalityContext
from ds_smoes.core.scores import attention_score_update

_SINK = "_smoes_attention_sink"   # attribute on a decoder attention module: where recomputed probs go
PREFIX = "smoes_"


@torch.no_grad()
def head_mean_attention_probs(query_BATd: torch.Tensor, key_BaUd: torch.Tensor, mask: torch.Tensor | None,
                              scaling: float | None, causal: bool) -> torch.Tensor:
    """Head-averaged softmax(q k^T * scaling + mask) -> [B, T, U] float32, as the attention kernel computes it.

    a key heads are shared by A / a query heads (grouped-query attention).  `mask` is what the model
    hands its attention function: None (then `causal` decides), boolean [B or 1, 1, T, U] (True = may
    attend) or additive float.  Rows with no allowed key become zeros instead of NaN.
    """
    q = query_BATd.float()
    k = key_BaUd.float()
    if q.shape[1] != k.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(q.shape[-1])
    scores_BATU = (q @ k.transpose(-1, -2)) * scale
    n_q, n_k = scores_BATU.shape[-2:]
    if mask is None:
        if causal and n_q > 1:
            allowed_TU = (torch.arange(n_k, device=q.device)[None, :]
                          <= torch.arange(n_q, device=q.device)[:, None] + (n_k - n_q))
            scores_BATU = scores_BATU.masked_fill(~allowed_TU, float("-inf"))
    elif mask.dtype == torch.bool:
        scores_BATU = scores_BATU.masked_fill(~mask[..., :n_k], float("-inf"))
    else:
        scores_BATU = scores_BATU + mask[..., :n_k].float()
    return torch.softmax(scores_BATU, dim=-1).nan_to_num(0.0).mean(1)


def _capturing(base: Callable) -> Callable:
    def attention(module: nn.Module, query, key, value, attention_mask, *args, **kwargs):
        sink = getattr(module, _SINK, None)
        if sink is not None:
            causal = kwargs.get("is_causal")
            causal = getattr(module, "is_causal", True) if causal is None else causal
            sink(head_mean_attention_probs(query, key, attention_mask, kwargs.get("scaling"), causal))
        return base(module, query, key, value, attention_mask, *args, **kwargs)
    return attention


def capturing_implementation(base: str) -> str:
    """Register `smoes_<base>` (attention and mask functions) once; return its name.  `eager` needs none."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    if base == "eager" or base.startswith(PREFIX):
        return base
    if base not in ALL_ATTENTION_FUNCTIONS or base not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise ValueError(f"attention implementation {base!r} is not a registered transformers attention function; "
                         "load the model with attn_implementation='sdpa' or 'eager' for score_type='attention'")
    name = PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _capturing(ALL_ATTENTION_FUNCTIONS[base]))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


class AttentionScoreTracker:
    """Hooks on one decoder layer and its self-attention that advance the context's attention score."""

    def __init__(self, layer_idx: int, layer: nn.Module, attention: nn.Module, context: ModalityContext) -> None:
        self.layer_idx, self.context = layer_idx, context
        setattr(attention, _SINK, self._record)
        self.handles = [layer.register_forward_pre_hook(self._enter_layer, with_kwargs=True),
                        attention.register_forward_hook(self._after_attention)]

    def _record(self, probs_BTU: torch.Tensor) -> None:
        self.context.pending_probs_BTU = probs_BTU

    def _enter_layer(self, module, args, kwargs):
        x_BTD = args[0] if args else kwargs["hidden_states"]
        self.context.resid_norm_BT = x_BTD.detach().float().norm(dim=-1)
        self.context.pending_probs_BTU = None

    def _after_attention(self, module, args, output):
        ctx = self.context
        if ctx.batch is None or ctx.batch.scores_BTM is None:
            return
        attn_out_BTD, weights = output[0], output[1] if isinstance(output, tuple) and len(output) > 1 else None
        probs_BTU = weights.detach().float().mean(1) if weights is not None else ctx.pending_probs_BTU
        if probs_BTU is None:
            raise RuntimeError("no attention probabilities for the SMoES attention score: the model's attention "
                               "implementation neither returned them nor ran through the smoes_ wrapper; load it "
                               "with attn_implementation='sdpa' or 'eager'")
        scores_BTM = ctx.batch.scores_BTM
        n_q, n_k = probs_BTU.shape[-2:]
        past = ctx.key_scores.get(self.layer_idx)
        keys_BUM = scores_BTM if n_k == n_q or past is None else torch.cat([past, scores_BTM], dim=1)
        if keys_BUM.shape[1] != n_k:
            raise RuntimeError(f"attention over {n_k} keys but scores for {keys_BUM.shape[1]} tokens are known")
        ctx.key_scores[self.layer_idx] = keys_BUM
        attn_norm_BT = attn_out_BTD.detach().float().norm(dim=-1)
        if n_k == n_q:
            ctx.batch.scores_BTM = attention_score_update(scores_BTM, probs_BTU, attn_norm_BT, ctx.resid_norm_BT)
        else:
            ctx.batch.scores_BTM = _cached_update(scores_BTM, keys_BUM, probs_BTU, attn_norm_BT, ctx.resid_norm_BT)
        ctx.pending_probs_BTU = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def _cached_update(scores_BTM, keys_BUM, probs_BTU, attn_norm_BT, resid_norm_BT) -> torch.Tensor:
    """The same residual update when the queries are the last T of U key positions (decoding with a KV cache)."""
    mixed_BTM = torch.bmm(probs_BTU.float(), keys_BUM.float())
    w_attn = attn_norm_BT.float().unsqueeze(-1)
    w_res = resid_norm_BT.float().unsqueeze(-1)
    return (w_attn * mixed_BTM + w_res * scores_BTM) / (w_attn + w_res).clamp_min(1e-12)
