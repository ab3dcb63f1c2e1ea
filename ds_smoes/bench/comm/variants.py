"""The benchmark's variants: which trained router a variant's routing comes from, and how its
tokens cross the expert-parallel group.

(a)-(d) are the issue's four; (e) is an extra that separates the two effects: the stock
top-k router moved by the new dispatch.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    gate: str                          # the router and the trained model it comes from: "topk" or "smoes"
    dispatch: str                      # SMoESConfig.dispatch
    max_bins_per_token: int | None = None

    def smoes_fields(self) -> dict:
        """The SMoESConfig fields this variant sets (none of them changes a parameter)."""
        return {"gate": self.gate, "dispatch": self.dispatch, "max_bins_per_token": self.max_bins_per_token}


VARIANTS: dict[str, Variant] = {v.key: v for v in (
    Variant("a", "top-k gate + stock dispatch", "topk", "deepspeed"),
    Variant("b", "SMoES gate + stock dispatch", "smoes", "deepspeed"),
    Variant("c", "SMoES gate + rank_once dispatch", "smoes", "rank_once"),
    Variant("d", "(c) with max_bins_per_token = 1", "smoes", "rank_once", 1),
    Variant("e", "top-k gate + rank_once dispatch (extra)", "topk", "rank_once"),
)}
REFERENCE = "a"
GATES = ("topk", "smoes")
