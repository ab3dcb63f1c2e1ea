"""The baselines users compare the learned compressors against, at the same budget (issue 19).

`RandomPruner`: a uniformly random subset of the patches, in their original order.  Training draws a fresh subset
per image from its own seeded generator (`compress.seed`); evaluation keeps one fixed subset, drawn once from the
seed, for every image, so an evaluation is reproducible and a sample's output does not depend on its batch (ours).

`PoolCompressor`: average pooling of the patch grid to the budget (`ds_smoes.compress.selection.pool_matrix`:
adaptive average pooling for a square budget, a ragged grid otherwise); the pooled tokens are new tokens
(`index_BQ` None).  Neither has parameters.  The FastV-style baseline prunes inside the decoder (not here).
"""
from __future__ import annotations

import torch

from ds_smoes.compress.selection import gather_tokens, pool_matrix, random_indices
from ds_smoes.compress.base import CompressOutput, TokenCompressor


class RandomPruner(TokenCompressor):
    def __init__(self, num_patches: int, budget: int, seed: int = 0) -> None:
        super().__init__(num_patches, budget)
        self.generator = torch.Generator().manual_seed(seed)
        # derived from the seed, so not saved (persistent=False): a checkpoint without it loads
        eval_index_Q = random_indices(1, num_patches, budget, torch.Generator().manual_seed(seed))[0]
        self.register_buffer("eval_index_Q", eval_index_Q, persistent=False)

    def forward(self, patches_BTD: torch.Tensor, query_BD: torch.Tensor | None = None) -> CompressOutput:
        self._check(patches_BTD)
        b = patches_BTD.shape[0]
        if self.training:   # drawn on the host (the generator's device), copied to the patches' device
            index_BQ = random_indices(b, self.num_patches, self.budget, self.generator, patches_BTD.device)
        else:
            index_BQ = self.eval_index_Q.expand(b, -1)
        return CompressOutput(gather_tokens(patches_BTD, index_BQ), index_BQ,
                              patches_BTD.new_zeros((), dtype=torch.float32))


class PoolCompressor(TokenCompressor):
    def __init__(self, grid_side: int, budget: int) -> None:
        super().__init__(grid_side * grid_side, budget)
        self.register_buffer("weights_QT", pool_matrix(grid_side, grid_side, budget), persistent=False)

    def forward(self, patches_BTD: torch.Tensor, query_BD: torch.Tensor | None = None) -> CompressOutput:
        self._check(patches_BTD)
        tokens_BQD = torch.einsum("qt,btd->bqd", self.weights_QT.to(patches_BTD.dtype), patches_BTD)
        return CompressOutput(tokens_BQD, None, patches_BTD.new_zeros((), dtype=torch.float32))
