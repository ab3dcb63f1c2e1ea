"""Modality-aware gates on DeepSpeed's TopKGate, and SMoESGate.

`ModalityGate` honours the sparse-route contract of DeepSpeed 0.19.8 (`MOELayer` calls
`gate(x_SD, used_token, True, use_tutel)` and unpacks
`(l_aux, capacity, num_experts, indices_KS, locations_KS, gates_KS, exp_counts)`) for any k >= 1
and for a per-token number of experts (unused routes carry index -1).  It owns what every
gate shares: the modality side-information of the batch, capacity agreed across the
expert-parallel group, bins and routing statistics.  A gate says only three things:
`routing_probs` (which experts a token may use), `select` (which it uses) and `aux_losses`.

`SMoESGate`: global softmax, global top-k (the paper's routing); `l_aux` carries
alpha_bal * L_bal + alpha_MI * L_MI, so a training loop that already adds DeepSpeed's `l_aux`
to its loss needs no change.  The baselines live in `ds_smoes.moe.baselines`.

The modality side-information is handed over by `set_routing_inputs` right before each
forward (`ds_smoes.moe.layer.SMoESMoE` does it).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from deepspeed.moe.sharded_moe import TopKGate

from ds_smoes.parallel import distributed
from ds_smoes.core.binning import ExpertBinning, rank_of_bin_placed_expert
from ds_smoes.core.config import SMoESConfig
from ds_smoes.core import fused_losses
from ds_smoes.core.deferred import Deferred
from ds_smoes.core.losses import bin_kl_band_loss
from ds_smoes.core.metrics import expert_modality_load, routing_comm_stats
from ds_smoes.core.placement import counts_to_physical, to_physical
from ds_smoes.core.routing import (SparseRoutes, assign_slots, bin_limited_topk, capacity_for, finalize_routes,
                                   route_counts)
from ds_smoes.core.step_state import in_backward
from ds_smoes.core.scores import hard_scores


@dataclass
class RoutingInputs:
    """Per-token side information for one gate call (S tokens, M = 2 modalities)."""
    modality_SM: torch.Tensor   # soft modality scores, rows sum to 1, detached
    labels_S: torch.Tensor      # hard labels: 0 text, 1 vision
    sample_id_S: torch.Tensor   # which sample each token belongs to (for the per-sample MI)
    valid_S: torch.Tensor       # False for padding


@dataclass
class RoutingStats:
    """What one gate call decided, detached, for logging and metrics."""
    load_ME: torch.Tensor            # tokens per (hard modality, expert), this rank
    losses: dict                     # the gate's named auxiliary losses and diagnostics, detached
    capacity: int | torch.Tensor     # an int; the `topk` baseline's is DeepSpeed's own 0-dim tensor
    num_dropped: torch.Tensor        # 0-dim, on the device: reading the statistics needs no host read
    num_tokens: torch.Tensor         # 0-dim, on the device
    comm_physical: dict              # routing_comm_stats under DeepSpeed's expert layout (e // local experts)
    comm_binned: dict                # routing_comm_stats with experts placed by their bin
    bin_E: torch.Tensor

    @property
    def mi(self) -> torch.Tensor:
        """Mean per-sample modality-bin MI in nats (SMoES with the MI objective; else 0)."""
        return self.losses.get("mi", torch.zeros(()))


class ModalityGate(TopKGate):
    """Base of the modality-aware gates: routing contract, capacity, bins and statistics."""

    # RoutingStats of the most recent forward (None before it), computed on first read (ds_smoes.core.deferred)
    last_stats = Deferred()
    # True for gates whose tokens may use fewer routes than k or more (LTDR): their capacity reads the route count
    variable_routes = False

    def __init__(self, model_dim: int, config: SMoESConfig, ep_group=None, num_routes: int | None = None) -> None:
        super().__init__(model_dim, config.num_experts, k=config.k, capacity_factor=config.capacity_factor,
                         eval_capacity_factor=config.eval_capacity_factor, min_capacity=config.min_capacity,
                         noisy_gate_policy=None, drop_tokens=config.drop_tokens, use_rts=False, ep_group=ep_group)
        self.config = config
        self.num_routes = num_routes or config.k  # rows of the sparse routes (LTDR: a > k)
        self.binning = ExpertBinning(config.num_experts, config.num_bins, adaptive=config.adaptive_bins,
                                     beta=config.ema_beta,
                                     rebin_interval=config.rebin_interval, freeze_step=config.rebin_freeze_step)
        # physical_E[e]: where logical expert e's weights live (its DeepSpeed expert index; rank = physical // local experts).
        # The identity until ds_smoes.core.placement moves experts onto their bins' ranks.
        self.register_buffer("physical_E", torch.arange(config.num_experts))
        self._inputs: RoutingInputs | None = None
        self.last_stats = None
        self.last_capacity: int | torch.Tensor = 0   # what the last forward handed DeepSpeed
        # called with the dispatch's routes (physical ids) as soon as they are final, before the losses are
        # computed: the rank_once dispatch starts its count exchange there, so it overlaps with the losses
        self.on_routes: Callable[[torch.Tensor], None] | None = None

    def defer_stats(self, routes: SparseRoutes, inputs: RoutingInputs, valid_S: torch.Tensor, named: dict,
                    capacity: int | torch.Tensor) -> None:
        """Keep what `last_stats` needs; bins and placement are snapshot now, as they may change before it is read."""
        self.last_stats = partial(self._stats, routes, inputs, valid_S, named, capacity,
                                  self.binning.bin_E.clone(), self.physical_E.clone())

    # -- what a gate decides ------------------------------------------------------------------
    def routing_probs(self, logits_SE: torch.Tensor, inputs: RoutingInputs) -> torch.Tensor:
        """Router probabilities [S, E]; default: softmax over all experts."""
        return torch.softmax(logits_SE, dim=-1)

    def select(self, probs_SE: torch.Tensor, inputs: RoutingInputs, valid_S: torch.Tensor) -> torch.Tensor:
        """Chosen experts [S, num_routes], -1 for unused routes; default: top-k, inside the token's
        `max_bins_per_token` best bins when that limit is set."""
        cfg = self.config
        if cfg.max_bins_per_token is not None:
            return bin_limited_topk(probs_SE, self.binning.bin_E, cfg.num_bins, cfg.max_bins_per_token, cfg.k)
        return torch.topk(probs_SE, k=cfg.k, dim=1).indices

    def aux_losses(self, probs_SE: torch.Tensor, routes: SparseRoutes, inputs: RoutingInputs,
                   valid_S: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(l_aux, named losses and diagnostics for logging)."""
        raise NotImplementedError

    # -- side information -----------------------------------------------------------------------
    def set_routing_inputs(self, inputs: RoutingInputs) -> None:
        self._inputs = inputs

    def _take_inputs(self, num_tokens: int, device: torch.device) -> RoutingInputs:
        inputs, self._inputs = self._inputs, None
        if inputs is None:
            raise RuntimeError(
                f"{type(self).__name__} got no modality information for this batch: call it through "
                "ds_smoes.moe.layer.SMoESMoE, or call gate.set_routing_inputs(RoutingInputs(...)) before each forward")
        if inputs.modality_SM.shape != (num_tokens, 2):
            raise ValueError(f"modality scores have shape {tuple(inputs.modality_SM.shape)}, "
                             f"expected ({num_tokens}, 2) for {num_tokens} tokens")
        return RoutingInputs(*(t.to(device) for t in (inputs.modality_SM, inputs.labels_S, inputs.sample_id_S,
                                                       inputs.valid_S)))

    @property
    def slotless(self) -> bool:
        """The layer's dispatcher keeps no capacity-padded buffer (rank_once without dropping): routes need no
        slots and the EP ranks need no common capacity (no all-reduce of it)."""
        from ds_smoes.moe.dispatchers import DISPATCHERS

        return DISPATCHERS[self.config.dispatch].slotless(self.drop_tokens)   # the class's rule: nothing built per call

    # -- placement -------------------------------------------------------------------------------
    def ep_world(self) -> tuple[int, int]:
        """(this rank's index in the expert-parallel group, the group's size)."""
        if self.ep_group is None or not distributed.is_distributed():
            return 0, 1
        return distributed.group_rank(self.ep_group), torch.distributed.get_world_size(self.ep_group)

    def physical_rank_of_expert(self, ep_size: int, physical_E: torch.Tensor | None = None) -> torch.Tensor:
        """EP rank holding each logical expert: DeepSpeed puts physical experts [r * E/ep, (r+1) * E/ep) on rank r."""
        physical_E = self.physical_E if physical_E is None else physical_E
        return physical_E // (self.config.num_experts // ep_size)

    def routes_for_dispatch(self, indices_KS: torch.Tensor, counts_E: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """The routes in physical ids (where the weights live) instead of logical expert ids."""
        return to_physical(indices_KS, self.physical_E), counts_to_physical(counts_E, self.physical_E)

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, input: torch.Tensor, used_token: torch.Tensor | None = None, sparse_routes: bool = False,
                use_tutel: bool = False):  # noqa: A002 (DeepSpeed's argument name)
        if not sparse_routes:
            raise RuntimeError(f"{type(self).__name__} implements only the sparse-route gate contract of DeepSpeed "
                               ">= 0.19.4 (MOELayer passes sparse_routes=True); this DeepSpeed asked for dense "
                               "combine weights: install the pinned deepspeed==0.19.8")
        cfg = self.config
        x_SD = input.reshape(-1, input.shape[-1])
        num_tokens = x_SD.shape[0]
        inputs = self._take_inputs(num_tokens, x_SD.device)
        valid_S = inputs.valid_S.bool()
        if used_token is not None:
            valid_S = valid_S & used_token.reshape(-1).bool()

        logits_SE = F.linear(x_SD.float(), self.wg.weight.float())
        probs_SE = self.routing_probs(logits_SE, inputs)
        top_idx_SK = self.select(probs_SE, inputs, valid_S)
        slotless = self.slotless
        if slotless:
            counts_E = route_counts(top_idx_SK, valid_S, cfg.num_experts)
            location_KS = torch.zeros(top_idx_SK.shape[::-1], dtype=torch.int64, device=top_idx_SK.device)
        else:
            location_KS, counts_E = assign_slots(top_idx_SK, valid_S, cfg.num_experts)
        capacity = self._capacity(num_tokens, counts_E, valid_S, slotless)
        routes = finalize_routes(probs_SE, top_idx_SK, valid_S, location_KS, counts_E, capacity,
                                 normalize=cfg.normalize_topk)

        self._record_load(routes, inputs.labels_S, valid_S)
        indices_KS, counts_E = self.routes_for_dispatch(routes.indices_KS, routes.counts_E.detach())
        if self.on_routes is not None:
            self.on_routes(indices_KS)
        l_aux, named = self.aux_losses(probs_SE, routes, inputs, valid_S)
        self.defer_stats(routes, inputs, valid_S, named, capacity)
        self.last_capacity = capacity
        # capacity: a Python int where it is known on the host (DeepSpeed's MOELayer reads it with int(), which
        # costs a device tensor a host sync); dropless, the group's all-reduced maximum, read once in `_capacity`
        return l_aux, capacity, cfg.num_experts, indices_KS, routes.locations_KS, routes.gates_KS, counts_E

    def _capacity(self, num_tokens: int, counts_E: torch.Tensor, valid_S: torch.Tensor,
                  slotless: bool) -> int | torch.Tensor:
        """Slots per expert: from the token count when dropping (no host read unless the gate's routes per token
        vary, as LTDR's do), else the largest expert load agreed over the EP group (one all-reduce and one read,
        as DeepSpeed's gates do); rank_once without dropping needs none (1)."""
        cfg = self.config
        if self.drop_tokens:
            cf = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
            if self.variable_routes:  # sized from the routes actually requested, so extra routes get room too
                routes_per_token = int(counts_E.sum()) / max(1, int(valid_S.sum()))
            else:
                routes_per_token = cfg.k
            return capacity_for(num_tokens, cfg.num_experts, max(routes_per_token, 1e-9), cf, cfg.min_capacity)
        if slotless:
            return 1  # no padded buffer, no common capacity: no all-reduce, no host read
        # the all-to-all moves [experts, capacity, hidden] blocks: every EP rank needs one capacity
        local_max = counts_E.max() if counts_E.numel() else counts_E.new_zeros(())
        return int(distributed.group_max_(local_max.clamp_min(1), self.ep_group))

    @torch.no_grad()
    def _record_load(self, routes: SparseRoutes, labels_S: torch.Tensor, valid_S: torch.Tensor) -> None:
        """Add this forward's load per (hard modality, expert) to the bins' pending load (applied once per optimizer
        step by `ds_smoes.moe.updates`).  Not in evaluation, not once the bins are fixed, and not when this forward
        is a recomputation inside the backward (activation checkpointing), whose load was recorded already."""
        if not self.training or self.binning.frozen or in_backward():
            return
        onehot_SM = hard_scores(labels_S) * valid_S.float().unsqueeze(-1)
        self.binning.record(onehot_SM.T @ routes.selected_SE.float())

    @torch.no_grad()
    def _stats(self, routes: SparseRoutes, inputs: RoutingInputs, valid_S: torch.Tensor, named: dict,
               capacity: int | torch.Tensor, bin_E: torch.Tensor, physical_E: torch.Tensor) -> RoutingStats:
        ep_rank, ep_size = self.ep_world()
        cfg = self.config
        physical_rank_E = self.physical_rank_of_expert(ep_size, physical_E)
        bin_rank_E = rank_of_bin_placed_expert(bin_E, cfg.num_bins, ep_size).to(physical_rank_E.device)
        comm_physical = routing_comm_stats(routes.indices_KS, physical_rank_E, ep_rank, valid_S, ep_size)
        # both layouts, always: asking whether they are one (torch.equal) would read back to the host
        comm_binned = routing_comm_stats(routes.indices_KS, bin_rank_E, ep_rank, valid_S, ep_size)
        return RoutingStats(
            load_ME=expert_modality_load(routes.indices_KS, inputs.labels_S, valid_S, cfg.num_experts),
            losses={k: v.detach() for k, v in named.items()}, capacity=capacity, num_dropped=routes.dropped,
            num_tokens=valid_S.sum(),
            comm_physical=comm_physical, comm_binned=comm_binned,
            bin_E=bin_E)


class SMoESGate(ModalityGate):
    """SMoES: global top-k routing, bins, inter-bin MI (or the KL ablation) and bin balance."""

    def aux_losses(self, probs_SE, routes, inputs, valid_S):
        cfg = self.config
        bin_E = self.binning.bin_E
        # the fused forms: same values and gradients as ds_smoes.core.losses, one autograd node each
        l_bal = fused_losses.bin_balance_loss(probs_SE, routes.selected_SE, bin_E, valid_S, num_bins=cfg.num_bins)
        if cfg.bin_objective == "mi":
            l_mi = fused_losses.mutual_information_loss(probs_SE, inputs.modality_SM, bin_E, inputs.sample_id_S,
                                                        valid_S, num_bins=cfg.num_bins)
            return cfg.alpha_bal * l_bal + cfg.alpha_mi * l_mi, {"bin_balance": l_bal, "mi": -l_mi}
        l_kl, kl = bin_kl_band_loss(probs_SE, inputs.modality_SM, bin_E, inputs.sample_id_S, cfg.kl_low,
                                    cfg.kl_high, valid_S, num_bins=cfg.num_bins)
        return cfg.alpha_bal * l_bal + cfg.alpha_kl * l_kl, {"bin_balance": l_bal, "kl_band": l_kl, "bin_kl": kl}
