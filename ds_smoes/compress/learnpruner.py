"""LearnPruner's stage 1 (arXiv 2604.23950): a learned scorer after the vision encoder keeps the best patches.

The paper's abstract: a learnable pruning module after the vision encoder removes redundant tokens; the encoder's
attention is not used as the score because of attention sinks (a few tokens draw most of the attention whatever
they show).  Everything else here is ours (docs/compression.md): the scorer is a two-layer MLP over each patch's
features, independent of the text (stage 2, inside the LLM, is where the question decides); the top-k is made
differentiable with a straight-through estimator (hard top-k forward, softmax-of-scores gradient) or its Gumbel
variant (`stage1_relaxation`), and the kept patches are multiplied by the mask, whose forward value is exactly 1,
so the gradient reaches the scorer without changing any kept value.  Stage 2 lives in the decoder.

The same module is QMoP's pruning branch.  Shapes as `ds_smoes.compress.base`.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ds_smoes.compress.selection import gather_tokens, gumbel_topk, straight_through_topk
from ds_smoes.compress.base import CompressOutput, TokenCompressor
from ds_smoes.model.vision import mlp


class LearnedPruner(TokenCompressor):
    """Keeps the `budget` patches an MLP scores highest, in their original order."""

    def __init__(self, dim: int, num_patches: int, budget: int,
                 relaxation: Literal["straight_through", "gumbel"] = "straight_through", tau: float = 1.0) -> None:
        super().__init__(num_patches, budget)
        if relaxation not in ("straight_through", "gumbel"):
            raise ValueError(f"relaxation {relaxation!r}: one of straight_through, gumbel")
        self.relaxation, self.tau = relaxation, tau
        self.scorer = mlp(dim, dim, 1)

    def scores(self, patches_BTD: torch.Tensor) -> torch.Tensor:
        """scores_BT (float32): how much each patch is worth keeping (only their order and differences matter)."""
        return self.scorer(patches_BTD).squeeze(-1).float()

    def forward(self, patches_BTD: torch.Tensor, query_BD: torch.Tensor | None = None) -> CompressOutput:
        self._check(patches_BTD)
        scores_BT = self.scores(patches_BTD)
        if self.relaxation == "gumbel" and self.training:   # noise while training only; evaluation takes the best
            mask_BT, index_BQ = gumbel_topk(scores_BT, self.budget, self.tau)
        else:
            mask_BT, index_BQ = straight_through_topk(scores_BT, self.budget, self.tau)
        gate_BQ = mask_BT.gather(1, index_BQ).to(patches_BTD.dtype)    # exactly 1 in the forward
        tokens_BQD = gather_tokens(patches_BTD, index_BQ) * gate_BQ.unsqueeze(-1)
        return CompressOutput(tokens_BQD, index_BQ, patches_BTD.new_zeros((), dtype=torch.float32))
