"""State that forwards observe and optimizer steps apply: the conventions every such module follows.

Modules that keep routing state (bins, Gaussian statistics) record observations in the forward and
apply them once per optimizer step (`ds_smoes.moe.updates`).  Two questions make that safe.

Is this forward a recomputation?  Activation checkpointing (`torch.utils.checkpoint`, reentrant or not, and DeepSpeed's
`deepspeed.checkpointing`) runs a checkpointed module's forward a second time inside the backward
pass, to rebuild the activations it dropped.  State a forward records (loads, statistics) must be
recorded once: the first time, not again in that recomputation (`in_backward`).

And is anything applying them?  A training loop that never calls the step update leaves the state
frozen at its start: `warn_unapplied` says so once.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn


def in_backward() -> bool:
    """True while autograd's engine runs a backward pass on this thread, i.e. in a checkpoint's recomputed
    forward (a plain forward never runs there).  False inside code `torch.compile` traces: a compiled forward is
    not re-run by Python in the backward (its recomputation, if any, is part of the compiled backward graph), and
    asking autograd's engine would break the graph."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


UNAPPLIED_WARNING_AFTER = 1000


def warn_unapplied(count: int, what: str) -> int:
    """Warn once when `count` training forwards recorded observations that no optimizer step applied."""
    if count == UNAPPLIED_WARNING_AFTER:
        warnings.warn(f"SMoES {what}: {count} training forwards recorded routing observations that no step applied; "
                      "the state never updates.  Register the update on your optimizer, "
                      "ds_smoes.moe.updates.register_step_updates(optimizer, model), or call "
                      "ds_smoes.moe.updates.apply_step_updates(model) after each optimizer step", stacklevel=3)
    return count


class Float32State(nn.Module):
    """A module whose floating buffers (statistics, EMAs, counts) stay float32 when the model is cast.

    `model.bfloat16()` / `.half()` / `.to(dtype)` (DeepSpeed casts the model so under bf16 and fp16) would round
    a load EMA or a token count kept in bf16 to 8 bits of mantissa: counts past 256 stop adding up.  The
    buffers follow the model's device, never its dtype."""

    def _apply(self, fn, recurse=True):
        float32 = {name: b for name, b in self._buffers.items() if b is not None and b.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, before in float32.items():
            after = self._buffers[name]
            if after is not None and after.dtype != torch.float32:
                self._buffers[name] = before.to(device=after.device)
        return self
