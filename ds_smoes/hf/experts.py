"""One expert of a converted Hugging Face MoE block: a gated MLP (SwiGLU-style) in the fused layout.

Transformers 5 stores the experts of a sparse MoE block as 3-D tensors:
`gate_up_proj` [E, 2I, D] (the gate rows first, then the up rows) and `down_proj` [E, D, I].
DeepSpeed's `MoE` wants one `nn.Module` per expert, which it deep-copies per local expert;
`GatedExpert` is that module, and it computes exactly what the fused loop computes for one expert:
`down(act(gate(x)) * up(x))`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class GatedExpert(nn.Module):
    """`down_proj(act(gate(x)) * up(x))` with the gate and up projections fused in one weight [2I, D]."""

    def __init__(self, hidden_size: int, intermediate_size: int, act_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = act_fn

    def forward(self, x_SD: torch.Tensor) -> torch.Tensor:
        gate_SI, up_SI = F.linear(x_SD, self.gate_up_proj.weight).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate_SI) * up_SI)


@torch.no_grad()
def load_expert_(expert: GatedExpert, gate_up_FD: torch.Tensor, down_DI: torch.Tensor) -> None:
    """Copy one expert's weights (gate_up [2I, D], down [D, I]) into `expert`, keeping its dtype."""
    if expert.gate_up_proj.weight.shape != gate_up_FD.shape or expert.down_proj.weight.shape != down_DI.shape:
        raise ValueError(f"expert weight shapes {tuple(gate_up_FD.shape)}, {tuple(down_DI.shape)} do not fit the "
                         f"expert module ({tuple(expert.gate_up_proj.weight.shape)}, "
                         f"{tuple(expert.down_proj.weight.shape)})")
    expert.gate_up_proj.weight.copy_(gate_up_FD)
    expert.down_proj.weight.copy_(down_DI)


def local_expert_ids(num_experts: int, ep_size: int, ep_rank: int) -> range:
    """Global ids of the experts DeepSpeed places on EP rank `ep_rank`: a contiguous block of E / ep."""
    per_rank = num_experts // ep_size
    return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)


def fuse_gate_up(gate_ID: torch.Tensor, up_ID: torch.Tensor) -> torch.Tensor:
    """Dense MLP weights -> the fused [2I, D] layout (gate rows first), as transformers stores experts."""
    return torch.cat([gate_ID, up_ID], dim=0)
