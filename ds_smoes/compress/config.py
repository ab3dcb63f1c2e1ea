"""Configuration of visual token compression (issue 19), validated at the boundary.

`keep_ratio` is the final budget: the share of an image's vision tokens that reach the LLM's later layers.
Which stage removes how many is derived here, once, so the data layer (how many `<image>` placeholders), the
pre-LLM compressor and the in-LLM pruning agree:

    method        before the LLM (pre_llm_budget)     inside the LLM (in_llm_layer)
    none          all patches                         -
    qmop          budget                              -
    random, pool  budget                              -
    learnpruner   stage-1 budget (stage1_keep_ratio)  stage 2 before block stage2_layer keeps budget
    fastv         all patches                         before block fastv_layer keeps budget

Checks that need the decoder depth (the layers) are in `ModelConfig`'s validator, which calls `check_layers`.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

CompressMethod = Literal["none", "qmop", "learnpruner", "random", "pool", "fastv"]
PRE_LLM_METHODS = ("qmop", "learnpruner", "random", "pool")   # methods with a module between encoder and LLM
IN_LLM_METHODS = ("learnpruner", "fastv")                     # methods that prune inside the decoder


class CompressConfig(BaseModel):
    """Which visual token compression runs and at what budget (docs/compression.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: CompressMethod = Field(
        "none", description="none; qmop (pooling + resampler + pruning branches fused by a query-guided router); "
                            "learnpruner (learned scorer after the encoder, then text-to-vision attention in a "
                            "middle layer); baselines random, pool (adaptive average pooling), fastv (attention from "
                            "the last prompt token at fastv_layer)")
    keep_ratio: float = Field(1.0, gt=0.0, le=1.0, description="final budget: share of an image's vision tokens that "
                                                              "reach the LLM's later layers")
    # QMoP
    qmop_top1: bool = Field(False, description="qmop: route to the single best branch (straight-through) instead of "
                                               "the weighted fusion of all three")
    alpha_branch_balance: float = Field(0.01, ge=0.0, description="qmop: weight of the branch-balance auxiliary loss")
    # LearnPruner
    stage1_keep_ratio: float | None = Field(
        None, gt=0.0, le=1.0, description="learnpruner: share kept by stage 1 after the vision encoder; None means "
                                          "min(1, 2 * keep_ratio)")
    stage2_layer: int | None = Field(
        None, ge=1, description="learnpruner: decoder block index before which stage 2 runs; None means n_layers // 2")
    stage1_relaxation: Literal["straight_through", "gumbel"] = Field(
        "straight_through", description="learnpruner stage 1: hard top-k forward, gradient through the soft scores; "
                                        "gumbel adds Gumbel noise to the scores in training")
    gumbel_tau: float = Field(1.0, gt=0.0, description="learnpruner stage 1, gumbel: temperature of the soft scores")
    # FastV-style baseline
    fastv_layer: int = Field(2, ge=1, description="fastv: prune before this decoder block, with the attention from "
                                                  "the last prompt token computed at the block before it")
    seed: int = Field(0, ge=0, description="random: seed of the token draws")

    @model_validator(mode="after")
    def _check(self) -> "CompressConfig":
        if self.stage1_keep_ratio is not None and self.stage1_keep_ratio < self.keep_ratio:
            raise ValueError(f"compress.stage1_keep_ratio={self.stage1_keep_ratio} is below keep_ratio="
                             f"{self.keep_ratio}: stage 1 cannot keep fewer tokens than the final budget; raise it "
                             "or leave it unset (min(1, 2 * keep_ratio))")
        if self.method == "none" and self.keep_ratio != 1.0:
            raise ValueError(f"compress.keep_ratio={self.keep_ratio} with method 'none' keeps every token; set a "
                             "method (qmop, learnpruner, random, pool, fastv) or keep_ratio 1.0")
        return self

    @property
    def effective_stage1_keep_ratio(self) -> float:
        return min(1.0, 2 * self.keep_ratio) if self.stage1_keep_ratio is None else self.stage1_keep_ratio

    def budget(self, num_patches: int) -> int:
        """Vision tokens per image in the LLM's later layers: max(1, round(keep_ratio * num_patches))."""
        return max(1, round(self.keep_ratio * num_patches))

    def stage1_budget(self, num_patches: int) -> int:
        """learnpruner: vision tokens per image that stage 1 keeps (never below the final budget)."""
        return max(self.budget(num_patches), round(self.effective_stage1_keep_ratio * num_patches))

    def pre_llm_budget(self, num_patches: int) -> int:
        """Vision tokens per image that enter the LLM: the `<image>` placeholders the data layer inserts."""
        if self.method in ("qmop", "random", "pool"):
            return self.budget(num_patches)
        if self.method == "learnpruner":
            return self.stage1_budget(num_patches)
        return num_patches

    def in_llm_layer(self, n_layers: int) -> int | None:
        """Decoder block index before which in-LLM pruning runs (learnpruner, fastv), else None."""
        if self.method == "learnpruner":
            return n_layers // 2 if self.stage2_layer is None else self.stage2_layer
        if self.method == "fastv":
            return self.fastv_layer
        return None

    def check_layers(self, n_layers: int) -> None:
        """Raise ValueError unless the in-LLM pruning layer fits a decoder of `n_layers` blocks (1..n_layers-1:
        at least one block computes the attention that scores the tokens, at least one runs on the kept ones)."""
        layer = self.in_llm_layer(n_layers)
        if layer is None:
            return
        field = "stage2_layer" if self.method == "learnpruner" else "fastv_layer"
        if n_layers < 2:
            raise ValueError(f"compress.method={self.method!r} prunes inside the decoder and needs n_layers >= 2 "
                             f"(got {n_layers}); use a pre-LLM method (qmop, random, pool) or add layers")
        if not 1 <= layer <= n_layers - 1:
            raise ValueError(f"compress.{field}={layer} must be in 1..{n_layers - 1} (model.n_layers={n_layers}): "
                             "blocks before it score the vision tokens, blocks from it on run on the kept ones")
