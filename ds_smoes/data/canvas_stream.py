"""Train-time canvas augmentation: every epoch, each training digit re-placed on a fresh noisy canvas.

The canvas dataset on disk (``ds_smoes.data.digits``, ``canvas_size`` 32 or 48) puts each digit at ONE seeded
place.  A vision encoder trained on those files alone sees each digit at one place only (about 1,250 training
images), and learns where digits happen to sit rather than what a digit is.  :class:`CanvasStream` draws, for
epoch ``e``, a new quadrant and grid offset for every training digit (the rule of ``canvas_layout``: the whole
digit inside its quadrant, on the 4-pixel grid) and a new background noise, from a generator seeded by
``(seed, e)``: the stream is reproducible from its seed, and a run resumed at epoch ``e`` draws exactly the
images an uninterrupted run draws there (nothing else to checkpoint but the epoch).

Only training-split digits enter the stream (``split_image_indices``), so the held-out images stay unseen.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ds_smoes.data.digits import (CANVAS_GRID, CANVAS_NOISE_MAX, LOCATIONS, check_canvas_size, grey_levels,
                                  quadrant_places, sklearn_digits, split_image_indices)


@dataclass(frozen=True)
class CanvasBatch:
    """One epoch's canvases: images in [0, 1] as the loader reads PNGs, the digit and its quadrant index
    (an index into ``LOCATIONS``), and the source image's index in the digits set."""

    image_NCHW: torch.Tensor
    digit_N: torch.Tensor
    quadrant_N: torch.Tensor
    source_N: torch.Tensor


def place_on_canvas(digit_NHW: torch.Tensor, row_N: torch.Tensor, col_N: torch.Tensor,
                    noise_NSS: torch.Tensor) -> torch.Tensor:
    """Canvases [N, S, S]: each noise canvas with its 8x8 digit at (row, col), the brighter of the two per pixel
    (what ``canvas_pixels`` writes to disk, in the same grey levels)."""
    n, h, w = digit_NHW.shape
    canvas_NSS = noise_NSS.clone()
    for i in range(n):   # N placements of an 8x8 patch: a loop over at most a few thousand small copies
        r, c = int(row_N[i]), int(col_N[i])
        canvas_NSS[i, r:r + h, c:c + w] = torch.maximum(canvas_NSS[i, r:r + h, c:c + w], digit_NHW[i])
    return canvas_NSS


class CanvasStream:
    """The training split's digits, re-placed on a new canvas every epoch (module docstring)."""

    def __init__(self, canvas_size: int, seed: int, split: str = "train", dataset_seed: int = 0,
                 digits: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        check_canvas_size(canvas_size)
        images_NHW, labels_N = digits if digits is not None else sklearn_digits()
        indices = split_image_indices(len(labels_N), dataset_seed)[split]
        self.canvas_size, self.seed = canvas_size, seed
        self.source_N = torch.tensor(indices, dtype=torch.long)
        # grey levels 0..16 -> 0..255 as the generator writes them, kept as uint8-valued floats
        self.digit_NHW = torch.tensor(grey_levels(images_NHW[indices]), dtype=torch.float32)
        self.label_N = torch.tensor(np.asarray(labels_N)[indices], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.label_N)

    def epoch(self, epoch: int) -> CanvasBatch:
        """Epoch ``epoch``'s canvases (a pure function of seed and epoch)."""
        n, size = len(self), self.canvas_size
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        half, free = quadrant_places(size)
        quadrant_N = torch.randint(0, len(LOCATIONS), (n,), generator=gen)
        row_N = (quadrant_N // 2) * half + CANVAS_GRID * torch.randint(0, free, (n,), generator=gen)
        col_N = (quadrant_N % 2) * half + CANVAS_GRID * torch.randint(0, free, (n,), generator=gen)
        noise_NSS = torch.randint(0, CANVAS_NOISE_MAX + 1, (n, size, size), generator=gen).float()
        canvas_NSS = place_on_canvas(self.digit_NHW, row_N, col_N, noise_NSS)
        return CanvasBatch((canvas_NSS / 255.0).unsqueeze(1), self.label_N, quadrant_N, self.source_N)
