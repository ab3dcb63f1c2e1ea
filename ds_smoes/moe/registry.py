"""Gate names (`SMoESConfig.gate`) to gate classes."""
from __future__ import annotations

from ds_smoes.moe.baselines import DeepSpeedTopKGate, LTDRGate, ModalitySplitGate, SMARGate
from ds_smoes.core.config import SMoESConfig
from ds_smoes.moe.gate import ModalityGate, SMoESGate

GATES: dict[str, type[ModalityGate]] = {
    "smoes": SMoESGate,
    "topk": DeepSpeedTopKGate,
    "hard": ModalitySplitGate,
    "hybrid": ModalitySplitGate,
    "ltdr": LTDRGate,
    "smar": SMARGate,
}


def build_gate(model_dim: int, config: SMoESConfig) -> ModalityGate:
    return GATES[config.gate](model_dim, config)
