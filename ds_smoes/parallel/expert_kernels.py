"""Which kernel runs a rank's local experts in the rank_once dispatch: the one measured fastest, not the one
recognised.

Three kernels compute the same thing, every (row, route) pair through its expert, rows sorted by expert:

    grouped    one `torch._grouped_mm` per projection over the stacked weights; the offsets stay on the device
               (no host read) where torch has a native kernel (`grouped_experts.native_grouped_mm`)
    segments   `torch.mm` per expert over slices of the stacked weights; needs the experts' sizes on the host
    modules    the expert modules called in a loop; needs the sizes too; runs any expert module

`grouped` and `segments` need experts of a recognised kind (`grouped_experts.grouped_kind`: the built-in mlp,
Hugging Face's GatedExpert); `modules` runs anything.  Which is fastest depends on the device, the dtype and the
shape: on a GPU with bf16 the grouped kernel replaces 2n launches by 2; on a CPU torch's `_grouped_mm` is a C++
loop of `mm` whose bf16 path was measured slower than the module loop on an AMX Xeon (issue 32), and a decode
step's handful of rows favours whatever launches least.  So `smoes.expert_kernel` is "auto" by default: the
first call with a given key (device, dtype, expert kind and weight shapes, local experts, and the pair count
rounded up to a power of two, and whether a backward follows) times every kernel that applies on that call's own
rows, forward and backward in training, forward alone in inference (one warm-up, then the best of
`PROBE_REPEATS`), keeps the fastest for the rest of the process and says so once (rank 0's
console).  Naming a kernel skips the probe; one that does not apply falls back to the next in
grouped > segments > modules order that does.

The probe runs on the rank that makes the call; two ranks may choose differently (the kernels agree to rounding).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ds_smoes.parallel import console

KERNELS = ("grouped", "segments", "modules")
PROBE_REPEATS = 3

# key -> (kernel, {kernel: seconds}) for every key probed in this process
_CHOSEN: dict[tuple, tuple[str, dict[str, float]]] = {}


def applicable(kind: str | None, native: bool) -> list[str]:
    """The kernels that can run experts of `kind` (None: not recognised); `native`: torch has a grouped kernel
    that needs no host read for these rows (device, dtype, alignment)."""
    if kind is None:
        return ["modules"]
    return (["grouped"] if native else []) + ["segments", "modules"]


def probe_key(x_QD: torch.Tensor, kind: str | None, experts: Sequence[nn.Module]) -> tuple:
    """What a choice is kept for: device, dtype, expert kind and shapes, local experts, the pair count rounded up to
    a power of two, and whether a backward follows (training) or not (inference: the forward alone is timed)."""
    shapes = tuple(tuple(p.shape) for p in experts[0].parameters())
    return (x_QD.device.type, x_QD.dtype, kind, shapes, len(experts), max(1, x_QD.shape[0]).bit_length(),
            torch.is_grad_enabled())


def chosen() -> dict[tuple, tuple[str, dict[str, float]]]:
    """Every choice this process made: key -> (kernel, seconds per kernel)."""
    return dict(_CHOSEN)


def _time(run: Callable[[], torch.Tensor], params: list[torch.Tensor], x_QD: torch.Tensor, backward: bool) -> float:
    """Best of PROBE_REPEATS passes of `run` (forward, and the backward when `backward`), after one warm-up;
    gradients are not kept."""
    sync = torch.cuda.synchronize if x_QD.device.type == "cuda" else (lambda: None)
    best = float("inf")
    for attempt in range(PROBE_REPEATS + 1):
        sync()
        start = time.perf_counter()
        if not backward:
            with torch.no_grad():
                run(x_QD.detach())
        else:
            with torch.enable_grad():
                x = x_QD.detach().requires_grad_(True)
                out = run(x)
                # a dense output gradient, as the dispatch's weighting gives it (`sum()`'s expanded one has stride 0)
                torch.autograd.grad(out, [x, *params], torch.ones_like(out), allow_unused=True)
        sync()
        if attempt:
            best = min(best, time.perf_counter() - start)
    return best


def known(requested: str, key: tuple, options: list[str]) -> str | None:
    """The kernel to run when it is decided without measuring: `requested` when it applies (else the first that
    does), the only option, or an earlier probe's choice for `key`; None when "auto" has to probe."""
    if requested != "auto":
        return requested if requested in options else options[0]
    if len(options) == 1:
        return options[0]
    if key in _CHOSEN:
        return _CHOSEN[key][0]
    # inside torch.compile nothing is timed (a clock read would break the graph): the first kernel that applies
    return options[0] if torch.compiler.is_compiling() else None


def probe(key: tuple, x_QD: torch.Tensor, experts: Sequence[nn.Module],
          runners: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> str:
    """Time every runner (`runners[name](x_QD)`: forward; the probe adds the backward) on `x_QD`, keep and return
    the fastest for `key`."""
    params = [p for e in experts for p in e.parameters() if p.requires_grad]
    device, dtype, kind, _, n, bucket, backward = key
    seconds = {name: _time(run, params, x_QD, backward) for name, run in runners.items()}
    best = min(seconds, key=seconds.get)
    _CHOSEN[key] = best, seconds
    times = ", ".join(f"{name} {s * 1e3:.2f} ms" for name, s in seconds.items())
    console.log0(f"{n} local {kind} experts, {dtype} on {device}, up to {1 << bucket} rows, "
                 f"{'training' if backward else 'inference'}: {best} (measured {'fwd+bwd' if backward else 'fwd'}: "
                 f"{times}; smoes.expert_kernel names one to skip this)", tag="expert kernel")
    return best
