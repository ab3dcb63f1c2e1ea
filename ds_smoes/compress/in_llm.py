"""In-LLM vision-token pruning of the built-in decoder (issue 19): LearnPruner's stage 2 and the FastV-style baseline.

At the pruning point, before decoder block L (`CompressConfig.in_llm_layer`), each image keeps the `budget` vision
tokens that the text query attended most in block L-1, and the others leave the sequence: hidden states and
every per-token tensor are re-packed without them, so blocks L.. (their attention, MoE layers and EP dispatch)
process fewer tokens.  Choices that are ours (docs/compression.md says them too):

- The score is block L-1's own attention, from its input (the same q, k as that block's softmax, recomputed
  here from its projections for the chosen query rows only: `ds_smoes.compress.query_attention`); pruning then
  applies to block L-1's output.  Block L-1 attended over every token, so the score reads a real attention map
  (eager or fused), and blocks before L keep their full KV cache.
- Query rows: the prompt's text tokens (valid, text modality, no label: <bos>, the prompt words, <sep>); for
  FastV the last of them.  Answer tokens are never queries, so training (answers in the sequence) and
  generation (prompt only) score the same: causal attention makes a prompt row's scores independent of what
  follows it.
- Packing keeps each row's kept tokens in their order; rows of other lengths are padded on the side the batch
  was padded on (left when every row's last column held a token: generation's left-padded prompts, or no
  padding; else right, training's batches), so `generate` still reads the last column and the attention-mask
  logic of the model holds unchanged.
- Positions: the learned absolute position embeddings are added at the input, so kept tokens keep their
  original position ids (nothing to re-index); generation goes on from each row's unpruned prompt length.

One host read at the pruning point: the longest query set and the packed length (both needed as shapes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ds_smoes.compress.query_attention import keep_top_budget, query_attention_scores
from ds_smoes.model.attention import SelfAttention


def query_rows(valid_BT: torch.Tensor, modality_BT: torch.Tensor, prompt_BT: torch.Tensor,
               last_only: bool) -> torch.Tensor:
    """query_BT (bool): the valid text positions of the prompt; `last_only` (FastV): each row's last of them."""
    query_BT = valid_BT.bool() & (modality_BT == 0) & prompt_BT.bool()
    if not last_only:
        return query_BT
    position_BT = torch.arange(query_BT.shape[1], device=query_BT.device).expand_as(query_BT)
    last_B = torch.where(query_BT, position_BT, -1).max(1).values
    return query_BT & (position_BT == last_B[:, None])


@dataclass(frozen=True)
class Packing:
    """Where each slot of the packed sequence comes from.  `source_BT` (T: packed positions): the old position of
    each slot (0 on padding slots); `valid_BT`: which slots hold tokens.  Host-side: `padded`, some slot is
    padding (rows of different kept lengths); `padded_before`, some token follows a padding slot (left packing
    of such rows), so a fused causal kernel needs the dense mask."""
    source_BT: torch.Tensor
    valid_BT: torch.Tensor
    padded: bool = False
    padded_before: bool = False

    def take(self, x_BT: torch.Tensor, fill: float | int | bool = 0) -> torch.Tensor:
        """x gathered along dim 1 into the packed slots (any trailing dims), `fill` on padding slots."""
        index = self.source_BT.reshape(*self.source_BT.shape, *([1] * (x_BT.dim() - 2)))
        out = torch.gather(x_BT, 1, index.expand(*self.source_BT.shape, *x_BT.shape[2:]))
        valid = self.valid_BT.reshape(index.shape)
        return torch.where(valid, out, torch.as_tensor(fill, dtype=x_BT.dtype, device=x_BT.device))


def pack(keep_BT: torch.Tensor, left: bool, length: int, padded: bool = False) -> Packing:
    """The packing of the kept tokens (`keep_BT`, bool) into `length` slots per row, in their order, right-aligned
    when `left` (padding first) else left-aligned.  `length`: the longest row's kept count and `padded`, whether a
    row is shorter, as `prune_layout` read them on the host."""
    t = keep_BT.shape[1]
    count_B = keep_BT.sum(1)
    order_BT = torch.sort((~keep_BT).to(torch.uint8), dim=1, stable=True).indices   # kept first, in order
    slot_T = torch.arange(length, device=keep_BT.device)
    offset_B = (length - count_B) if left else torch.zeros_like(count_B)
    rank_BT = slot_T[None, :] - offset_B[:, None]                    # which kept token a slot holds
    valid_BT = (rank_BT >= 0) & (rank_BT < count_B[:, None])
    source_BT = torch.gather(order_BT, 1, rank_BT.clamp(0, t - 1)) * valid_BT
    return Packing(source_BT, valid_BT, padded, bool(left) and padded)


@dataclass(frozen=True)
class PruneLayout:
    """The host-known shapes of one pruning: the most query rows of a row, the packed length, the side, and
    whether a row is shorter (padded)."""
    num_queries: int
    length: int
    left: bool
    padded: bool


def prune_layout(valid_BT: torch.Tensor, vision_BT: torch.Tensor, query_BT: torch.Tensor, budget: int
                 ) -> PruneLayout:
    """One host read: the shapes `block_vision_scores` and `pack` need.  A row keeps its valid non-vision tokens
    and min(its vision tokens, `budget`); left packing when every row's last column holds a token."""
    valid_BT = valid_BT.bool()
    vision_B = (vision_BT.bool() & valid_BT).sum(1)
    kept_B = valid_BT.sum(1) - vision_B + vision_B.clamp_max(budget)
    num_queries, longest, shortest, left = torch.stack([
        query_BT.sum(1).max(), kept_B.max(), kept_B.min(), valid_BT[:, -1].all().long()]).tolist()
    return PruneLayout(num_queries, longest, bool(left), shortest < longest)


@torch.no_grad()
def block_vision_scores(attn: SelfAttention, h_BTD: torch.Tensor, query_BT: torch.Tensor, valid_BT: torch.Tensor,
                        num_queries: int) -> torch.Tensor:
    """score_BT (float32): the attention `attn` pays from the `query_BT` rows to every position, with `h_BTD` the
    attention's input (after the block's first LayerNorm), averaged over heads and query rows (zero for rows
    without a query).  The keys of every position and the queries of the chosen rows only are projected again
    from `attn.qkv` (the block's own weights, as its forward splits them: q, k, v); `num_queries` (host-known)
    is the most query rows of a row."""
    b, t, d_model = h_BTD.shape
    a, d = attn.n_heads, attn.head_dim
    weight, bias = attn.qkv.weight, attn.qkv.bias
    # Q = num_queries slots per row, the chosen rows first in their order; `query_valid_BQ` says which hold one
    position_BQ = torch.sort((~query_BT).to(torch.uint8), dim=1, stable=True).indices[:, :num_queries]
    query_valid_BQ = torch.gather(query_BT, 1, position_BQ)
    h_BQD = torch.gather(h_BTD, 1, position_BQ[:, :, None].expand(b, num_queries, d_model))
    q_BAQd = F.linear(h_BQD, weight[:d_model], bias[:d_model]).reshape(b, num_queries, a, d).transpose(1, 2)
    k_BATd = F.linear(h_BTD, weight[d_model:2 * d_model], bias[d_model:2 * d_model]
                      ).reshape(b, t, a, d).transpose(1, 2)
    return query_attention_scores(q_BAQd, k_BATd, position_BQ, query_valid_BQ, valid_BT)


def prune(attn: SelfAttention, h_BTD: torch.Tensor, valid_BT: torch.Tensor, vision_BT: torch.Tensor,
          query_BT: torch.Tensor, budget: int) -> Packing:
    """The packing that keeps every valid non-vision token and each row's `budget` vision tokens of most attention
    from `query_BT` in `attn` (whose input is `h_BTD`)."""
    layout = prune_layout(valid_BT, vision_BT, query_BT, budget)
    score_BT = block_vision_scores(attn, h_BTD, query_BT, valid_BT, layout.num_queries)
    vision_BT = vision_BT.bool() & valid_BT.bool()
    budget_B = torch.full(valid_BT.shape[:1], budget, dtype=torch.long, device=valid_BT.device)
    keep_BT = (valid_BT.bool() & ~vision_BT) | keep_top_budget(score_BT, vision_BT, budget_B)
    return pack(keep_BT, layout.left, layout.length, layout.padded)
