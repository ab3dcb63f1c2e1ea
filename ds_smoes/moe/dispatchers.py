"""The expert-parallel dispatchers: how the MoE layer sends its tokens to the ranks of their experts and
combines what comes back.  One is chosen when the layer is built (`build_dispatcher`, from `config.dispatch`);
nothing else reads the dispatch's name.

    StockDispatcher     DeepSpeed's own `MOELayer.forward`: the capacity-padded [E, C, D] all-to-all, twice
    RankOnceDispatcher  `ds_smoes.parallel.dispatch`: a token goes once to every rank holding one of its experts,
                        dropless, its local experts run as one grouped matmul per projection

A dispatcher answers what the rest of the layer asks of it:

- `prepare(layer)` at construction (rank_once lays recognised experts out stacked) and `keeps_stacked(...)`
  when the layer is moved or cast;
- `slotless(drop_tokens)`: whether routes need slots in a padded buffer and the EP ranks a common capacity
  (the gate skips both, and their all-reduce, when not);
- `forward(layer, hidden_states, x_SD, valid_S)`: the layer's output, l_aux and expert counts, with what the
  call sent to other ranks left on the layer (`last_comm`, `last_remote_bytes`);
- `capacity_padded`: whether experts run on a capacity-padded buffer (the benchmarks' expert-work count);
- `has_stock_counterfactual`: whether the evaluation should also count what the stock dispatch would have sent
  for the same routes (it is the stock dispatch's own figure otherwise).

A DeepEP dispatcher (NVIDIA's expert-parallel kernels) would be a third class here with the same methods.
"""
from __future__ import annotations

from functools import partial

import torch
from deepspeed.moe.layer import MoE

from ds_smoes.core.errors import ConfigError
from ds_smoes.parallel.dispatch import (CommVolume, RankOncePlan, plan_rank_once, rank_once_dispatch, rank_once_volume,
                                        stock_alltoall_bytes, stock_volume)
from ds_smoes.parallel.grouped_experts import grouped_kind, is_view_stacked, stack_expert_params_


class StockDispatcher:
    """DeepSpeed's MOELayer.forward, capacity-padded; its tensor-parallel token handling included."""

    name = "deepspeed"
    has_stock_counterfactual = False
    capacity_padded = True    # every expert runs on `capacity` rows from every rank, padding included

    def prepare(self, layer) -> None:
        pass

    def keeps_stacked(self, experts) -> bool:
        return False

    @staticmethod
    def slotless(drop_tokens: bool) -> bool:
        return False

    def forward(self, layer, hidden_states: torch.Tensor, x_SD: torch.Tensor, valid_S: torch.Tensor):
        out = MoE.forward(layer, hidden_states, None)
        layer.last_comm = partial(_stock_comm, layer, x_SD.shape[1], x_SD.element_size())
        layer.last_remote_bytes = stock_alltoall_bytes(layer.config.num_experts, int(layer.gate.last_capacity),
                                                       x_SD.shape[1], layer.deepspeed_moe.ep_size, x_SD.element_size())
        return out


def _stock_comm(layer, hidden: int, element_size: int) -> CommVolume | None:
    """The stock dispatch's CommVolume from the gate's statistics of the same call (both are read lazily and
    replaced together by the next forward)."""
    stats = layer.gate.last_stats
    if stats is None:
        return None
    routing = stats.comm_physical
    return stock_volume(layer.config.num_experts, int(stats.capacity), hidden, layer.deepspeed_moe.ep_size,
                        element_size, float(routing["cross_rank_rate"]), float(routing["ranks_per_token"]),
                        int(routing["num_tokens"]))


class RankOnceDispatcher:
    """The token-once-per-rank dispatch (`ds_smoes.parallel.dispatch`), dropless unless `drop_tokens`."""

    name = "rank_once"
    has_stock_counterfactual = True
    capacity_padded = False   # an expert runs on the routes it got

    def prepare(self, layer) -> None:
        """Lay the local experts out stacked when their kind is recognised (`ds_smoes.parallel.grouped_experts`):
        each parameter becomes a slice of one [n, ...] tensor, so the grouped matmul reads a view rather than a
        copy per forward.  The per-expert parameters stay what DeepSpeed, checkpoints, migration and the
        optimizer see; only their storage is shared.  At construction, before any optimizer holds them."""
        experts = layer.deepspeed_moe.experts.deepspeed_experts
        if grouped_kind(experts) is not None:
            stack_expert_params_(experts)

    def keeps_stacked(self, experts) -> bool:
        """Whether `experts` are laid out stacked now (so a move or cast must lay them out again)."""
        return is_view_stacked(experts)

    @staticmethod
    def slotless(drop_tokens: bool) -> bool:
        """Without dropping there is no padded buffer: no slots, no common capacity."""
        return not drop_tokens

    def forward(self, layer, hidden_states: torch.Tensor, x_SD: torch.Tensor, valid_S: torch.Tensor):
        """The gate as MOELayer calls it, then the exchange on the layer's local experts."""
        moe = layer.deepspeed_moe
        if moe.ep_size > 1 and moe.ep_group is None:
            raise RuntimeError(f"ep_size={moe.ep_size} but the layer has no expert-parallel group yet: build the "
                               "engine with deepspeed.initialize (or call layer.set_deepspeed_parallelism()) first")
        _refuse_tensor_parallel()
        group = moe.ep_group if moe.ep_size > 1 else None
        plans: list[RankOncePlan] = []
        layer.gate.on_routes = lambda indices_KS: plans.append(plan_rank_once(indices_KS, moe.num_local_experts,
                                                                              group))
        try:
            moe.l_aux, _, num_experts, indices_KS, _, gates_KS, moe.exp_counts = moe.gate(x_SD, None, True, False)
        finally:
            layer.gate.on_routes = None
        plan = plans[0] if plans else plan_rank_once(indices_KS, moe.num_local_experts, group)
        out_SD, layer.last_comm = rank_once_dispatch(x_SD, indices_KS, gates_KS, moe.experts.deepspeed_experts,
                                                     num_experts, group, valid_S, plan)
        send, recv = plan.counts()   # read by the dispatch already: no new host read
        home = torch.distributed.get_rank(group) if group is not None else 0
        dispatch_b, combine_b, _ = rank_once_volume(send, recv, home, x_SD.shape[1], x_SD.element_size(),
                                                    indices_KS.shape[0])
        layer.last_remote_bytes = dispatch_b + combine_b
        output = out_SD.reshape(hidden_states.shape)
        if layer.use_residual:  # Residual MoE: a learned per-token mix of the MoE output and a dense MLP
            mlp_out = layer.mlp(hidden_states)
            mlp_out = mlp_out[0] if isinstance(mlp_out, tuple) else mlp_out
            coef = torch.softmax(layer.coefficient(hidden_states), dim=-1)
            output = output * coef[..., 0:1] + mlp_out * coef[..., 1:]
        return output, moe.l_aux, moe.exp_counts


def _refuse_tensor_parallel() -> None:
    """rank_once bypasses MOELayer.forward, and with it DeepSpeed's tensor-parallel token handling (each TP rank
    drops its duplicate share of the tokens before the all-to-all and gathers them after): with a TP group of
    more than one rank, every TP rank would send every token.  Refused rather than silently multiplied."""
    from deepspeed.utils import groups
    from deepspeed.utils.bwc import bwc_tensor_model_parallel_world_size

    tp = 1 if groups.mpu is None else bwc_tensor_model_parallel_world_size(mpu=groups.mpu)
    if tp > 1:
        raise ConfigError(f"smoes.dispatch='rank_once' does not split tokens over tensor-parallel ranks (this run "
                          f"has {tp}): set smoes.dispatch='deepspeed', whose MOELayer does, or train without "
                          "tensor parallelism")


DISPATCHERS = {StockDispatcher.name: StockDispatcher, RankOnceDispatcher.name: RankOnceDispatcher}


def build_dispatcher(dispatch: str) -> StockDispatcher | RankOnceDispatcher:
    """The dispatcher `config.dispatch` names (the config's Literal has validated it already)."""
    try:
        return DISPATCHERS[dispatch]()
    except KeyError:
        raise ConfigError(f"unknown smoes.dispatch {dispatch!r}; choose one of {sorted(DISPATCHERS)}") from None
