"""The pre-LLM compressor a `ModelConfig` asks for (None: every patch enters the LLM)."""
from __future__ import annotations

from ds_smoes.compress.base import TokenCompressor
from ds_smoes.compress.baselines import PoolCompressor, RandomPruner
from ds_smoes.compress.learnpruner import LearnedPruner
from ds_smoes.compress.qmop import QMoP
from ds_smoes.model.config import ModelConfig


def build_compressor(cfg: ModelConfig) -> TokenCompressor | None:
    """qmop, learnpruner (its stage 1), random, pool: a module from the vision encoder's patches to
    `cfg.compress.pre_llm_budget` tokens; none and fastv: None (fastv prunes inside the decoder only)."""
    c, side, t = cfg.compress, cfg.image_size // cfg.patch_size, cfg.num_patches
    q = c.pre_llm_budget(t)
    if c.method == "qmop":
        return QMoP(cfg.vision_dim, cfg.d_model, side, q, cfg.n_heads, c.qmop_top1, c.alpha_branch_balance)
    if c.method == "learnpruner":
        return LearnedPruner(cfg.vision_dim, t, q, c.stage1_relaxation,
                             c.gumbel_tau if c.stage1_relaxation == "gumbel" else 1.0)
    if c.method == "random":
        return RandomPruner(t, q, c.seed)
    if c.method == "pool":
        return PoolCompressor(side, q)
    return None
