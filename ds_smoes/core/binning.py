"""Expert bins: the unit of modality specialisation and of placement on expert-parallel ranks.

docs/method.md, "Expert bins".  A bin holds N_e / N_bins experts; bin b is placed on expert-parallel rank
b * ep_size // N_bins, so each rank holds N_bins / ep_size whole bins.

Shapes: E experts, M modalities (0 text, 1 vision), G bins.
"""
from __future__ import annotations

import torch
from torch import nn

from ds_smoes.core.step_state import Float32State, warn_unapplied


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
    cut_E = torch.arange(num_experts, device=load_ME.device) // (num_experts // num_bins)
    return torch.empty_like(cut_E).scatter_(0, order_E, cut_E)


def bin_one_hot(bin_E: torch.Tensor, num_bins: int) -> torch.Tensor:
    """[E, G] float membership matrix (a comparison, not `F.one_hot`, which reads the ids' range back to the
    host on the CPU)."""
    return (bin_E.long().unsqueeze(-1) == torch.arange(num_bins, device=bin_E.device)).float()


def rank_of_bin_placed_expert(bin_E: torch.Tensor, num_bins: int, ep_size: int) -> torch.Tensor:
    """EP rank an expert lives on once experts are placed by bin: bin * ep_size // num_bins."""
    return bin_E.long() * ep_size // num_bins


class ExpertBinning(Float32State):
    """Holds the current bins and the per-expert modality load EMA, in buffers.

    Updated once per optimizer step, never inside a forward (a forward that runs twice, as under
    activation checkpointing, must not update twice):

    - `record(load_ME)` (the gate's forward) adds this rank's load to `pending_load_ME`;
    - once per optimizer step, `ds_smoes.moe.updates.apply_step_updates` sums `pending()` over the
      data-parallel world (one all-reduce for every layer together) and hands it to `apply_pending`, which
      folds it into the EMA (`observe`) and re-cuts adaptive bins when due (`maybe_rebin`), every
      `rebin_interval` steps until `freeze_step`.  Every rank then holds identical buffers.

    The step count is mirrored on the host (`host_step`, read from the buffer once after a load), so
    deciding whether a rebin is due or the bins are frozen costs no device-to-host sync.
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
        # what forwards recorded since the last optimizer step (this rank); not checkpointed: a checkpoint is
        # written between steps, where it is empty
        self.register_buffer("pending_load_ME", torch.zeros(2, num_experts), persistent=False)
        self._host_step: int | None = 0
        self._unapplied = 0   # forwards recorded since the last `apply_pending`

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # checkpoints and exports written before 0.2 name the bin map `bin_id_E`
        if prefix + "bin_id_E" in state_dict and prefix + "bin_E" not in state_dict:
            state_dict[prefix + "bin_E"] = state_dict.pop(prefix + "bin_id_E")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._host_step = None  # read from the loaded buffer on next use

    @property
    def host_step(self) -> int:
        """`step` on the host: one read after a checkpoint load, then kept in step by `observe`."""
        if self._host_step is None:
            self._host_step = int(self.step)
        return self._host_step

    # -- forward side ---------------------------------------------------------------------------------
    @torch.no_grad()
    def record(self, load_ME: torch.Tensor) -> None:
        """Add one forward's load (tokens per hard modality and expert, this rank) to the step's pending load."""
        self.pending_load_ME.add_(load_ME.to(self.pending_load_ME.dtype))
        self._unapplied = warn_unapplied(self._unapplied + 1, "bins")

    # -- once per optimizer step ---------------------------------------------------------------------
    def pending(self) -> list[torch.Tensor]:
        """What `apply_pending` needs summed over the world: the pending load, or nothing once the bins are fixed."""
        return [] if self.frozen else [self.pending_load_ME]

    @torch.no_grad()
    def apply_pending(self, reduced: list[torch.Tensor]) -> torch.Tensor:
        """Fold the world's pending load into the EMA, re-cut the bins when due, clear the pending load.
        Returns a 0-dim bool tensor: whether the bins changed (not read here: no host sync)."""
        self.pending_load_ME.zero_()
        self._unapplied = 0
        if not reduced:
            return torch.zeros((), dtype=torch.bool, device=self.bin_E.device)
        self.observe(reduced[0])
        return self.maybe_rebin()

    @torch.no_grad()
    def observe(self, load_ME: torch.Tensor) -> None:
        """One step of the load EMA: load_ema <- beta * load_ema + (1 - beta) * load (already world-summed)."""
        self.load_ema_ME.mul_(self.beta).add_(load_ME.float(), alpha=1.0 - self.beta)
        self.step += 1
        self._host_step = self.host_step + 1

    @torch.no_grad()
    def maybe_rebin(self) -> torch.Tensor:
        """Re-cut adaptive bins when due; returns a 0-dim bool tensor, True when the assignment changed."""
        step = self.host_step
        if not self.adaptive or step == 0 or step > self.freeze_step or step % self.rebin_interval:
            return torch.zeros((), dtype=torch.bool, device=self.bin_E.device)
        new_bin_E = adaptive_bins(self.load_ema_ME, self.num_bins)
        changed = (new_bin_E != self.bin_E).any()
        self.bin_E.copy_(new_bin_E)
        self.num_rebins += changed.long()
        return changed

    @property
    def frozen(self) -> bool:
        return not self.adaptive or self.host_step >= self.freeze_step
