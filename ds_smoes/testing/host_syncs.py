"""Counting device-to-host synchronisations, on any device, CPU included.

On a GPU each of these stalls the host until the stream has caught up: reading a tensor's value
(`.item()`, `int(t)`, `bool(t)`, `.tolist()`, `.numpy()`, `.cpu()` of a device tensor) and every op
whose output *shape* depends on tensor values (`nonzero`, boolean-mask indexing, `masked_select`,
`unique`, `bincount`, `repeat_interleave` without `output_size`).  On the CPU none of them stalls
anything, and `.tolist()` / `.cpu()` dispatch no op at all, so a profiler sees nothing; this counter
records the same events there, which lets a CPU test pin the sync budget a GPU run will pay.

    with count_host_syncs() as syncs:
        out, l_aux, _ = layer(x, modality_labels=labels)
        (out.sum() + l_aux).backward()
    syncs.total, syncs.by_op, syncs.where   # count, per op, per (op, ds_smoes source line)

`ops=("values",)` counts value reads only (what a GPU profiler calls a sync); the default counts data-
dependent shapes too, which need the same round trip on a GPU.
"""
from __future__ import annotations

import collections
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten

# ops that read a value back to the host
VALUE_OPS = frozenset({_aten._local_scalar_dense.default, _aten.equal.default, _aten.is_nonzero.default})
# ops whose output shape depends on values: the host waits for the values to size the output
SHAPE_OPS = frozenset({
    _aten.nonzero.default, _aten.nonzero_static.default, _aten.masked_select.default,
    _aten._unique.default, _aten._unique2.default, _aten.unique_dim.default, _aten.unique_consecutive.default,
    _aten.bincount.default, _aten.repeat_interleave.Tensor, _aten.argwhere.default,
})
# indexing with a boolean mask (x[mask], x[mask] = v): a nonzero inside
_INDEX_OPS = frozenset({_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default,
                        _aten._index_put_impl_.default})


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


# Python-level reads that dispatch no op on the CPU (they do on a GPU: a copy to the host)
_PY_READS = ("tolist", "numpy", "cpu")


@dataclass
class SyncCount:
    by_op: collections.Counter = field(default_factory=collections.Counter)
    where: collections.Counter = field(default_factory=collections.Counter)

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def record(self, name: str) -> None:
        self.by_op[name] += 1
        self.where[(name, _caller())] += 1

    def report(self) -> str:
        lines = [f"{self.total} host syncs"]
        lines += [f"  {n:3d}  {op}  {loc}" for (op, loc), n in self.where.most_common()]
        return "\n".join(lines)


def _caller() -> str:
    """The innermost frame outside torch and this module (file:line function)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename.replace("\\", "/")
        if "/torch/" in path or path.endswith("host_syncs.py"):
            continue
        return f"{'/'.join(path.split('/')[-3:])}:{frame.lineno} {frame.name}"
    return "?"


class _Counter(TorchDispatchMode):
    def __init__(self, count: SyncCount, ops: frozenset) -> None:
        super().__init__()
        self.count, self.ops = count, ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.ops and not (func is _aten.repeat_interleave.Tensor and kwargs.get("output_size")):
            self.count.record(str(func.overloadpacket.__name__))
        elif func in _INDEX_OPS and self.ops is not VALUE_OPS and _has_bool_index(args):
            self.count.record("nonzero")  # a boolean mask index: the CPU kernel hides the nonzero a GPU runs
        elif func is _aten._to_copy.default and args and args[0].device.type != "cpu" \
                and torch.device(kwargs.get("device") or args[0].device).type == "cpu":
            self.count.record("_to_copy(cpu)")
        return func(*args, **(kwargs or {}))


@contextmanager
def count_host_syncs(values_only: bool = False):
    """Count host syncs inside the block (this thread; autograd's backward runs in the caller's thread on
    the CPU and is counted too).  Yields a `SyncCount`."""
    count = SyncCount()
    ops = VALUE_OPS if values_only else VALUE_OPS | SHAPE_OPS
    originals = {name: getattr(torch.Tensor, name) for name in _PY_READS}

    def wrap(name):
        original = originals[name]

        def read(self, *args, **kwargs):
            count.record(name)  # on the CPU it stands in for the copy to the host the same call makes on a GPU
            return original(self, *args, **kwargs)
        return read

    for name in _PY_READS:
        setattr(torch.Tensor, name, wrap(name))
    try:
        with _Counter(count, ops):
            yield count
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)

