"""Modality-aware gates on DeepSpeed's TopKGate, and SMoESGate.

A gate is the layer's router.  One call, `route(x_SD, inputs)`, takes the tokens and their modality
side-information as arguments and returns a `Routed`: the sparse routes (logical and physical expert ids),
their weights, the capacity and what the losses and statistics need.  `losses(routed)` and
`stats(routed, named)` are separate calls, made only when the caller wants them (training asks for the
losses; statistics only when a `ds_smoes.moe.collector.RoutingCollector` asks), so the dispatch can start
its own exchange between routing and losses, and an evaluation pays for neither.  Nothing of a call is kept
on the module: the only state is persistent (bins, placement), updated once per optimizer step.

`ModalityGate.forward` is DeepSpeed 0.19.8's sparse-route contract (`MOELayer` calls
`gate(x_SD, used_token, True, use_tutel)` and unpacks
`(l_aux, capacity, num_experts, indices_KS, locations_KS, gates_KS, exp_counts)`) for any k >= 1 and for a
per-token number of experts (unused routes carry index -1), with the modality inputs as the keyword `inputs`.

A gate subclass says three things: `routing_probs` (which experts a token may use), `select` (which it uses)
and `aux_losses`.  `SMoESGate`: global softmax, global top-k (the paper's routing); `l_aux` carries
alpha_bal * L_bal + alpha_MI * L_MI, so a training loop that already adds DeepSpeed's `l_aux` to its loss needs
no change.  The baselines live in `ds_smoes.moe.baselines`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from deepspeed.moe.sharded_moe import TopKGate

from ds_smoes.parallel import distributed
from ds_smoes.core.binning import ExpertBinning, rank_of_bin_placed_expert
from ds_smoes.core.config import SMoESConfig
from ds_smoes.core import fused_losses
from ds_smoes.core.losses import bin_kl_band_loss
from ds_smoes.core.metrics import expert_modality_load, routing_comm_stats
from ds_smoes.core.placement import counts_to_physical, to_physical
from ds_smoes.core.routing import (SparseRoutes, assign_slots, bin_limited_topk, capacity_for, finalize_routes,
                                   route_counts)
from ds_smoes.core.step_state import in_backward
from ds_smoes.core.scores import hard_scores
from ds_smoes.moe.dispatchers import DISPATCHERS


@dataclass
class RoutingInputs:
    """Per-token side information for one gate call (S tokens, M = 2 modalities)."""
    modality_SM: torch.Tensor   # soft modality scores, rows sum to 1, detached
    labels_S: torch.Tensor      # hard labels: 0 text, 1 vision
    sample_id_S: torch.Tensor   # which sample each token belongs to (for the per-sample MI)
    valid_S: torch.Tensor       # False for padding

    def on(self, num_tokens: int, device: torch.device) -> RoutingInputs:
        """These inputs on `device`, checked against the call's token count."""
        if self.modality_SM.shape != (num_tokens, 2):
            raise ValueError(f"modality scores have shape {tuple(self.modality_SM.shape)}, "
                             f"expected ({num_tokens}, 2) for {num_tokens} tokens")
        return RoutingInputs(*(t.to(device) for t in (self.modality_SM, self.labels_S, self.sample_id_S,
                                                       self.valid_S)))


@dataclass
class Routed:
    """What one router call decided.  `routes` in logical expert ids (what the losses and statistics read);
    `indices_KS` / `counts_E` the same routes in physical ids (where the weights live: what the dispatch reads)."""
    routes: SparseRoutes
    indices_KS: torch.Tensor
    counts_E: torch.Tensor
    capacity: int | torch.Tensor     # an int; the `topk` baseline's is DeepSpeed's own 0-dim tensor
    num_experts: int
    probs_SE: torch.Tensor
    inputs: RoutingInputs
    valid_S: torch.Tensor
    # losses a gate computed together with its routes (DeepSpeed's own top-k gate): `losses` returns them
    computed_losses: tuple[torch.Tensor, dict] | None = field(default=None, repr=False)

    @property
    def gates_KS(self) -> torch.Tensor:
        return self.routes.gates_KS

    @property
    def locations_KS(self) -> torch.Tensor:
        return self.routes.locations_KS


@dataclass
class RoutingStats:
    """What one gate call decided, detached, on the device, for logging and metrics."""
    load_ME: torch.Tensor            # tokens per (hard modality, expert), this rank
    losses: dict                     # the gate's named auxiliary losses and diagnostics, detached ({} when not computed)
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
        # whether routes need no slots in a padded buffer and the EP ranks no common capacity: the rule of the
        # dispatcher the config names (`ds_smoes.moe.dispatchers`), fixed at construction
        self.slotless = DISPATCHERS[config.dispatch].slotless(config.drop_tokens)

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

    # -- placement -------------------------------------------------------------------------------
    def ep_world(self) -> tuple[int, int]:
        """(this rank's index in the expert-parallel group, the group's size)."""
        if self.ep_group is None or not distributed.is_distributed():
            return 0, 1
        return distributed.group_rank(self.ep_group), torch.distributed.get_world_size(self.ep_group)

    def physical_rank_of_expert(self, ep_size: int) -> torch.Tensor:
        """EP rank holding each logical expert: DeepSpeed puts physical experts [r * E/ep, (r+1) * E/ep) on rank r."""
        return self.physical_E // (self.config.num_experts // ep_size)

    def routes_for_dispatch(self, indices_KS: torch.Tensor, counts_E: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """The routes in physical ids (where the weights live) instead of logical expert ids."""
        return to_physical(indices_KS, self.physical_E), counts_to_physical(counts_E, self.physical_E)

    # -- the calls ---------------------------------------------------------------------------------
    def route(self, x_SD: torch.Tensor, inputs: RoutingInputs, used_token: torch.Tensor | None = None) -> Routed:
        """Route `x_SD` [S, D] with the batch's modality `inputs`; records the load for the bins in training."""
        cfg = self.config
        num_tokens = x_SD.shape[0]
        inputs = inputs.on(num_tokens, x_SD.device)
        valid_S = inputs.valid_S.bool()
        if used_token is not None:
            valid_S = valid_S & used_token.reshape(-1).bool()

        logits_SE = F.linear(x_SD.float(), self.wg.weight.float())
        probs_SE = self.routing_probs(logits_SE, inputs)
        top_idx_SK = self.select(probs_SE, inputs, valid_S)
        if self.slotless:
            counts_E = route_counts(top_idx_SK, valid_S, cfg.num_experts)
            location_KS = torch.zeros(top_idx_SK.shape[::-1], dtype=torch.int64, device=top_idx_SK.device)
        else:
            location_KS, counts_E = assign_slots(top_idx_SK, valid_S, cfg.num_experts)
        capacity = self._capacity(num_tokens, counts_E, valid_S)
        routes = finalize_routes(probs_SE, top_idx_SK, valid_S, location_KS, counts_E, capacity,
                                 normalize=cfg.normalize_topk)
        self._record_load(routes, inputs.labels_S, valid_S)
        indices_KS, counts_E = self.routes_for_dispatch(routes.indices_KS, routes.counts_E.detach())
        # capacity: a Python int where it is known on the host (DeepSpeed's MOELayer reads it with int(), which
        # costs a device tensor a host sync); dropless, the group's all-reduced maximum, read once in `_capacity`
        return Routed(routes, indices_KS, counts_E, capacity, cfg.num_experts, probs_SE, inputs, valid_S)

    def losses(self, routed: Routed) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(l_aux, the named losses and diagnostics) of one call; l_aux is 0 for a call without valid tokens."""
        if routed.computed_losses is not None:
            return routed.computed_losses
        return self.aux_losses(routed.probs_SE, routed.routes, routed.inputs, routed.valid_S)

    def no_losses(self) -> torch.Tensor:
        """The l_aux of a call whose losses nobody asked for (evaluation): 0, on the router's device."""
        return self.wg.weight.new_zeros(())

    @torch.no_grad()
    def stats(self, routed: Routed, named: dict) -> RoutingStats:
        """The call's statistics as device tensors (no host read)."""
        ep_rank, ep_size = self.ep_world()
        cfg = self.config
        routes, valid_S = routed.routes, routed.valid_S
        physical_rank_E = self.physical_rank_of_expert(ep_size)
        bin_E = self.binning.bin_E.clone()
        bin_rank_E = rank_of_bin_placed_expert(bin_E, cfg.num_bins, ep_size).to(physical_rank_E.device)
        comm_physical = routing_comm_stats(routes.indices_KS, physical_rank_E, ep_rank, valid_S, ep_size)
        # both layouts, always: asking whether they are one (torch.equal) would read back to the host
        comm_binned = routing_comm_stats(routes.indices_KS, bin_rank_E, ep_rank, valid_S, ep_size)
        return RoutingStats(
            load_ME=expert_modality_load(routes.indices_KS, routed.inputs.labels_S, valid_S, cfg.num_experts),
            losses={k: v.detach() for k, v in named.items()}, capacity=routed.capacity, num_dropped=routes.dropped,
            num_tokens=valid_S.sum(), comm_physical=comm_physical, comm_binned=comm_binned, bin_E=bin_E)

    def forward(self, input: torch.Tensor, used_token: torch.Tensor | None = None, sparse_routes: bool = False,
                use_tutel: bool = False, *, inputs: RoutingInputs | None = None):  # noqa: A002 (DeepSpeed's argument name)
        """DeepSpeed's sparse-route gate contract, with the modality `inputs` as a keyword argument."""
        if not sparse_routes:
            raise RuntimeError(f"{type(self).__name__} implements only the sparse-route gate contract of DeepSpeed "
                               ">= 0.19.4 (MOELayer passes sparse_routes=True); this DeepSpeed asked for dense "
                               "combine weights: install the pinned deepspeed==0.19.8")
        if inputs is None:
            raise RuntimeError(f"{type(self).__name__} got no modality information for this batch: call it through "
                               "ds_smoes.moe.layer.SMoESMoE, or pass inputs=RoutingInputs(...) to the gate")
        routed = self.route(input.reshape(-1, input.shape[-1]), inputs, used_token)
        l_aux, _ = self.losses(routed)
        return (l_aux, routed.capacity, routed.num_experts, routed.indices_KS, routed.locations_KS, routed.gates_KS,
                routed.counts_E)

    def _capacity(self, num_tokens: int, counts_E: torch.Tensor, valid_S: torch.Tensor) -> int | torch.Tensor:
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
        if self.slotless:
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
