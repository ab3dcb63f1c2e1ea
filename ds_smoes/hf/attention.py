"""The attention modality score inside a Hugging Face decoder (docs/method.md, "Soft modality scores").

Per decoder layer l, with x the layer's input (the residual stream) and attn_out the self-attention's
output, the score is carried as in `ds_smoes.model.vlm`:

    M^(l+1) = (|attn_out| * A @ M^(l) + |x| * M^(l)) / (|attn_out| + |x|)

A is the head-averaged attention probability matrix; only M~ = A @ M^(l) is needed.  Where it comes from:
- `eager` attention returns the probabilities; M~ = mean_h(A_h) @ M from them (detached).
- fused attention (`sdpa`, the default, which does not return them): the text config's attention
  implementation is switched to `smoes_<base>`, a registered wrapper that runs `<base>` unchanged and,
  for the decoder's attention modules only, computes M~ from the post-RoPE q and k, without gradient:
  - through the fused kernel (`ds_smoes.core.attention_score.head_mean_attention_mix`, no [T, U] tensor)
    when the mask is known to be causal + key padding: None (transformers skipped it: pure causal), or a
    boolean mask that `smoes_<base>`'s mask function made from transformers' plain `causal_mask_function`
    with the queries the last of the keys (it tags such masks; their last query row is then the keys' validity);
  - otherwise (sliding windows, bidirectional image blocks, packed sequences, chunked attention, a mask the
    model built or sliced itself, a static cache's offsets) from the materialised probabilities
    (`head_mean_attention_probs`, [B, A, T, U] float32), as before.

With a KV cache (generation), A has more keys than this forward's tokens; the scores of the earlier
tokens are kept per layer in the context.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ds_smoes.core.attention_score import head_mean_attention_mix
from ds_smoes.core.scores import attention_score_mix_update
from ds_smoes.hf.context import ModalityContext

_SINK = "_smoes_attention_sink"   # attribute on a decoder attention module: who computes M~ for it
_CAUSAL_PADDING = "_smoes_causal_key_padding"   # attribute of a mask known to be causal & key padding
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
            sink(query, key, attention_mask, kwargs.get("scaling"), causal)
        return base(module, query, key, value, attention_mask, *args, **kwargs)
    return attention


def _tagging(base_mask: Callable) -> Callable:
    """`base_mask` (transformers' mask interface), tagging the boolean masks it makes that are exactly causal &
    key padding with the queries the last of the keys: plain `causal_mask_function` (no sliding window, chunk,
    packing or bidirectional overlay: each of those wraps it), integer offsets with q_offset + T == kv_offset + U.
    A structural check, no read of the mask."""
    from transformers.masking_utils import causal_mask_function

    def mask(*args, **kwargs):
        out = base_mask(*args, **kwargs)
        q_offset, kv_offset = kwargs.get("q_offset", 0), kwargs.get("kv_offset", 0)
        if (isinstance(out, torch.Tensor) and out.dtype == torch.bool and out.dim() == 4 and not args
                and kwargs.get("mask_function", causal_mask_function) is causal_mask_function
                and isinstance(q_offset, int) and isinstance(kv_offset, int)
                and q_offset + kwargs.get("q_length", -1) == kv_offset + kwargs.get("kv_length", -2)):
            setattr(out, _CAUSAL_PADDING, True)
        return out
    return mask


def attention_mix(query_BATd: torch.Tensor, key_BaUd: torch.Tensor, keys_BUM: torch.Tensor,
                  mask: torch.Tensor | None, scaling: float | None, causal: bool) -> torch.Tensor:
    """M~ = mean_h softmax(q k^T * scaling + mask) @ keys_BUM -> [B, T, M] float32, for the mask a Hugging Face
    model hands its attention function: through the fused kernel when the mask is None or tagged causal & key
    padding (see the module doc), else from the materialised probabilities."""
    n_q = query_BATd.shape[2]
    if mask is None:
        return head_mean_attention_mix(query_BATd, key_BaUd, keys_BUM, None, scaling, causal and n_q > 1)
    if getattr(mask, _CAUSAL_PADDING, False) and mask.shape[1] == 1 and mask.shape[-1] == key_BaUd.shape[2]:
        # the last query is the last key: it sees every key, its row of the mask is the keys' validity
        return head_mean_attention_mix(query_BATd, key_BaUd, keys_BUM, mask[:, 0, -1, :], scaling, causal=True)
    probs_BTU = head_mean_attention_probs(query_BATd, key_BaUd, mask, scaling, causal)
    return torch.bmm(probs_BTU, keys_BUM.float())


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
        AttentionMaskInterface.register(name, _tagging(ALL_MASK_ATTENTION_FUNCTIONS[base]))
    return name


class AttentionScoreTracker:
    """Hooks on one decoder layer and its self-attention that advance the context's attention score."""

    def __init__(self, layer_idx: int, layer: nn.Module, attention: nn.Module, context: ModalityContext) -> None:
        self.layer_idx, self.context = layer_idx, context
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None   # (keys_BUM, M~) from the smoes_ wrapper
        setattr(attention, _SINK, self._mix)
        self.handles = [layer.register_forward_pre_hook(self._enter_layer, with_kwargs=True),
                        attention.register_forward_hook(self._after_attention)]

    def _key_scores(self, n_q: int, n_k: int) -> torch.Tensor:
        """[B, U, M] scores of the keys: this forward's tokens, after the cached ones' (decoding with a KV cache)."""
        scores_BTM = self.context.batch.scores_BTM
        past = self.context.key_scores.get(self.layer_idx)
        keys_BUM = scores_BTM if n_k == n_q or past is None else torch.cat([past, scores_BTM], dim=1)
        if keys_BUM.shape[1] != n_k:
            raise RuntimeError(f"attention over {n_k} keys but scores for {keys_BUM.shape[1]} tokens are known")
        return keys_BUM

    def _tracking(self) -> bool:
        return self.context.batch is not None and self.context.batch.scores_BTM is not None

    def _mix(self, query_BATd, key_BaUd, mask, scaling, causal) -> None:
        if self._tracking():
            keys_BUM = self._key_scores(query_BATd.shape[2], key_BaUd.shape[2])
            self.pending = keys_BUM, attention_mix(query_BATd, key_BaUd, keys_BUM, mask, scaling, causal)

    def _enter_layer(self, module, args, kwargs):
        x_BTD = args[0] if args else kwargs["hidden_states"]
        self.context.resid_norm_BT = x_BTD.detach().float().norm(dim=-1)
        self.pending = None

    def _after_attention(self, module, args, output):
        ctx = self.context
        if not self._tracking():
            return
        attn_out_BTD, weights = output[0], output[1] if isinstance(output, tuple) and len(output) > 1 else None
        scores_BTM = ctx.batch.scores_BTM
        n_q = scores_BTM.shape[1]
        if weights is not None:        # eager: the probabilities the output was computed with
            probs_BTU = weights.detach().float().mean(1)
            keys_BUM = self._key_scores(n_q, probs_BTU.shape[-1])
            mixed_BTM = torch.bmm(probs_BTU, keys_BUM.float())
        elif self.pending is not None:
            keys_BUM, mixed_BTM = self.pending
        else:
            raise RuntimeError("no attention probabilities for the SMoES attention score: the model's attention "
                               "implementation neither returned them nor ran through the smoes_ wrapper; load it "
                               "with attn_implementation='sdpa' or 'eager'")
        ctx.key_scores[self.layer_idx] = keys_BUM
        attn_norm_BT = attn_out_BTD.detach().float().norm(dim=-1)
        ctx.batch.scores_BTM = attention_score_mix_update(scores_BTM, mixed_BTM, attn_norm_BT, ctx.resid_norm_BT)
        self.pending = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
