"""Patch vision encoder and the 2-layer MLP projector (LLaVA's `mlp2x_gelu`)."""
from __future__ import annotations

import torch
from torch import nn

from ds_smoes.model.attention import SelfAttention


def mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


class EncoderBlock(nn.Module):
    """Pre-norm bidirectional transformer block."""

    def __init__(self, dim: int, n_heads: int, impl: str) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, n_heads, impl)
        self.mlp = mlp(dim, 2 * dim, dim)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_BTD = x_BTD + self.attn(self.ln1(x_BTD))[0]   # every patch sees every patch: no mask
        return x_BTD + self.mlp(self.ln2(x_BTD))


class PatchVisionEncoder(nn.Module):
    """[B, C, H, W] image -> [B, T, vision_dim] patch features (T = (H / patch)^2 patches: the encoder's sequence)."""

    def __init__(self, image_size: int, patch_size: int, channels: int, dim: int, layers: int, n_heads: int,
                 impl: str) -> None:
        super().__init__()
        self.patch_size = patch_size
        num_patches = (image_size // patch_size) ** 2
        self.embed = nn.Linear(channels * patch_size * patch_size, dim)
        self.pos_TD = nn.Parameter(torch.randn(num_patches, dim) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(dim, n_heads, impl) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # checkpoints and exports written before 0.2 name the position table `pos_PD`
        if prefix + "pos_PD" in state_dict and prefix + "pos_TD" not in state_dict:
            state_dict[prefix + "pos_TD"] = state_dict.pop(prefix + "pos_PD")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def patchify(self, image_BCHW: torch.Tensor) -> torch.Tensor:
        b, c, h, w = image_BCHW.shape
        p = self.patch_size
        x = image_BCHW.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def forward(self, image_BCHW: torch.Tensor) -> torch.Tensor:
        # pixels come as float32; the weights may be bf16 (DeepSpeed's bf16 casts the model, not its inputs)
        x_BTD = self.embed(self.patchify(image_BCHW.to(self.embed.weight.dtype))) + self.pos_TD
        for block in self.blocks:
            x_BTD = block(x_BTD)
        return self.ln(x_BTD)
