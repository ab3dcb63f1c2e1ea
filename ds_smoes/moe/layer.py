"""SMoESMoE: DeepSpeed's MoE layer with a modality-aware gate and the batch's modality scores.

The gate is `SMoESGate` unless `config.gate` names a baseline (ds_smoes.moe.baselines).

Drop-in for `deepspeed.moe.layer.MoE`: same constructor arguments where they overlap, same
`(output, l_aux, exp_counts)` return, plus keyword inputs carrying modality information:

    out, l_aux, counts = moe(x_BTD, used_token_BT,
                             modality_labels=labels_BT,       # 0 text, 1 vision (always needed)
                             modality_scores=scores_BTM)      # needed for score_type="attention"

The layer owns the Gaussian statistics (score_type="gaussian"), the gate owns the bins; both
are buffers, so `state_dict()` and DeepSpeed checkpoints carry them.

Inputs are checked at the entry.  Shapes and dtypes always (tensor metadata: no device sync): each
per-token argument has hidden_states' leading shape, or is flat with one entry per token.  Values
(labels in {0, 1}, sample ids in [0, S), finite hidden states and scores, at least one valid token)
only with `config.validate_inputs`, a debug option: reading a verdict back costs one device-to-host
sync per call, which the default training step does not pay.  (Sample ids at or past the token count
are refused in any case, by the per-sample losses, which read the largest id anyway.)  An input of
0 tokens is not an error without that option: it takes the ordinary path (so an expert-parallel rank
with no tokens still joins its group's collectives) and returns an empty output with l_aux 0.

The expert-parallel dispatch is a component chosen at construction from `config.dispatch`
(`ds_smoes.moe.dispatchers`): DeepSpeed's stock capacity-padded all-to-all, or the dropless
token-once-per-rank dispatch, whose recognised experts run as one grouped matmul per projection on weights laid
out stacked at construction.

A forward keeps nothing on the layer.  The routing statistics of a call (`RoutingStats`) and what its dispatch
sent to other EP ranks go to the `RoutingCollector` the caller opened over the layer (`ds_smoes.moe.collector`),
if any; without one, no statistics are computed, and in evaluation no auxiliary loss either (l_aux is 0).
"""
from __future__ import annotations

import torch
from deepspeed.moe.layer import MoE
from torch import nn

from ds_smoes.core.config import SMoESConfig
from ds_smoes.moe.bin_placement import BinPlacement
from ds_smoes.moe.collector import MoECall
from ds_smoes.moe.dispatchers import build_dispatcher
from ds_smoes.moe.gate import ModalityGate, RoutingInputs
from ds_smoes.moe.modality import modality_scores
from ds_smoes.moe.registry import build_gate
from ds_smoes.core.step_state import in_backward
from ds_smoes.core.scores import GaussianModalityStats, hard_scores
from ds_smoes.core.validation import check_input_shapes, check_input_values


class SMoESMoE(BinPlacement, MoE):
    """A `deepspeed.moe.layer.MoE` whose gate is chosen by `config.gate` (default `SMoESGate`)."""

    def __init__(self, hidden_size: int, expert: nn.Module, config: SMoESConfig, use_residual: bool = False) -> None:
        super().__init__(hidden_size, expert, num_experts=config.num_experts, ep_size=config.ep_size, k=config.k,
                         capacity_factor=config.capacity_factor, eval_capacity_factor=config.eval_capacity_factor,
                         min_capacity=config.min_capacity, use_residual=use_residual, noisy_gate_policy=None,
                         drop_tokens=config.drop_tokens, use_rts=False)
        self.config = config
        self.dispatcher = build_dispatcher(config.dispatch)
        self.dispatcher.prepare(self)
        # Replace the stock TopKGate before DeepSpeed sets process groups (`_set_ep_group` reaches the new gate).
        self.deepspeed_moe.gate = build_gate(hidden_size, config)
        self.scorer = (GaussianModalityStats(hidden_size, beta=config.ema_beta, tau=config.gaussian_tau,
                                             var_floor=config.gaussian_var_floor)
                       if config.score_type == "gaussian" else None)
        # the RoutingCollector open over this layer (ds_smoes.moe.collector), set and cleared by the caller's `with`
        self.routing_collector = None
        self._placed: bool | None = None  # experts on their bins' ranks, once the bins are frozen (host-side)

    def _apply(self, fn, recurse=True):
        """`.to()`, `.cuda()`, `.bfloat16()`... give every parameter a tensor of its own; lay the experts out
        stacked again when they were before (DeepSpeed moves and casts the model before it builds its
        optimizer).  Experts that were not stacked are left alone (a ZeRO flat buffer may hold them)."""
        dispatcher = getattr(self, "dispatcher", None)  # None while DeepSpeed's constructor runs
        experts = self.deepspeed_moe.experts.deepspeed_experts if dispatcher is not None else None
        restack = dispatcher is not None and dispatcher.keeps_stacked(experts)
        out = super()._apply(fn, recurse)
        if restack and not dispatcher.keeps_stacked(experts):
            dispatcher.prepare(self)
        return out

    @property
    def gate(self) -> ModalityGate:
        return self.deepspeed_moe.gate

    def computes_losses(self) -> bool:
        """Whether a forward now computes the gate's auxiliary losses (and so needs the soft modality scores): in
        training, or for a RoutingCollector that asks (`losses=True`).  An inference forward does not."""
        collector = self.routing_collector
        return self.training or (collector is not None and collector.losses)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """DeepSpeed's process groups for this layer (deepspeed.initialize calls it), then the dispatcher's check
        that it can serve them (rank_once refuses a tensor-parallel group)."""
        super().set_deepspeed_parallelism(use_data_before_expert_parallel_)
        self.dispatcher.check_parallelism()

    # -- placement (ds_smoes/core/placement.py) ---------------------------------------------------
    def _placement_ep_size(self) -> int:
        return self.deepspeed_moe.ep_size

    def _placement_experts(self):
        moe = self.deepspeed_moe
        if moe.ep_size > 1 and moe.ep_group is None:
            raise RuntimeError("place_experts needs the expert-parallel group: build the engine first")
        return moe.experts.deepspeed_experts, moe.ep_group if moe.ep_size > 1 else None

    def modality_scores(self, x_SD: torch.Tensor, labels_S: torch.Tensor, valid_S: torch.Tensor,
                        given_SM: torch.Tensor | None) -> torch.Tensor:
        """The score the config asks for, detached, [S, 2] (`ds_smoes.moe.modality.modality_scores`)."""
        return modality_scores(self.config, self.scorer, self.training, x_SD, labels_S, valid_S, given_SM)

    def forward(self, hidden_states: torch.Tensor, used_token: torch.Tensor | None = None, *,
                modality_labels: torch.Tensor | None = None, modality_scores: torch.Tensor | None = None,
                sample_ids: torch.Tensor | None = None):
        if modality_labels is None:
            raise ValueError("SMoESMoE needs modality_labels (0 text, 1 vision per token, same leading shape as "
                             "hidden_states)")
        check_input_shapes(hidden_states, self.gate.wg.weight.shape[1], modality_labels=modality_labels,
                           used_token=used_token, sample_ids=sample_ids, modality_scores=modality_scores)
        d = hidden_states.shape[-1]
        x_SD = hidden_states.reshape(-1, d)
        num_tokens = x_SD.shape[0]
        labels_S = modality_labels.reshape(-1).long()
        valid_S = (used_token.reshape(-1).bool() if used_token is not None
                   else torch.ones(num_tokens, dtype=torch.bool, device=x_SD.device))
        if sample_ids is not None:
            sample_id_S = sample_ids.reshape(-1).long()
        elif hidden_states.dim() == 3:
            sample_id_S = torch.arange(hidden_states.shape[0], device=x_SD.device).repeat_interleave(
                hidden_states.shape[1])
        else:
            sample_id_S = torch.zeros(num_tokens, dtype=torch.long, device=x_SD.device)
        if self.config.validate_inputs:  # one device-to-host sync: debug runs only
            check_input_values(x_SD, labels_S, valid_S, sample_id_S if sample_ids is not None else None,
                               modality_scores.reshape(-1, 2) if modality_scores is not None else None)
        collector = self.routing_collector if not in_backward() else None   # a recomputation is collected once
        want_losses = self.computes_losses()
        # the modality scores feed the losses only (routing reads the labels and the bins): without losses, the
        # hard ones stand in, so an inference forward computes no Gaussian score
        scores_SM = (self.modality_scores(x_SD, labels_S, valid_S, modality_scores) if want_losses
                     else hard_scores(labels_S))
        gate = self.gate
        routed = gate.route(x_SD, RoutingInputs(scores_SM, labels_S, sample_id_S, valid_S))
        plan = self.dispatcher.plan(self, routed)     # rank_once: its count exchange overlaps the losses
        l_aux, named = gate.losses(routed) if want_losses else (gate.no_losses(), {})
        sent = self.dispatcher.forward(self, x_SD, routed, plan)
        if collector is not None:
            stats = gate.stats(routed, named) if collector.stats else None
            collector.add(self, MoECall(stats, sent.remote_bytes, sent.comm,
                                        routed if collector.routes else None))
        output = sent.out_SD.reshape(hidden_states.shape)
        if self.use_residual:  # Residual MoE: a learned per-token mix of the MoE output and a dense MLP
            mlp_out = self.mlp(hidden_states)
            mlp_out = mlp_out[0] if isinstance(mlp_out, tuple) else mlp_out
            coef = torch.softmax(self.coefficient(hidden_states), dim=-1)
            output = output * coef[..., 0:1] + mlp_out * coef[..., 1:]
        return output, l_aux, routed.counts_E
