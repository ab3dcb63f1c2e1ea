"""`topk`: DeepSpeed's own TopKGate, routing untouched (the "no specialisation" reference).

DeepSpeed's top-1 gate uses Random Token Selection and the padding mask; its top-2 gate samples
the second expert with Gumbel noise; both add the GShard load-balancing loss.  This class runs
that code as it is and only records the same statistics as the other gates.  Two settings:
the GShard loss is scaled by `alpha_bal` like every other balance loss here, and the 2nd-expert
sampling (DeepSpeed's default, on) is used in training only: DeepSpeed 0.19.8 also samples in
eval mode, which would make every evaluation of this baseline random.
"""
from __future__ import annotations

import torch
from deepspeed.moe.sharded_moe import TopKGate

from ds_smoes.core.config import SMoESConfig
from ds_smoes.moe.gate import ModalityGate, Routed, RoutingInputs
from ds_smoes.core.metrics import routes_per_column
from ds_smoes.core.routing import SparseRoutes


class DeepSpeedTopKGate(ModalityGate):
    def __init__(self, model_dim: int, config: SMoESConfig, ep_group=None) -> None:
        super().__init__(model_dim, config, ep_group)
        self.use_rts = True  # DeepSpeed's default for its top-1 gate

    def route(self, x_SD: torch.Tensor, inputs: RoutingInputs, used_token: torch.Tensor | None = None) -> Routed:
        inputs = inputs.on(x_SD.shape[0], x_SD.device)
        valid_S = inputs.valid_S.bool()
        if used_token is not None:
            valid_S = valid_S & used_token.reshape(-1).bool()
        # DeepSpeed's routing, unmodified (it honours the padding mask for k = 1 only).  The mask goes
        # in as int64: a float mask makes 0.19.8's dropless top-1 path hand a float capacity to
        # torch.topk, which raises.
        configured, group = self.top2_2nd_expert_sampling, self.ep_group
        self.top2_2nd_expert_sampling = configured and self.training
        if self.slotless:
            # each rank's own capacity will do, so DeepSpeed's dropless all-reduce of it across the EP
            # group (one blocking collective per layer) is left out, as in ModalityGate.route
            self.ep_group = None
        try:
            out = TopKGate.forward(self, x_SD, valid_S.long(), True, False)
        finally:
            self.top2_2nd_expert_sampling, self.ep_group = configured, group
        l_aux, capacity, num_experts, idx_KS, loc_KS, gates_KS, counts_E = out
        if x_SD.shape[0] == 0:  # DeepSpeed's loss is a mean over no token (NaN); no token, no loss, as in SMoES
            l_aux = self.wg.weight.sum() * 0.0
        selected_SE = routes_per_column(idx_KS, valid_S, num_experts) > 0  # valid tokens' dispatched routes
        routes = SparseRoutes(idx_KS, loc_KS, gates_KS, counts_E.to(torch.int64), selected_SE)
        phys_KS, phys_counts_E = self.routes_for_dispatch(idx_KS, counts_E)
        # DeepSpeed computes its loss with the routes: handed to `losses` as computed
        return Routed(routes, phys_KS, phys_counts_E, capacity, num_experts, probs_SE=None, inputs=inputs,
                      valid_S=valid_S, computed_losses=(self.config.alpha_bal * l_aux, {"gshard_balance": l_aux}))
