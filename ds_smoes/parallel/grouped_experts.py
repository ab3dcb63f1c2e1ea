"""A rank's local experts as stacked weights: one grouped matmul per projection, no host read.

Shapes (glossary: `ds_smoes/__init__.py`): E this rank's local experts (n of them), D hidden, I an expert's
intermediate size, F the width of its first projection (the fused gate+up 2I of the gated expert; I for the mlp),
Q (row, route) pairs sorted by expert.  A helper that runs either projection names its operands as the first's
(D in, F out).

Which experts.  DeepSpeed deep-copies one expert module per local expert into a ModuleList.  Two kinds are
recognised (`grouped_kind`), everything else runs in the caller's loop over modules:

- "mlp":   every expert an `nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D))` (the built-in model's
           `mlp`), biases or not, same shapes and GELU approximation;
- "gated": every expert the Hugging Face `GatedExpert` (`ds_smoes.hf.experts`, recognised by its class's
           qualified name: this layer may not import `hf`): `down(act(gate(x)) * up(x))` with the gate and up
           rows fused in one [F, D] weight, which stays fused here (one grouped matmul to F, then chunk).

The weights.  DeepSpeed's per-expert `nn.Parameter`s stay the source of truth: its per-expert checkpoint
files (`...deepspeed_experts.<global id>.<param>`, cloned one by one when saved), expert migration
(`migration.py` copies into `p.data`), the exports, ZeRO and BF16_Optimizer (which rebind `p.data` to slices of
their flat buffers) and `model.to(device)` all keep seeing the same parameters.  The stacked [E, out, in] weight
a grouped matmul takes is obtained per forward by `stack_params`:

- a zero-copy view when the experts' same-named parameters lie evenly strided in one storage: the layer arranges
  that at construction (`stack_expert_params_`: one [n, ...] tensor per parameter name, each expert's `p.data`
  rebound to its slice, before any optimizer exists), and DeepSpeed's flat buffers, which lay one expert's
  parameters after another, are evenly strided too.  The check compares data pointers on the host (pointer
  arithmetic on tensor metadata, never a device read).  `_StackedView` takes the individual parameters as
  autograd inputs and hands each its slice of the stacked gradient, so every parameter gets its own `.grad`
  exactly as with the loop;
- `torch.stack` (one copy of the weights per forward, and an unbind of the gradient) otherwise: after
  `load_state_dict(assign=True)`, `copy.deepcopy`, or any other rebinding of one expert's `p.data`.  Still
  correct, only slower.

Measured (`docs/dispatch.md`, "Grouped experts"): on the CPU the grouped matmul is itself a loop of `mm`, so
the view saves the copy (the weights forward, their gradient backward) and the loop's per-module overhead; on a
GPU the grouped kernel replaces 2n launches per forward by two, and the offsets stay on the device.

The rows.  The caller sorts the (row, route) pairs by local expert (unused routes last) and hands the per-expert
counts as a device tensor; the offsets are their cumsum (int32), so nothing is read on the host.  When the caller
does not know how many pairs are used (a host read), it passes every pair: `torch._grouped_mm` leaves the output
rows past the last offset uninitialised (its output is `empty_strided`, and so is the input gradient of its
backward), so `valid_Q1` masks them with `torch.where`: after each projection (bias included) in the forward, and
on the input rows, which masks the backward's garbage before it reaches the gathered input.  The matmuls do the
used rows' work only; the element-wise ops and the saved activations cover every pair.

Backends of `torch._grouped_mm` (torch 2.13): on the CPU fp32, bf16 and fp16, a C++ loop of `mm` over the groups;
on CUDA a CUTLASS kernel for bf16 on sm90 / sm100 (H100, H200, B200) that reads the offsets on the device; for
other CUDA dtypes and GPUs torch falls back to the same C++ loop, which copies the offsets to the host at EVERY call
(forward and both backward products: six syncs per mlp layer).  Where the native kernel is not known to exist
(`native_grouped_mm`), or when the caller has the experts' sizes on the host, the experts run as a segment loop
instead (`segment_linear`: `F.linear` per expert with its own weight, the offsets read once per forward).  Which
of the grouped kernel, the segment loop and the plain loop over the expert modules runs is chosen by measurement
(`ds_smoes.parallel.expert_kernels`): on a 2-core AMD EPYC (AVX-512, one thread) at OLMoE's expert shape, 32
local experts, 2048 pairs, forward + backward, the grouped kernel took 1.24x the module loop in fp32 and 1.17x in
bf16, the segment loop 1.04x and 1.11x.
"""
from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

GATED_EXPERT = ("ds_smoes.hf.experts", "GatedExpert")  # (module, qualname): recognised without importing hf


# -- which experts ------------------------------------------------------------------------------------------
def _is_mlp(expert: nn.Module) -> bool:
    if type(expert) is not nn.Sequential or len(expert) != 3:
        return False
    first, act, second = expert
    return type(first) is nn.Linear and type(act) is nn.GELU and type(second) is nn.Linear


def _is_gated(expert: nn.Module) -> bool:
    cls = type(expert)
    return ((cls.__module__, cls.__qualname__) == GATED_EXPERT and type(expert.gate_up_proj) is nn.Linear
            and type(expert.down_proj) is nn.Linear and expert.gate_up_proj.bias is None
            and expert.down_proj.bias is None)


def _same_act(a, b) -> bool:
    """The same activation: one object, or parameterless modules of one type with the same settings (a
    transformers activation module is deep-copied with its expert)."""
    if a is b:
        return True
    if not (type(a) is type(b) and isinstance(a, nn.Module)) or any(True for _ in a.parameters()) \
            or any(True for _ in a.buffers()) or any(True for _ in b.parameters()) or any(True for _ in b.buffers()):
        return False
    settings = [{k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training"} for m in (a, b)]
    return settings[0] == settings[1]


def grouped_kind(experts: Sequence[nn.Module]) -> str | None:
    """"mlp" or "gated" when every expert is of that recognised kind with identical shapes (see the module
    docstring), else None (the caller loops over the modules)."""
    if len(experts) == 0:
        return None
    first = experts[0]
    shapes = [tuple(p.shape) for p in first.parameters()]
    if any([tuple(p.shape) for p in e.parameters()] != shapes for e in experts[1:]):
        return None
    if all(_is_mlp(e) for e in experts):
        if all(e[1].approximate == first[1].approximate for e in experts):
            return "mlp"
        return None
    if all(_is_gated(e) for e in experts) and all(_same_act(e.act_fn, first.act_fn) for e in experts):
        return "gated"
    return None


# -- stacked weights ----------------------------------------------------------------------------------------
@torch.no_grad()
def stack_expert_params_(experts: Sequence[nn.Module]) -> int:
    """Rebind every expert's parameters to slices of one [n, ...] tensor per parameter name (values kept), so
    `stack_params` finds them evenly strided.  Call before an optimizer holds the parameters (a ZeRO /
    BF16_Optimizer flat buffer would lose its parameters).  Returns how many parameter names were stacked."""
    named = [dict(e.named_parameters()) for e in experts]
    if not named or any(list(n) != list(named[0]) for n in named):
        return 0
    for name in named[0]:
        params = [n[name] for n in named]
        stacked = torch.stack([p.detach() for p in params])
        for p, row in zip(params, stacked):
            p.data = row
    return len(named[0])


def even_stride(params: Sequence[torch.Tensor]) -> int | None:
    """The element stride between consecutive parameters when they lie evenly strided (without overlap) in the
    first one's storage, contiguous, of one shape, dtype and device; else None.  Host metadata only."""
    p0 = params[0]
    if not p0.is_contiguous():
        return None
    size, elem, numel = p0.shape, p0.element_size(), p0.numel()
    ptrs = [p.data_ptr() for p in params]
    if ptrs[0] % 16:  # every expert's weight starts on 16 bytes (CUDA's grouped kernel loads it by TMA)
        return None
    if len(params) == 1:
        return numel
    step = ptrs[1] - ptrs[0]
    if step <= 0 or step % elem or step // elem < numel or step % 16:
        return None
    if any(b - a != step for a, b in zip(ptrs, ptrs[1:])):
        return None
    if any(p.shape != size or p.dtype != p0.dtype or p.device != p0.device or not p.is_contiguous()
           for p in params[1:]):
        return None
    storage = p0.untyped_storage()  # two live storages never overlap: inside its range means inside it
    start = storage.data_ptr()
    if ptrs[0] < start or ptrs[-1] + numel * elem > start + storage.nbytes():
        return None
    return step // elem


class _StackedView(torch.autograd.Function):
    """The evenly strided parameters as one [E, ...] view of their storage; the backward hands each parameter its
    slice of the stacked gradient."""

    @staticmethod
    def forward(ctx, stride: int, *params):
        p0 = params[0]
        return p0.detach().as_strided((len(params), *p0.shape), (stride, *p0.stride()), p0.storage_offset())

    @staticmethod
    def backward(ctx, grad_E):
        return (None, *grad_E.unbind(0))


def stack_params(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """[E, ...]: the parameters stacked, differentiable in each; a zero-copy view when `even_stride` finds one,
    else `torch.stack` (a copy).  Inside `torch.compile` always the copy: the view reads storage addresses and
    offsets, which a traced graph has not (each would break it); the compiler may fuse the copy away."""
    if torch.compiler.is_compiling():
        return torch.stack(list(params))
    stride = even_stride(params)
    if stride is not None:
        return _StackedView.apply(stride, *params)
    return torch.stack(list(params))


def is_view_stacked(experts: Sequence[nn.Module]) -> bool:
    """Every parameter name of the experts stacks as a zero-copy view (what `stack_params` would take)."""
    named = [list(e.parameters()) for e in experts]
    return bool(named) and all(even_stride(list(ps)) is not None for ps in zip(*named))


# -- the grouped matmul -------------------------------------------------------------------------------------
def native_grouped_mm(x: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` runs without a host read for x's device and dtype: on the CPU (its loop reads
    the offsets where they already are) and on CUDA bf16 with the sm90 / sm100 kernel.  Elsewhere torch's own
    fallback copies the offsets to the host at every call; `grouped_mm` then loops itself, reading them once."""
    if not hasattr(torch, "_grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False   # the op's meta function (what `torch.compile` traces with) takes bf16 only (torch 2.13)
    if x.device.type == "cpu":
        return True
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] in (9, 10)
    return False


def grouped_mm(x_QD: torch.Tensor, w_EFD: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """y_QF: rows offs_E[e-1]:offs_E[e] of x times expert e's weight transposed (as `F.linear`), in one
    `torch._grouped_mm`; rows past the last offset are left unspecified."""
    return torch._grouped_mm(x_QD, w_EFD.transpose(-2, -1), offs=offs_E)


def segment_linear(x_QD: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None,
                   host_offs: Sequence[int]) -> torch.Tensor:
    """The same with the offsets on the host: `F.linear` per expert on its rows, with each expert's own weight and
    bias (as the expert modules call it; slices of the stacked view would give each expert's backward a
    zero-filled [E, F, D] gradient, or a stack and unbind per step); rows past the last offset are zeros."""
    parts, start = [], 0
    for e, end in enumerate(host_offs):
        parts.append(F.linear(x_QD[start:end], weights[e], None if biases is None else biases[e]))
        start = end
    parts.append(x_QD.new_zeros(x_QD.shape[0] - start, weights[0].shape[0]))
    return torch.cat(parts)


class GroupedExperts:
    """A rank's local experts of a recognised kind (`grouped_kind`) run as stacked weights on sorted rows."""

    def __init__(self, experts: Sequence[nn.Module], kind: str) -> None:
        self.experts, self.kind = experts, kind

    @classmethod
    def of(cls, experts: Sequence[nn.Module]) -> GroupedExperts | None:
        kind = grouped_kind(experts)
        return None if kind is None else cls(experts, kind)

    def native(self, x: torch.Tensor) -> bool:
        """Whether the grouped kernel runs rows of `x`'s device, dtype and width without a host read
        (`native_grouped_mm`, and `_grouped_mm`'s stride rule for these widths; the rows themselves are made
        contiguous by the call, so `x` may be any view: the received rows of an exchange are one)."""
        down = self.experts[0][2] if self.kind == "mlp" else self.experts[0].down_proj
        widths = (x.shape[-1], down.weight.shape[1])
        return native_grouped_mm(x) and all(w * x.element_size() % 16 == 0 for w in widths)

    def _projections(self) -> list[list[nn.Linear]]:
        """Both projections' linear layers, one per expert."""
        if self.kind == "mlp":
            return [[e[0] for e in self.experts], [e[2] for e in self.experts]]
        return [[e.gate_up_proj for e in self.experts], [e.down_proj for e in self.experts]]

    def __call__(self, x_QD: torch.Tensor, counts_E: torch.Tensor, expert_Q: torch.Tensor,
                 valid_Q1: torch.Tensor | None = None, host_counts: Sequence[int] | None = None) -> torch.Tensor:
        """out_QD: each pair's expert output (x's dtype).  x_QD: the pairs' rows sorted by expert; counts_E: how
        many pairs each expert runs (device; they need not cover every row); expert_Q: each pair's expert (any
        valid index where not used: only biases read it); valid_Q1 [Q, 1] bool: the pairs inside the counts,
        None when they cover every row; host_counts: the same counts on the host, which selects the segment loop.
        Without them: the grouped matmul where it is native (`native`: no host read), else the segment loop on the
        offsets read once."""
        x_QD = x_QD.contiguous()   # gathered rows already are: a no-op then
        offs_E = counts_E.cumsum(0).to(torch.int32)
        host_offs = None
        if host_counts is not None:
            host_offs = list(accumulate(host_counts))
        elif not self.native(x_QD):
            host_offs = offs_E.tolist()  # host sync: the segment loop's bounds (no native kernel here)
        if valid_Q1 is not None:  # masks the garbage input gradient the grouped matmul leaves on unused rows
            x_QD = torch.where(valid_Q1, x_QD, 0)

        def project(in_QD, linears):  # either projection, named as the first
            biased = linears[0].bias is not None
            if host_offs is not None:
                y_QF = segment_linear(in_QD, [m.weight for m in linears],
                                      [m.bias for m in linears] if biased else None, host_offs)
            else:
                y_QF = grouped_mm(in_QD, stack_params([m.weight for m in linears]), offs_E)
                if biased:
                    y_QF = y_QF + stack_params([m.bias for m in linears]).index_select(0, expert_Q)
            return y_QF if valid_Q1 is None else torch.where(valid_Q1, y_QF, 0)

        first, second = self._projections()
        h_QF = project(x_QD, first)
        if self.kind == "mlp":
            a_QI = F.gelu(h_QF, approximate=self.experts[0][1].approximate)  # the mlp's F is I
        else:
            gate_QI, up_QI = h_QF.chunk(2, dim=-1)
            a_QI = self.experts[0].act_fn(gate_QI) * up_QI
        return project(a_QI, second)
