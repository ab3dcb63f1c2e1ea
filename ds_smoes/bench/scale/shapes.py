"""MoE layer shapes of published models, for `python -m ds_smoes.bench scale`.

Figures from each model's released config (Hugging Face `config.json`): hidden size, routed experts,
experts per token, the routed experts' intermediate size and the shared experts.  Experts are SwiGLU
(gate and up projections fused, as transformers stores them, then down).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoEShape:
    key: str
    label: str
    hidden: int            # D
    num_experts: int       # E routed experts
    k: int                 # routes per token
    expert_ffn: int        # I: a routed expert's intermediate size
    shared_experts: int    # always-on experts of the same size (a dense MLP of shared_experts * I)
    source: str

    def expert_params(self) -> int:
        return 3 * self.hidden * self.expert_ffn


SHAPES: dict[str, MoEShape] = {s.key: s for s in (
    MoEShape("olmoe", "OLMoE-1B-7B", 2048, 64, 8, 1024, 0, "allenai/OLMoE-1B-7B-0924"),
    MoEShape("qwen3-vl", "Qwen3-VL-30B-A3B (text)", 2048, 128, 8, 768, 0, "Qwen/Qwen3-VL-30B-A3B-Instruct"),
    MoEShape("deepseek-vl2-tiny", "DeepSeek-VL2-Tiny", 1280, 64, 6, 896, 2, "deepseek-ai/deepseek-vl2-tiny"),
    # not a model: a seconds-long shape for the tests and a quick check of the command
    MoEShape("toy", "toy (tests)", 64, 8, 2, 32, 1, "none"),
)}
PUBLISHED = ("olmoe", "qwen3-vl", "deepseek-vl2-tiny")
