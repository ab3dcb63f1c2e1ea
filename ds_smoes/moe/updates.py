"""Routing state updated once per optimizer step, never inside a forward.

The bins' load EMA and rebinning (`ExpertBinning`) and the Gaussian modality statistics
(`GaussianModalityStats`) change from what the forwards observed.  Forwards only *record*
(local sums, no collective, no host sync); once per optimizer step the records of every layer are
summed over the data-parallel world in ONE all-reduce and applied.  So:

- activation checkpointing, which runs a forward twice, updates once (a recomputed forward records
  nothing, `ds_smoes.core.step_state.in_backward`), and a recomputed forward routes exactly as the
  first one did (the state it reads cannot change between the two);
- gradient accumulation folds every micro-batch of a step into one update;
- a step costs one collective for all layers, where each layer used to all-reduce in every forward.

Wire it once, on the optimizer (DeepSpeed calls the wrapped torch optimizer's `step` once per
optimizer step, after gradient accumulation; a step skipped for an fp16 overflow keeps the records
for the next):

    optimizer = torch.optim.AdamW(...)
    register_step_updates(optimizer, model)      # before deepspeed.initialize / the Trainer
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, ...)

or call `apply_step_updates(model)` yourself after each optimizer step.  `ds_smoes.train` (and the
Hugging Face path, the sweeps and the benchmarks, which train through it) registers it.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ds_smoes.core.binning import ExpertBinning
from ds_smoes.core.scores import GaussianModalityStats, ReduceFn
from ds_smoes.parallel import distributed

STATEFUL = (ExpertBinning, GaussianModalityStats)


def stateful_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose state the step updates (bins, Gaussian statistics), in a fixed order (every rank walks
    the same model, so every rank lists them alike)."""
    return [m for m in model.modules() if isinstance(m, STATEFUL)]


@torch.no_grad()
def apply_step_updates(model: nn.Module, reduce_fn: ReduceFn = distributed.world_sum_) -> int:
    """Sum every layer's records over the world (one all-reduce per device holding them) and apply them.
    Every rank must call it at the same step.  Returns the number of modules updated."""
    modules = stateful_modules(model)
    pending = [(m, m.pending()) for m in modules]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for _, tensors in pending:
        for t in tensors:
            by_device.setdefault(t.device, []).append(t)
    reduced: dict[int, torch.Tensor] = {}
    for tensors in by_device.values():
        flat = reduce_fn(torch.cat([t.reshape(-1).float() for t in tensors]))
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            reduced[id(t)] = part.view(t.shape).to(t.dtype)
    for module, tensors in pending:
        module.apply_pending([reduced[id(t)] for t in tensors])
    return len(modules)


def innermost_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrappers (BF16_Optimizer, ZeRO, FP16), which call its `step` once per
    optimizer step."""
    seen = 0
    while not isinstance(optimizer, torch.optim.Optimizer):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or seen > 8:
            raise TypeError(f"{type(optimizer).__name__} is no torch.optim.Optimizer and wraps none (.optimizer): pass "
                            "the torch optimizer, or call ds_smoes.moe.updates.apply_step_updates(model) after "
                            "each optimizer step")
        optimizer, seen = inner, seen + 1
    return optimizer


def register_step_updates(optimizer, model: nn.Module,
                          reduce_fn: ReduceFn = distributed.world_sum_) -> Callable[[], None]:
    """Apply the step updates right before each `optimizer.step()` (a step pre-hook on the torch optimizer, or on
    the one a DeepSpeed optimizer wraps).  Does nothing for a model without SMoES state.  Returns a function that
    removes the hook."""
    if not stateful_modules(model):
        return lambda: None
    def pre_hook(_optimizer, _args, _kwargs) -> None:
        apply_step_updates(model, reduce_fn)

    return innermost_optimizer(optimizer).register_step_pre_hook(pre_hook).remove
