"""Baseline gates the SMoES paper compares against, behind the same gate interface.

Each is a DeepSpeed `TopKGate` subclass honouring the same sparse-route contract, selected by
`SMoESConfig.gate`; `ds_smoes.moe.registry.build_gate` builds them.  docs/gates.md explains each.
"""
from ds_smoes.moe.baselines.ltdr import LTDRGate, ltdr_tail_tokens
from ds_smoes.moe.baselines.modality_split import ModalitySplitGate, modality_expert_mask
from ds_smoes.moe.baselines.smar import SMARGate
from ds_smoes.moe.baselines.topk import DeepSpeedTopKGate

__all__ = ["DeepSpeedTopKGate", "LTDRGate", "ModalitySplitGate", "SMARGate", "ltdr_tail_tokens",
           "modality_expert_mask"]
