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


def sincos_positions_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid * grid, dim] fixed 2-D sine-cosine positions of a square patch grid, patches in row-major order
    (as `PatchVisionEncoder.patchify` emits them): the first half of the dims encodes the patch row, the
    second its column, each as sin and cos at dim / 4 frequencies 1 / 10000^(i / (dim / 4)) (the ViT / MAE
    form).  Every entry is in [-1, 1]; dim must be a multiple of 4."""
    if dim % 4:
        raise ValueError(f"2-D sine-cosine positions need a width that is a multiple of 4, got {dim}")
    quarter = dim // 4
    omega_F = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows_T, cols_T = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                    indexing="ij")
    angle_row_TF = rows_T.reshape(-1, 1) * omega_F
    angle_col_TF = cols_T.reshape(-1, 1) * omega_F
    pos_TD = torch.cat([angle_row_TF.sin(), angle_row_TF.cos(), angle_col_TF.sin(), angle_col_TF.cos()], dim=1)
    return pos_TD.float()


class PatchVisionEncoder(nn.Module):
    """[B, C, H, W] image -> [B, T, vision_dim] patch features (T = (H / patch)^2 patches: the encoder's sequence).

    Patch positions (`pos`): "learned", a table initialised at N(0, 0.02^2) and trained; "sincos", fixed 2-D
    sine-cosine positions (`sincos_positions_2d`, a buffer that checkpoints do not store), which tell every
    patch its row and column from the first step: on a large canvas where one small object matters, the
    learned table starts as noise 50x smaller than the patch features, and "where is it?" stayed at chance after
    760 steps (configs/canvas.yaml has the measurements)."""

    def __init__(self, image_size: int, patch_size: int, channels: int, dim: int, layers: int, n_heads: int,
                 impl: str, pos: str = "learned") -> None:
        super().__init__()
        self.patch_size = patch_size
        grid = image_size // patch_size
        self.embed = nn.Linear(channels * patch_size * patch_size, dim)
        if pos == "learned":
            self.pos_TD = nn.Parameter(torch.randn(grid * grid, dim) * 0.02)
        elif pos == "sincos":
            self.register_buffer("pos_TD", sincos_positions_2d(grid, dim), persistent=False)
        else:
            raise ValueError(f"vision positions must be 'learned' or 'sincos', got {pos!r}")
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
