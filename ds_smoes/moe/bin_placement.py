"""`BinPlacement`: the experts of a ds-smoes MoE layer onto their bins' EP ranks once adaptive bins freeze.

Shared by the two layers (`SMoESMoE`, DeepSpeed's MoE; `SMoESAutoEPLayer`, DeepSpeed's AutoEP layer): the plan is
`ds_smoes.core.placement`'s, the move `ds_smoes.parallel.migration.migrate_experts` (weights and optimizer state),
and the gate routes to physical slots (`gate.physical_E`).  A layer tells where its experts are
(`_placement_experts`: per-expert modules, or AutoEP's stacked weights) and its EP size and group.
"""
from __future__ import annotations

from ds_smoes.core.placement import is_placed, plan_physical
from ds_smoes.parallel.migration import MigrationCost, migrate_experts


class BinPlacement:
    """Mixin of an nn.Module MoE layer with `gate` (bins, `physical_E`), `config` and `_placed` (None: not known)."""

    _placed: bool | None

    def _placement_ep_size(self) -> int:
        raise NotImplementedError

    def _placement_experts(self):
        """(the experts `migrate_experts` moves, the EP group or None at one rank)."""
        raise NotImplementedError

    def placement_due(self) -> bool:
        """True once adaptive bins have frozen while some expert is not yet on its bin's EP rank.  Asked every
        step: the answer is kept on the host once the bins are frozen (they and the placement change no more,
        short of `place_experts` or a checkpoint load), so it costs no device read per step."""
        binning = self.gate.binning
        if not (self.config.placement == "bins" and binning.adaptive and binning.frozen):
            return False
        if self._placed is None:
            self._placed = is_placed(binning.bin_E, self.gate.physical_E, self.config.num_bins,
                                     self._placement_ep_size())
        return not self._placed

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._placed = None  # a loaded checkpoint may bring other bins or another placement

    def place_experts(self, optimizer=None) -> MigrationCost:
        """Move every expert (weights and `optimizer` state) onto its bin's EP rank; a collective over the EP
        group.  Call between optimizer steps (the runner does, when `placement_due()`)."""
        gate = self.gate
        experts, group = self._placement_experts()
        new_physical_E = plan_physical(gate.binning.bin_E, gate.physical_E, self.config.num_bins,
                                       self._placement_ep_size())
        cost = migrate_experts(experts, gate.physical_E, new_physical_E, group, optimizer)
        gate.physical_E.copy_(new_physical_E.to(gate.physical_E.device))
        self._placed = None
        return cost
