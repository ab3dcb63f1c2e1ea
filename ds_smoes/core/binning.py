"""Expert bins: the unit of modality specialisation and of placement on expert-parallel ranks.

SMOES.md section 2.  A bin holds N_e / N_bins experts; bin b is placed on expert-parallel rank
b * ep_size // N_bins, so each rank holds N_bins / ep_size whole bins.

Shapes: E experts, M modalities (0 text, 1 vision), G bins.
"""
from __future__ import annotations

import torch
from torch import nn


def fixed_bins(num_experts: int, num_bins: int) -> torch.Tensor:
    """bin b = experts [b * N_B, (b + 1) * N_B): returns bin_E (long)."""
    return torch.arange(num_experts) // (num_experts // num_bins)


def text_bias(load_ME: torch.Tensor) -> torch.Tensor:
    """f(e) = C_text,e / (C_text,e + C_vision,e); 0.5 for an expert that has seen no tokens."""
    total_E = load_ME.sum(0)
    return torch.where(total_E > 0, load_ME[0] / total_E.clamp_min(1e-12), torch.full_like(total_E, 0.5))


def adaptive_bins(load_ME: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Sort experts by text bias (most text first, ties by expert id) and cut into contiguous bins."""
    num_experts = load_ME.shape[1]
    bias_E = text_bias(load_ME.float())
    order_E = torch.sort(-bias_E, stable=True).indices  # most text-biased first
    bin_E = torch.empty(num_experts, dtype=torch.long)
    bin_E[order_E] = torch.arange(num_experts) // (num_experts // num_bins)
    return bin_E


def bin_one_hot(bin_E: torch.Tensor, num_bins: int) -> torch.Tensor:
    """[E, B] float membership matrix."""
    return torch.nn.functional.one_hot(bin_E.long(), num_bins).float()


def rank_of_bin_placed_expert(bin_E: torch.Tensor, num_bins: int, ep_size: int) -> torch.Tensor:
    """EP rank an expert lives on once experts are placed by bin: bin * ep_size // num_bins."""
    return bin_E.long() * ep_size // num_bins


class ExpertBinning(nn.Module):
    """Holds the current bins and the per-expert modality load EMA, in buffers.

    `observe` folds one step's load in (callers pass a load already summed over the
    data-parallel world, so every rank keeps identical buffers); `maybe_rebin` re-cuts
    adaptive bins every `rebin_interval` steps until `freeze_step`.
    """

    def __init__(self, num_experts: int, num_bins: int, adaptive: bool, beta: float = 0.99,
                 rebin_interval: int = 25, freeze_step: int = 200) -> None:
        super().__init__()
        self.num_experts, self.num_bins, self.adaptive = num_experts, num_bins, adaptive
        self.beta, self.rebin_interval, self.freeze_step = beta, rebin_interval, freeze_step
        # Buffer names must not contain "expert": DeepSpeed's MoE checkpointing treats every such key of an
        # MoE module as an expert parameter (and drops it from the non-expert state).
        self.register_buffer("bin_E", fixed_bins(num_experts, num_bins))
        self.register_buffer("load_ema_ME", torch.zeros(2, num_experts))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_rebins", torch.zeros((), dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # checkpoints and exports written before 0.2 name the bin map `bin_id_E`
        if prefix + "bin_id_E" in state_dict and prefix + "bin_E" not in state_dict:
            state_dict[prefix + "bin_E"] = state_dict.pop(prefix + "bin_id_E")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def observe(self, load_ME: torch.Tensor) -> None:
        self.load_ema_ME.mul_(self.beta).add_(load_ME.float(), alpha=1.0 - self.beta)
        self.step += 1

    @torch.no_grad()
    def maybe_rebin(self) -> bool:
        """Re-cut adaptive bins when due; returns True when the assignment changed."""
        step = int(self.step)
        if not self.adaptive or step == 0 or step > self.freeze_step or step % self.rebin_interval:
            return False
        new_bin_E = adaptive_bins(self.load_ema_ME, self.num_bins).to(self.bin_E.device)
        if torch.equal(new_bin_E, self.bin_E):
            return False
        self.bin_E.copy_(new_bin_E)
        self.num_rebins += 1
        return True

    @property
    def frozen(self) -> bool:
        return not self.adaptive or int(self.step) >= self.freeze_step
