"""QMoP, the Query Guided Mixture-of-Projector (arXiv 2603.21232), as a pre-LLM compressor.

The paper's abstract: three collaborating branches compress the visual tokens, pooling (coarse global semantics),
a resampler (high-level semantics) and pruning (fine-grained token selection), coordinated by a Query Guided
Router that selects and weights the branch outputs from the visual input and the text query, fused
Mixture-of-Experts style.  No code is public; every choice below is ours (docs/compression.md):

- every branch emits exactly the budget Q of tokens in the vision encoder's width, so the fusion is token-wise:
  fused token q = sum_e weight_e * token q of branch e; the shared projector maps the fused tokens into the LLM;
- pooling: `ds_smoes.compress.selection.pool_matrix` (no parameters); resampler: Q learned queries
  cross-attending to the patches (one multi-head attention with a residual to the queries and an MLP);
  pruning: `LearnedPruner` (an MLP scorer, straight-through top-k, kept patches in their original order);
- the router reads the mean of the patches (the image summary) and the pooled text query, each layer-normed, through
  a two-layer MLP to 3 logits; softmax weights (fusion), or with `qmop_top1` the best branch alone, straight-through
  (forward weight exactly 1 on it, gradient of the softmax);
- the branch-balance loss is Switch-style (`branch_balance_loss`): E * sum_e f_e * P_e over the batch's images.

The query steers the router only; the branches do not read it.  Shapes as `ds_smoes.compress.base`, and
E the three branches (QMoP's experts, in the order pool, resampler, prune); a = attention heads' count.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ds_smoes.compress.selection import pool_matrix, straight_through
from ds_smoes.compress.base import CompressOutput, TokenCompressor
from ds_smoes.compress.learnpruner import LearnedPruner
from ds_smoes.model.vision import mlp

BRANCHES = ("pool", "resampler", "prune")


def branch_balance_loss(probs_BE: torch.Tensor, weights_BE: torch.Tensor) -> torch.Tensor:
    """E * sum_e f_e * P_e: f_e the mean fusion weight branch e got (no gradient; with top-1 the share of images
    routed to it), P_e its mean router probability.  1 when the router spreads the images evenly, E when every image
    goes to one branch; the gradient pushes probability away from the branches used most (Switch Transformer's
    load-balancing loss, over images instead of tokens)."""
    e = probs_BE.shape[-1]
    return e * (weights_BE.detach().float().mean(0) * probs_BE.float().mean(0)).sum()


class Resampler(nn.Module):
    """Q learned queries read the patches through one multi-head cross-attention (Perceiver / Q-Former style)."""

    def __init__(self, dim: int, budget: int, n_heads: int) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"resampler width {dim} is not a multiple of n_heads={n_heads}")
        self.n_heads = n_heads
        self.queries_QD = nn.Parameter(torch.randn(budget, dim) * 0.02)
        self.ln_kv, self.ln_q, self.ln_out = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q_proj, self.kv_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.mlp = mlp(dim, 2 * dim, dim)

    def forward(self, patches_BTD: torch.Tensor) -> torch.Tensor:
        b, t, d = patches_BTD.shape
        a = self.n_heads
        queries_BQD = self.queries_QD.to(patches_BTD.dtype).expand(b, -1, -1)
        q_BaQd = self.q_proj(self.ln_q(queries_BQD)).reshape(b, -1, a, d // a).transpose(1, 2)
        k_BTD, v_BTD = self.kv_proj(self.ln_kv(patches_BTD)).chunk(2, dim=-1)
        k_BaTd = k_BTD.reshape(b, t, a, d // a).transpose(1, 2)
        v_BaTd = v_BTD.reshape(b, t, a, d // a).transpose(1, 2)
        h_BQD = F.scaled_dot_product_attention(q_BaQd, k_BaTd, v_BaTd).transpose(1, 2).reshape(b, -1, d)
        x_BQD = queries_BQD + self.out_proj(h_BQD)
        return x_BQD + self.mlp(self.ln_out(x_BQD))


class QMoP(TokenCompressor):
    def __init__(self, dim: int, query_dim: int, grid_side: int, budget: int, n_heads: int, top1: bool = False,
                 alpha_balance: float = 0.01) -> None:
        super().__init__(grid_side * grid_side, budget)
        self.top1, self.alpha_balance = top1, alpha_balance
        self.register_buffer("pool_QT", pool_matrix(grid_side, grid_side, budget), persistent=False)
        self.resampler = Resampler(dim, budget, n_heads)
        self.pruner = LearnedPruner(dim, self.num_patches, budget)
        self.ln_image, self.ln_query = nn.LayerNorm(dim), nn.LayerNorm(query_dim)
        self.router = mlp(dim + query_dim, dim, len(BRANCHES))
        self.query_dim = query_dim

    def branch_outputs(self, patches_BTD: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """([pooled, resampled, pruned] tokens_BQD, the pruning branch's index_BQ)."""
        pooled_BQD = torch.einsum("qt,btd->bqd", self.pool_QT.to(patches_BTD.dtype), patches_BTD)
        pruned = self.pruner(patches_BTD)
        return [pooled_BQD, self.resampler(patches_BTD), pruned.tokens_BQD], pruned.index_BQ

    def router_probs(self, patches_BTD: torch.Tensor, query_BD: torch.Tensor | None) -> torch.Tensor:
        """probs_BE (float32): the router's softmax over the branches from the image summary and the text query
        (zeros when there is none)."""
        if query_BD is None:
            query_BD = patches_BTD.new_zeros(patches_BTD.shape[0], self.query_dim)
        summary_BD = torch.cat([self.ln_image(patches_BTD.mean(1)), self.ln_query(query_BD.to(patches_BTD.dtype))],
                               dim=-1)
        return torch.softmax(self.router(summary_BD).float(), dim=-1)

    def fusion_weights(self, probs_BE: torch.Tensor) -> torch.Tensor:
        """weights_BE: the softmax (fusion) or the best branch's one-hot, straight-through (top-1)."""
        if not self.top1:
            return probs_BE
        return straight_through(F.one_hot(probs_BE.argmax(-1), probs_BE.shape[-1]).to(probs_BE.dtype), probs_BE)

    def forward(self, patches_BTD: torch.Tensor, query_BD: torch.Tensor | None = None) -> CompressOutput:
        self._check(patches_BTD)
        outputs, _ = self.branch_outputs(patches_BTD)
        probs_BE = self.router_probs(patches_BTD, query_BD)
        weights_BE = self.fusion_weights(probs_BE)
        w_BE = weights_BE.to(patches_BTD.dtype)
        tokens_BQD = sum(w_BE[:, e, None, None] * out_BQD for e, out_BQD in enumerate(outputs))
        aux = self.alpha_balance * branch_balance_loss(probs_BE, weights_BE)
        return CompressOutput(tokens_BQD, None, aux)
