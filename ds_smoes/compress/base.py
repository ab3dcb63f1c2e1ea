"""The call every pre-LLM compressor answers: vision-encoder patches (and the text query) in, the kept tokens out.

Shapes (glossary: `ds_smoes/__init__.py`): B images, T an image's patches (raster order), D the vision encoder's
width, Q the tokens per image that reach the LLM (the budget, `CompressConfig.pre_llm_budget`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class CompressOutput:
    tokens_BQD: torch.Tensor           # what the projector maps into the LLM, in the patches' dtype
    index_BQ: torch.Tensor | None      # which patches were kept (long, ascending); None for generated tokens
    aux_loss: torch.Tensor             # 0-dim, already weighted: added to the model's auxiliary loss


class TokenCompressor(nn.Module):
    """Base of the pre-LLM compressors: `num_patches` patches per image in, `budget` tokens out.

    `forward(patches_BTD, query_BD=None) -> CompressOutput`; `query_BD` is the pooled text query in the LLM's
    width (`TinyMoEVLM` gives the mean of the prompt's token embeddings); methods that do not read it ignore it."""

    def __init__(self, num_patches: int, budget: int) -> None:
        super().__init__()
        if not 1 <= budget <= num_patches:
            raise ValueError(f"budget {budget} must be in 1..{num_patches} (the patches per image)")
        self.num_patches, self.budget = num_patches, budget

    def forward(self, patches_BTD: torch.Tensor, query_BD: torch.Tensor | None = None) -> CompressOutput:
        raise NotImplementedError

    def _check(self, patches_BTD: torch.Tensor) -> None:
        if patches_BTD.dim() != 3 or patches_BTD.shape[1] != self.num_patches:
            raise ValueError(f"{type(self).__name__} expects [images, {self.num_patches} patches, width], got "
                             f"{tuple(patches_BTD.shape)}")

    def extra_repr(self) -> str:
        return f"{self.num_patches} patches -> {self.budget} tokens"
