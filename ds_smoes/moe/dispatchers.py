"""The expert-parallel dispatchers: how the MoE layer sends its tokens to the ranks of their experts and
combines what comes back.  One is chosen when the layer is built (`build_dispatcher`, from `config.dispatch`);
nothing else reads the dispatch's name.

    StockDispatcher     DeepSpeed's stock MOELayer dispatch, from DeepSpeed's own parts: the capacity-padded
                        [E, C, D] buffer through an all-to-all twice, its tensor-parallel token handling included
    RankOnceDispatcher  `ds_smoes.parallel.dispatch`: a token goes once to every rank holding one of its experts,
                        dropless, its local experts run as one grouped matmul per projection

The layer calls a dispatcher twice per forward, around the gate's losses:

    plan = dispatcher.plan(layer, routed)            # rank_once: starts the count exchange (overlaps the losses)
    l_aux, named = gate.losses(routed)
    sent = dispatcher.forward(layer, x_SD, routed, plan)   # -> Dispatched(out_SD, remote_bytes, comm)

and asks, once, at set-up:

- `prepare(layer)` at construction (rank_once lays recognised experts out stacked) and `keeps_stacked(...)`
  when the layer is moved or cast; `check_parallelism()` once DeepSpeed has made the process groups;
- `slotless(drop_tokens)`: whether routes need slots in a padded buffer and the EP ranks a common capacity
  (the gate skips both, and their all-reduce, when not);
- `capacity_padded`: whether experts run on a capacity-padded buffer (the benchmarks' expert-work count);
- `has_stock_counterfactual`: whether the evaluation should also count what the stock dispatch would have sent
  for the same routes (it is the stock dispatch's own figure otherwise).

A DeepEP dispatcher (NVIDIA's expert-parallel kernels) would be a third class here with the same methods.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from deepspeed.moe.mappings import drop_tokens, gather_tokens
from deepspeed.moe.sharded_moe import _AllToAll, _route_slots, _sparse_decode, _sparse_encode
from deepspeed.utils import groups
from deepspeed.utils.bwc import bwc_tensor_model_parallel_world_size

from ds_smoes.core.errors import ConfigError
from ds_smoes.parallel.dispatch import (CommVolume, plan_rank_once, rank_once_dispatch, rank_once_volume,
                                        stock_alltoall_bytes, stock_volume)
from ds_smoes.parallel.grouped_experts import grouped_kind, is_view_stacked, stack_expert_params_


@dataclass
class Dispatched:
    """What one dispatch returned: the combined output, what it sent to other EP ranks (bytes, known on the host
    without a read), and how to work out its CommVolume when someone asks (`comm(stats)`: the stock dispatch's
    volume is computed from the gate's statistics of the same call, rank_once's from its own split sizes)."""
    out_SD: torch.Tensor
    remote_bytes: int
    comm: Callable[[Any], CommVolume | None]


def tensor_parallel_size() -> int:
    """The tensor-parallel group's size DeepSpeed was given (1 without an mpu)."""
    return 1 if groups.mpu is None else bwc_tensor_model_parallel_world_size(mpu=groups.mpu)


class StockDispatcher:
    """DeepSpeed's MOELayer dispatch, capacity-padded, with its tensor-parallel token handling: DeepSpeed 0.19.8's
    own encode, all-to-all and decode functions in the order its `MOELayer.forward` calls them (the gate is called
    with its modality inputs first, which `MOELayer.forward` has no argument for).  A test pins the two equal."""

    name = "deepspeed"
    has_stock_counterfactual = False
    capacity_padded = True    # every expert runs on `capacity` rows from every rank, padding included

    def prepare(self, layer) -> None:
        pass

    def keeps_stacked(self, experts) -> bool:
        return False

    def check_parallelism(self) -> None:
        pass

    @staticmethod
    def slotless(drop_tokens: bool) -> bool:
        return False

    def plan(self, layer, routed) -> None:
        return None

    def forward(self, layer, x_SD: torch.Tensor, routed, plan=None) -> Dispatched:
        moe = layer.deepspeed_moe
        num_tokens, hidden = x_SD.shape
        num_experts, capacity = routed.num_experts, int(routed.capacity)
        slots_KS = _route_slots(routed.indices_KS, routed.locations_KS, num_experts, capacity)
        buffer_ECD = _sparse_encode(x_SD, slots_KS, num_experts, capacity)
        tp = tensor_parallel_size()
        expert_tp = tp > 1 and groups._get_expert_model_parallel_world_size() > 1
        if tp > 1:   # every TP rank holds the same tokens: each sends its share only
            buffer_ECD = drop_tokens(buffer_ECD, dim=1)
        buffer_ECD = _AllToAll.apply(moe.ep_group, buffer_ECD) if moe.ep_size > 1 else buffer_ECD.contiguous()
        if expert_tp:
            buffer_ECD = gather_tokens(buffer_ECD, dim=1)
        out_ECD = moe.experts(buffer_ECD.reshape(moe.ep_size, moe.num_local_experts, -1, hidden))
        out_ECD = out_ECD.reshape(moe.ep_size * moe.num_local_experts, -1, hidden)
        if expert_tp:
            out_ECD = drop_tokens(out_ECD, dim=1)
        out_ECD = _AllToAll.apply(moe.ep_group, out_ECD) if moe.ep_size > 1 else out_ECD.contiguous()
        if tp > 1:
            out_ECD = gather_tokens(out_ECD, dim=1)
        out_SD = _sparse_decode(out_ECD.view(num_experts * capacity, hidden), slots_KS, routed.gates_KS, num_tokens)
        element_size = x_SD.element_size()
        remote = stock_alltoall_bytes(num_experts, capacity, hidden, moe.ep_size, element_size)

        def comm(stats) -> CommVolume | None:
            if stats is None:
                return None
            routing = stats.comm_physical
            return stock_volume(num_experts, capacity, hidden, moe.ep_size, element_size,
                                float(routing["cross_rank_rate"]), float(routing["ranks_per_token"]),
                                int(routing["num_tokens"]))

        return Dispatched(out_SD, remote, comm)


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

    def check_parallelism(self) -> None:
        """rank_once does not go through MOELayer.forward, and so not through DeepSpeed's tensor-parallel token
        handling (each TP rank drops its duplicate share of the tokens before the all-to-all and gathers them
        after): with a TP group of more than one rank, every TP rank would send every token.  Refused rather
        than silently multiplied; asked once, when DeepSpeed has made the layer's process groups."""
        tp = tensor_parallel_size()
        if tp > 1:
            raise ConfigError(f"smoes.dispatch='rank_once' does not split tokens over tensor-parallel ranks (this "
                              f"run has {tp}): set smoes.dispatch='deepspeed', whose dispatch does, or train "
                              "without tensor parallelism")

    @staticmethod
    def slotless(drop_tokens: bool) -> bool:
        """Without dropping there is no padded buffer: no slots, no common capacity."""
        return not drop_tokens

    @staticmethod
    def _group(moe):
        if moe.ep_size > 1 and moe.ep_group is None:
            raise RuntimeError(f"ep_size={moe.ep_size} but the layer has no expert-parallel group yet: build the "
                               "engine with deepspeed.initialize (or call layer.set_deepspeed_parallelism()) first")
        return moe.ep_group if moe.ep_size > 1 else None

    def plan(self, layer, routed):
        """Where the rows go; starts the count exchange, which overlaps with what the layer computes next."""
        moe = layer.deepspeed_moe
        return plan_rank_once(routed.indices_KS, moe.num_local_experts, self._group(moe))

    def forward(self, layer, x_SD: torch.Tensor, routed, plan) -> Dispatched:
        moe = layer.deepspeed_moe
        group = self._group(moe)
        out_SD, volume = rank_once_dispatch(x_SD, routed.indices_KS, routed.gates_KS, moe.experts.deepspeed_experts,
                                            routed.num_experts, group, routed.valid_S, plan,
                                            layer.config.expert_kernel)
        send, recv = plan.counts()   # read by the dispatch already: no new host read
        home = torch.distributed.get_rank(group) if group is not None else 0
        dispatch_b, combine_b, _ = rank_once_volume(send, recv, home, x_SD.shape[1], x_SD.element_size(),
                                                    routed.indices_KS.shape[0])
        return Dispatched(out_SD, dispatch_b + combine_b, lambda _stats: volume())


DISPATCHERS = {StockDispatcher.name: StockDispatcher, RankOnceDispatcher.name: RankOnceDispatcher}


def build_dispatcher(dispatch: str) -> StockDispatcher | RankOnceDispatcher:
    """The dispatcher `config.dispatch` names (the config's Literal has validated it already)."""
    try:
        return DISPATCHERS[dispatch]()
    except KeyError:
        raise ConfigError(f"unknown smoes.dispatch {dispatch!r}; choose one of {sorted(DISPATCHERS)}") from None
