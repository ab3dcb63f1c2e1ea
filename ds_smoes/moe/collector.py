"""`RoutingCollector`: what the MoE layers' calls measured, handed to the caller that asked for it.

A layer keeps nothing of a call.  A caller that wants the calls' statistics (a training loop's logging window,
an evaluation, a benchmark) opens a collector over the layers for the forwards it cares about:

    with RoutingCollector(model.moe_layers()) as collector:      # stats=True: RoutingStats per call
        out = model(batch)
    calls_L = collector.take()          # per layer, its calls in order: MoECall(stats, remote_bytes, comm())

Outside a collector (or with `stats=False`) a layer computes no statistics, and in evaluation no auxiliary
losses unless the collector asks for them (`losses=True`): an inference forward pays for the routing only.
Statistics are device tensors, so collecting reads nothing back to the host; a caller reads them when it logs.
A forward recomputed inside the backward (activation checkpointing) is not collected twice.  Collectors nest:
the innermost one open over a layer gets its calls.

Attaching is the only state the layers carry for it (`layer.routing_collector`, None outside a `with`); it is
the caller's object, set and cleared by the caller's `with` block.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class MoECall:
    """One MoE layer call, as the collector received it."""
    stats: Any                    # ds_smoes.moe.gate.RoutingStats, or None when the collector asked for none
    remote_bytes: int             # what the dispatch sent to other EP ranks (host int: split sizes or capacity)
    _comm: Callable[[Any], Any] = field(repr=False)
    routed: Any = field(default=None, repr=False)   # ds_smoes.moe.gate.Routed, when the collector keeps routes

    def comm(self):
        """The call's CommVolume (`ds_smoes.parallel.dispatch`); may read the host (a logging step's cost)."""
        return self._comm(self.stats)


class RoutingCollector:
    """Collects every call of `layers` made while its `with` block is open.  `stats`: compute each call's
    RoutingStats; `losses`: compute the gate's auxiliary losses in evaluation too (training always does);
    `routes`: keep each call's routes (`Routed`: the benchmarks' own accounting reads them)."""

    def __init__(self, layers: Sequence, stats: bool = True, losses: bool = False, routes: bool = False) -> None:
        self.layers = list(layers)
        self.stats = stats
        self.losses = losses
        self.routes = routes
        self._index = {id(layer): i for i, layer in enumerate(self.layers)}
        self._calls: list[list[MoECall]] = [[] for _ in self.layers]
        self._outer: list | None = None

    def __enter__(self) -> RoutingCollector:
        if self._outer is not None:
            raise RuntimeError("this RoutingCollector is open already: open a new one to nest")
        self._outer = [getattr(layer, "routing_collector", None) for layer in self.layers]
        for layer in self.layers:
            layer.routing_collector = self
        return self

    def __exit__(self, *exc) -> None:
        for layer, outer in zip(self.layers, self._outer):
            layer.routing_collector = outer
        self._outer = None

    def add(self, layer, call: MoECall) -> None:
        self._calls[self._index[id(layer)]].append(call)

    def take(self) -> list[list[MoECall]]:
        """The calls collected so far, per layer (in the order of `layers`); the collector starts empty again."""
        calls, self._calls = self._calls, [[] for _ in self.layers]
        return calls

    def last(self) -> list[MoECall | None]:
        """Per layer, its most recent call (None for a layer not called), without taking them."""
        return [calls[-1] if calls else None for calls in self._calls]

