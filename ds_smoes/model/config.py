"""Architecture of the small MoE-VLM."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ds_smoes.compress.config import CompressConfig


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    d_model: int = Field(64, ge=8, description="decoder hidden size")
    n_layers: int = Field(4, ge=1, description="decoder blocks")
    n_heads: int = Field(4, ge=1, description="attention heads (decoder and vision encoder)")
    ffn_mult: int = Field(2, ge=1, description="expert / MLP hidden size = ffn_mult * d_model")
    moe_layers: Literal["every_other", "all", "none"] = Field(
        "every_other", description="which decoder blocks get an SMoESMoE FFN (every_other: blocks 1, 3, ...)")
    image_size: int = Field(8, ge=2, description="images are resized to image_size x image_size (grayscale)")
    patch_size: int = Field(2, ge=1, description="square patch side; image_size must be a multiple")
    vision_dim: int = Field(64, ge=8, description="vision encoder width")
    vision_layers: int = Field(1, ge=0, description="transformer blocks in the vision encoder")
    vision_pos: Literal["learned", "sincos"] = Field(
        "learned", description="vision patch positions: learned (a trained table, initialised small) or sincos "
                               "(fixed 2-D sine-cosine rows and columns; vision_dim a multiple of 4): the canvas "
                               "config uses sincos so that where a digit sits is known from the first step")
    vision_checkpoint: str | None = Field(
        None, description="a pretrained patch encoder (`python -m ds_smoes.pretrain_vision`, the recipe's stage 0: "
                          "encoder.pt) whose weights the vision encoder starts from; its shape fields must match "
                          "image_size, patch_size, vision_dim, vision_layers, n_heads and vision_pos")
    freeze_vision: bool | None = Field(
        None, description="keep the vision encoder's weights fixed (no gradient, no optimizer state); None: frozen "
                          "when vision_checkpoint is set (a pretrained encoder, as LLaVA freezes CLIP), trained "
                          "otherwise")
    freeze_decoder: bool = Field(
        False, description="keep the language model's weights fixed (token and position embeddings, decoder blocks, "
                           "final norm, LM head): the recipe's stage I trains the projector alone on a frozen "
                           "language model")
    freeze_projector: bool = Field(
        False, description="keep the vision-to-language projector fixed (the recipe's language stage, which sees "
                           "no image)")
    start_from: str | None = Field(
        None, description="a dense run's output_dir (model.moe_layers: none, the same other model fields, the same "
                          "training split) whose final checkpoint the model starts from: a dense model copies "
                          "every tensor (the recipe's stages I-II chain this way); a MoE model is upcycled, every "
                          "expert of a MoE block a copy of the block's dense FFN (stage III, ds_smoes.model.upcycle)")
    upcycle_noise: float = Field(0.0, ge=0.0, description="relative noise added to each upcycled expert's weight "
                                                          "matrices (0: exact copies, as MoE-LLaVA)")
    max_len: int = Field(96, ge=8, description="longest sequence (image patches + text)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="residual and embedding dropout in the decoder")
    attn_impl: Literal["sdpa", "eager"] = Field(
        "sdpa", description="sdpa: fused attention; the attention score comes from a second fused call with the "
                            "scores as values, no [T, T] tensor (ds_smoes.core.attention_score); eager: explicit "
                            "float32 softmax whose probabilities serve the score too (fine for short sequences, "
                            "as in the demo; memory grows with T^2)")

    activation_checkpointing: bool = Field(
        False, description="recompute each decoder block's activations in the backward instead of keeping them "
                           "(DeepSpeed's activation checkpointing): less memory, one more forward per block; the "
                           "SMoES state still updates once per step")
    compress: CompressConfig = Field(
        CompressConfig(), description="visual token compression (issue 19, docs/compression.md); method none keeps "
                                      "every vision token")

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.d_model % self.n_heads or self.vision_dim % self.n_heads:
            raise ValueError(f"d_model={self.d_model} and vision_dim={self.vision_dim} must be multiples of "
                             f"n_heads={self.n_heads}")
        if self.vision_pos == "sincos" and self.vision_dim % 4:
            raise ValueError(f"vision_pos=sincos needs vision_dim a multiple of 4, got {self.vision_dim}")
        self.compress.check_layers(self.n_layers)
        if self.freeze_decoder and self.moe_layers != "none":
            raise ValueError("freeze_decoder is for the dense stages (moe_layers: none): a MoE model with its "
                             "decoder frozen would not train its experts or routers")
        return self

    @property
    def vision_frozen(self) -> bool:
        """Whether the vision encoder trains (`freeze_vision`, or by default: frozen when pretrained)."""
        return self.freeze_vision if self.freeze_vision is not None else self.vision_checkpoint is not None

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def is_moe_block(self, index: int) -> bool:
        return self.moe_layers == "all" or (self.moe_layers == "every_other" and index % 2 == 1)
