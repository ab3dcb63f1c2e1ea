"""SMoES on DeepSpeed's AutoEP: the layer `deepspeed.initialize` builds from a Hugging Face MoE block, routed by a
ds-smoes gate.

DeepSpeed 0.19.8's AutoEP (the `expert_parallel` section of a DeepSpeed config) replaces each MoE block of a
Hugging Face model with an `AutoEPMoELayer`: a `TokenChoiceTopKRouter`, this rank's experts stacked in a
`GroupedExperts` (w1, w2, w3: [n, ...]) and a dispatch that sends one row per (token, expert) pair through an
all-to-all with split sizes.  `SMoESAutoEPLayer.adopt(layer, config, context)` turns such a layer, in place and
after `deepspeed.initialize`, into one whose router is the gate `config.gate` names (SMoES by default; top-k, hard,
LTDR... as on the legacy path) and whose dispatch is `config.dispatch`:

    "deepspeed"   AutoEP's own dispatch: one row per (token, expert) pair, dropless (`AutoEPPairDispatcher`)
    "rank_once"   one row per (token, destination rank), as on the legacy path (`ds_smoes.parallel.dispatch`), the
                  experts run by AutoEP's GroupedExperts (`AutoEPRankOnceDispatcher`)

What adoption keeps: every parameter (the optimizer DeepSpeed built holds them: the gate's router weight IS AutoEP's
`router.gate.weight`), the module names, AutoEP's expert layout and checkpoint metadata, the shared experts and the
output contract (`_finalize_output`).  What it adds: the gate (bins, `physical_E`), the Gaussian statistics, as
buffers, so DeepSpeed's checkpoint carries them; the modality inputs come from `context` (the Hugging Face path's
`ModalityContext`: `require(leading_shape)` gives labels, padding and attention scores, `aux_losses` takes l_aux).

Placement: when adaptive bins freeze, `place_experts` moves every expert's rows of the stacked weights (and their
optimizer state) onto its bin's rank (`ds_smoes.parallel.migration.StackedExperts`); the gate routes to physical
slots.  DeepSpeed saves and loads AutoEP experts by physical slot, so a checkpoint round trip keeps the two together.

Shapes: S tokens (B * T), D hidden, K routes per token, E experts, n = E / ep_size local experts, Q pairs.
"""
from __future__ import annotations

import torch
from deepspeed.module_inject.auto_ep_comm import COMM_BACKEND
from deepspeed.module_inject.auto_ep_layer import (AutoEPMoELayer, _AllToAllV, compute_split_plan,
                                                   permute_by_local_expert, unpermute_by_local_expert)

from ds_smoes.core.config import SMoESConfig, validate
from ds_smoes.core.errors import ConfigError
from ds_smoes.core.scores import GaussianModalityStats, hard_scores
from ds_smoes.core.step_state import in_backward
from ds_smoes.moe.bin_placement import BinPlacement
from ds_smoes.moe.collector import MoECall
from ds_smoes.moe.dispatchers import Dispatched
from ds_smoes.moe.gate import ModalityGate, RoutingInputs
from ds_smoes.moe.modality import modality_scores
from ds_smoes.moe.registry import build_gate
from ds_smoes.parallel.dispatch import (CommVolume, ExpertRunner, plan_rank_once, rank_hits,
                                        rank_once_dispatch, rank_once_volume, route_ranks, token_rank_stats)
from ds_smoes.parallel.migration import StackedExperts

def check_adoptable(layer: AutoEPMoELayer) -> None:
    """Refuse, with what to change, an AutoEP layer whose routing or dispatch a ds-smoes gate cannot stand in for."""
    if not isinstance(layer, AutoEPMoELayer):
        raise ConfigError(f"{type(layer).__name__} is not a DeepSpeed AutoEPMoELayer")
    router = layer.router
    problems = []
    if router.score_func != "softmax":
        problems.append(f"router score_func={router.score_func!r} (the ds-smoes gates are a softmax)")
    if router.num_expert_groups is not None:
        problems.append("node-limited routing (num_expert_groups)")
    if float(router.route_scale) != 1.0:
        problems.append(f"route_scale={router.route_scale}")
    if router.e_score_correction_bias is not None or router.gate.bias is not None:
        problems.append("a router bias (gate bias or e_score_correction_bias)")
    if layer.expert_bias is not None:
        problems.append("load_balance_coeff (AutoEP's bias balancing; the SMoES bin-balance loss replaces it): "
                        "remove it from expert_parallel")
    if layer.score_apply != "post":
        problems.append(f"score_apply={layer.score_apply!r} (weights applied before the experts): use 'post'")
    if layer.comm_backend != COMM_BACKEND:
        problems.append(f"comm_backend={layer.comm_backend!r}: use {COMM_BACKEND!r}")
    if layer.folding_group_handles is not None and layer.folding_group_handles.spec.tp_size > 1:
        problems.append("folded tensor parallelism (tensor_parallel.autotp_size > 1)")
    if problems:
        raise ConfigError(f"cannot put a ds-smoes gate on this AutoEP layer ({layer.model_family}): "
                          + "; ".join(problems))


def smoes_config_for_autoep(layer: AutoEPMoELayer, smoes: SMoESConfig) -> SMoESConfig:
    """`smoes` with the routing fields the AutoEP layer dictates (experts, top-k, renormalised weights) and its
    ep_size; a field set explicitly to another value is an error, as is capacity-limited routing (AutoEP is
    dropless)."""
    model = {"num_experts": layer.num_experts, "k": layer.top_k, "normalize_topk": bool(layer.router.route_norm)}
    data = smoes.model_dump()
    for name, value in model.items():
        if name in smoes.model_fields_set and data[name] != value:
            raise ConfigError(f"smoes.{name}={data[name]} but the AutoEP layers have {name}={value}: remove smoes."
                              f"{name} (it is taken from the model) or set it to {value}")
        data[name] = value
    if "ep_size" in smoes.model_fields_set and smoes.ep_size != layer.ep_size:
        raise ConfigError(f"smoes.ep_size={smoes.ep_size} but expert_parallel.autoep_size={layer.ep_size}: "
                          "remove smoes.ep_size (AutoEP's is used) or make them equal")
    data["ep_size"] = layer.ep_size
    if smoes.drop_tokens:
        raise ConfigError("smoes.drop_tokens=true: AutoEP's dispatch is dropless; set smoes.drop_tokens=false")
    return validate(SMoESConfig, data, source="smoes config for the AutoEP layers")


# -- dispatchers ------------------------------------------------------------------------------------
class AutoEPPairDispatcher:
    """AutoEP's own dispatch with the gate's routes: one row per (token, physical expert) pair to the expert's
    rank (AutoEP's split plan and all-to-all), the experts as AutoEP runs them, the weighted sum back home."""

    name = "deepspeed"
    has_stock_counterfactual = False   # it is the stock dispatch of this path (the legacy one's buffer is not)
    capacity_padded = False

    def plan(self, layer: SMoESAutoEPLayer, routed) -> None:
        return None

    def forward(self, layer: SMoESAutoEPLayer, x_SD: torch.Tensor, routed, plan=None) -> Dispatched:
        num_tokens, hidden = x_SD.shape
        k, n, ep = routed.indices_KS.shape[0], layer.num_local_experts, layer.ep_size
        sel_SK = routed.indices_KS.T
        key_Q = torch.where(sel_SK >= 0, sel_SK.long(), routed.num_experts).reshape(-1)
        order_Q = torch.argsort(key_Q, stable=True)     # pairs by physical expert, unused routes last
        counts_E = routed.counts_E.to(torch.int32)
        if ep == 1:
            local_counts = counts_E
            used = int(counts_E.sum())                     # host read: the pairs to run (AutoEP reads them too)
            send = recv = [used]
        else:
            split = compute_split_plan(sel_SK, routed.num_experts, ep, n, layer.ep_group,
                                       num_tokens_per_expert=counts_E)   # one count exchange, one host read
            local_counts, send, recv = split.local_counts_by_source, split.input_splits, split.output_splits
            used = sum(send)
        order_Q = order_Q[:used]
        token_Q = torch.div(order_Q, k, rounding_mode="floor")
        rows_QD = x_SD.index_select(0, token_Q)
        if ep > 1:
            rows_QD = _AllToAllV.apply(layer.ep_group, rows_QD, send, recv)
        permuted, perm_idx, aligned, n_rows = permute_by_local_expert(rows_QD, local_counts)
        out_QD = unpermute_by_local_expert(layer.experts(permuted, aligned), perm_idx, n_rows)
        if ep > 1:
            out_QD = _AllToAllV.apply(layer.ep_group, out_QD, recv, send)
        weight_Q = routed.gates_KS.T.reshape(-1).index_select(0, order_Q).float()
        out_SD = x_SD.new_zeros((num_tokens, hidden), dtype=torch.float32).index_add_(
            0, token_Q, out_QD.float() * weight_Q.unsqueeze(1))
        home = layer.ep_rank if ep > 1 else 0
        row_bytes = hidden * x_SD.element_size()
        dispatch_b = sum(c for r, c in enumerate(send) if r != home) * row_bytes
        combine_b = sum(c for r, c in enumerate(recv) if r != home) * row_bytes
        indices_KS, valid_S = routed.indices_KS, routed.valid_S

        def comm(_stats) -> CommVolume:
            hits_SR = rank_hits(route_ranks(indices_KS, n), ep)
            rate, ranks, count = token_rank_stats(hits_SR, home, valid_S)
            return CommVolume("autoep", dispatch_b, combine_b, (ep - 1) * n * 4, rate, ranks, count)

        return Dispatched(out_SD.to(x_SD.dtype), dispatch_b + combine_b, comm)


class AutoEPRankOnceDispatcher:
    """The token-once-per-rank dispatch (`ds_smoes.parallel.dispatch`) with AutoEP's stacked experts."""

    name = "rank_once"
    has_stock_counterfactual = False   # the legacy path's capacity-padded buffer is no counterfactual here
    capacity_padded = False

    def plan(self, layer: SMoESAutoEPLayer, routed):
        return plan_rank_once(routed.indices_KS, layer.num_local_experts, layer.ep_group_or_none())

    def forward(self, layer: SMoESAutoEPLayer, x_SD: torch.Tensor, routed, plan) -> Dispatched:
        group = layer.ep_group_or_none()
        out_SD, volume = rank_once_dispatch(x_SD, routed.indices_KS, routed.gates_KS, layer.expert_runner(),
                                            routed.num_experts, group, routed.valid_S, plan)
        send, recv = plan.counts()
        home = layer.ep_rank if group is not None else 0
        dispatch_b, combine_b, _ = rank_once_volume(send, recv, home, x_SD.shape[1], x_SD.element_size(),
                                                    routed.indices_KS.shape[0])
        return Dispatched(out_SD, dispatch_b + combine_b, lambda _stats: volume())


AUTOEP_DISPATCHERS = {AutoEPPairDispatcher.name: AutoEPPairDispatcher,
                      AutoEPRankOnceDispatcher.name: AutoEPRankOnceDispatcher}


class SMoESAutoEPLayer(BinPlacement, AutoEPMoELayer):
    """An AutoEPMoELayer routed by a ds-smoes gate (`adopt` makes one from the layer DeepSpeed built)."""

    # set by `adopt` (the layer is DeepSpeed's, converted in place: its constructor does not run again)
    config: SMoESConfig
    dispatcher: AutoEPPairDispatcher | AutoEPRankOnceDispatcher

    @classmethod
    def adopt(cls, layer: AutoEPMoELayer, smoes: SMoESConfig, context=None) -> SMoESAutoEPLayer:
        """Turn `layer` (built by `deepspeed.initialize`, its EP group set) into an SMoESAutoEPLayer, in place.
        `smoes`: the ds-smoes config (routing fields are taken from the layer: `smoes_config_for_autoep`);
        `context`: where the modality inputs come from and l_aux goes (`ModalityContext`), settable later."""
        check_adoptable(layer)
        if layer.ep_size > 1 and layer.ep_group is None:
            raise RuntimeError("adopt the AutoEP layers after deepspeed.initialize (their EP group is not set yet)")
        config = smoes_config_for_autoep(layer, smoes)
        weight = layer.router.gate.weight
        gate = build_gate(layer.hidden_size, config)
        del gate.wg.weight
        gate.wg.weight = weight            # the router's weight itself: the optimizer DeepSpeed built holds it
        gate.to(weight.device)
        gate.slotless = True               # AutoEP's dispatches are dropless: no slots, no common capacity
        gate._set_ep_group(layer.ep_group if layer.ep_size > 1 else None)
        if isinstance(layer._modules.get("gate"), type(layer.router)):
            del layer._modules["gate"]     # AutoEP's alias of its router for transformers' logits recorder
        layer.__class__ = cls
        layer.config = config
        layer.smoes_gate = gate
        layer.scorer = (GaussianModalityStats(layer.hidden_size, beta=config.ema_beta, tau=config.gaussian_tau,
                                              var_floor=config.gaussian_var_floor).to(weight.device)
                        if config.score_type == "gaussian" else None)
        layer.dispatcher = AUTOEP_DISPATCHERS[config.dispatch]()
        layer.routing_context = context
        layer.routing_collector = None
        layer._placed = None
        return layer

    # -- what the rest of ds-smoes asks of an MoE layer ---------------------------------------------
    @property
    def gate(self) -> ModalityGate:
        return self.smoes_gate

    def ep_group_or_none(self):
        return self.ep_group if self.ep_size > 1 else None

    def computes_losses(self) -> bool:
        """In training, or for a RoutingCollector that asks (`losses=True`); an inference forward does not."""
        collector = self.routing_collector
        return self.training or (collector is not None and collector.losses)

    def expert_runner(self) -> ExpertRunner:
        """This rank's AutoEP experts as the rank_once dispatch runs them: rows grouped by expert, padded to
        AutoEP's alignment and back (`permute_by_local_expert`), through `GroupedExperts`."""
        def run(x_QD: torch.Tensor, sizes: list[int]) -> torch.Tensor:
            counts = torch.tensor(sizes, dtype=torch.int32, device=x_QD.device)
            permuted, perm_idx, aligned, n_rows = permute_by_local_expert(x_QD, counts)
            return unpermute_by_local_expert(self.experts(permuted, aligned), perm_idx, n_rows)

        return ExpertRunner(self.num_local_experts, run)

    # -- placement ------------------------------------------------------------------------------------
    def _placement_ep_size(self) -> int:
        return self.ep_size

    def _placement_experts(self):
        """AutoEP's stacked w1, w2, w3: every expert's rows move with their optimizer state."""
        return StackedExperts((self.experts.w1, self.experts.w2, self.experts.w3)), self.ep_group_or_none()

    # -- the forward -------------------------------------------------------------------------------------
    def _forward(self, hidden_states: torch.Tensor):
        if self.routing_context is None:
            raise RuntimeError("an SMoES AutoEP layer ran without modality information: call the model through "
                               "ds_smoes.hf.SMoESHFModel (or set layer.routing_context)")
        bsz, seqlen, hdim = hidden_states.shape
        batch = self.routing_context.require((bsz, seqlen))
        x_SD = hidden_states.reshape(-1, hdim)
        labels_S = batch.labels_BT.reshape(-1).long()
        valid_S = batch.valid_BT.reshape(-1).bool()
        sample_id_S = torch.arange(bsz, device=x_SD.device).repeat_interleave(seqlen)
        collector = self.routing_collector if not in_backward() else None
        want_losses = self.computes_losses()
        given_SM = batch.scores_BTM.reshape(-1, 2) if batch.scores_BTM is not None else None
        scores_SM = (modality_scores(self.config, self.scorer, self.training, x_SD, labels_S, valid_S, given_SM)
                     if want_losses else hard_scores(labels_S))
        gate = self.gate
        routed = gate.route(x_SD, RoutingInputs(scores_SM, labels_S, sample_id_S, valid_S))
        plan = self.dispatcher.plan(self, routed)
        l_aux, named = gate.losses(routed) if want_losses else (gate.no_losses(), {})
        sent = self.dispatcher.forward(self, x_SD, routed, plan)
        if collector is not None:
            stats = gate.stats(routed, named) if collector.stats else None
            collector.add(self, MoECall(stats, sent.remote_bytes, sent.comm, routed if collector.routes else None))
        with torch.no_grad():
            self.tokens_per_expert.add_(routed.counts_E.to(self.tokens_per_expert.dtype))
        self.routing_context.aux_losses.append(l_aux)
        output = sent.out_SD.reshape(bsz, seqlen, hdim)
        return self._finalize_output(output, x_SD, hidden_states, hdim)


def adopt_autoep_layers(model: torch.nn.Module, smoes: SMoESConfig, context=None) -> list[SMoESAutoEPLayer]:
    """Every AutoEP layer of `model` (after `deepspeed.initialize`), adopted in module order."""
    layers = [m for m in model.modules() if isinstance(m, AutoEPMoELayer)]
    if not layers:
        raise ConfigError("no AutoEP layer in the model: enable expert_parallel in the DeepSpeed config (and check "
                          "its preset_model / moe_layer_pattern match the model)")
    return [SMoESAutoEPLayer.adopt(layer, smoes, context) for layer in layers]
