"""`Deferred`: an attribute computed on first read.

Assign it a value, or a `functools.partial` that computes the value; the first read calls the
partial and keeps what it returns.  The gates' `last_stats` and the layers' `last_comm` use it:
on a small MoE layer the statistics cost about as much as the routing (small ops and host syncs).

Who pays: the training session's logging window reads both after every optimizer step (outside the
step's timing) and `measure_routing` after every evaluation forward, so those compute them anyway;
the benchmark's timed steps and generation never read them and skip that work.  Deferring is not
free either: every forward still snapshots what the partial needs (the gate clones its bins and
placement), keeps the captured tensors alive until the next forward replaces them, and computes
the gates' named losses and diagnostics (`RoutingStats.losses`) eagerly, with the losses.
Whatever the partial needs must be captured when it is made (snapshot tensors that may change
before the read).
"""
from __future__ import annotations

from functools import partial


class Deferred:
    def __set_name__(self, owner, name: str) -> None:
        self.slot = f"_deferred_{name}"

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        value = obj.__dict__.get(self.slot)
        if isinstance(value, partial):
            value = obj.__dict__[self.slot] = value()
        return value

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.slot] = value
