"""Training-time image augmentation."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def random_shift(image_BCHW: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate every image by an independent integer offset in [-max_shift, max_shift] per axis,
    filling with zeros (the digits' background).  max_shift 0 returns the input unchanged."""
    if max_shift <= 0:
        return image_BCHW
    b, _, h, w = image_BCHW.shape
    padded = F.pad(image_BCHW, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator)
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])
