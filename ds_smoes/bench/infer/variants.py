"""The models `python -m ds_smoes.bench infer` serves: which trained recipe each comes from
(`ds_smoes.bench.runs.RECIPES`) and the expert-parallel dispatch it is served with.

The five the issue names, plus one extra that separates the router from the dispatch: the
top-k model served by the rank_once dispatch.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InferVariant:
    key: str
    label: str
    recipe: str                    # the trained model (a RECIPES name)
    dispatch: str | None           # SMoESConfig.dispatch at inference; None for the dense model

    def overrides(self, ep_size: int) -> list[str]:
        """The config fields this variant sets at inference (none of them changes a parameter)."""
        out = [f"smoes.ep_size={ep_size}"]
        return out + ([f"smoes.dispatch={self.dispatch}"] if self.dispatch else [])


INFER_VARIANTS: dict[str, InferVariant] = {v.key: v for v in (
    InferVariant("dense", "dense VLM (same active parameters)", "dense", None),
    InferVariant("topk", "DeepSpeed top-k MoE, stock dispatch", "topk", "deepspeed"),
    InferVariant("topk-ro", "top-k MoE, rank_once dispatch (extra)", "topk", "rank_once"),
    InferVariant("hard", "hard modality routing, rank_once", "hard", "rank_once"),
    InferVariant("smoes", "SMoES, rank_once", "smoes", "rank_once"),
    InferVariant("smoes-bin1", "SMoES trained with one bin per token, rank_once", "smoes-bin1", "rank_once"),
)}
REFERENCE = "topk"     # the paired time ratios are against DeepSpeed's own MoE
