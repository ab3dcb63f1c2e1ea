"""Stage 0's supervision of the patch vision encoder: which digit, and in which quadrant of the canvas.

The encoder is pretrained alone, as LLaVA-style models start from a pretrained CLIP / SigLIP encoder, before any
language model sees it (docs/recipe.md).  On top of its patch features sits a learned attention pooling (one
query; it starts as the mean over patches and learns to look at the digit's patches) and two linear heads.  The
heads are thrown away after stage 0; only the encoder's weights are kept.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NUM_DIGITS = 10
NUM_QUADRANTS = 4


class DigitWhereHeads(nn.Module):
    """[N, T, D] patch features -> (digit logits [N, 10], quadrant logits [N, 4])."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.key = nn.Linear(dim, dim)
        self.query_D = nn.Parameter(torch.zeros(dim))   # zeros: uniform attention, the mean over patches, at first
        self.digit = nn.Linear(dim, NUM_DIGITS)
        self.where = nn.Linear(dim, NUM_QUADRANTS)

    def forward(self, features_NTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        score_NT = self.key(features_NTD) @ self.query_D / math.sqrt(features_NTD.shape[-1])
        pooled_ND = (F.softmax(score_NT, dim=-1).unsqueeze(-1) * features_NTD).sum(dim=1)
        return self.digit(pooled_ND), self.where(pooled_ND)
