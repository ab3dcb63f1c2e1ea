"""What the attention modality score costs on top of the attention itself (issue 18, item 1).

`measure_attention_score(T, heads, head_dim, dtype, repeats)` times, and measures the peak memory of, one
causal self-attention forward + backward through the fused kernel (`F.scaled_dot_product_attention`,
`is_causal=True`), alone and together with the score's M~ = A @ M computed as in training
(`head_mean_attention_mix`, no gradient: the score is detached).  Optionally also with the score from the
materialised probabilities (the path used before; B*A*T*T float32 several times over: keep T small).

Peak memory is measured, not estimated: on CUDA `torch.cuda.max_memory_allocated` above what was allocated
before the run; on the CPU the allocation and free events of torch's profiler (`profile_memory=True`: every
tensor allocation of the CPU allocator, kernels' scratch buffers included, each with its size), summed in time
order, whose running maximum is the peak above the start.  Allocations outside torch's allocator (oneDNN or
OpenMP internals) are not seen; the inputs, made before, are not counted.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F

from ds_smoes.core.attention_score import head_mean_attention_mix


def peak_allocated_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated by torch while `fn()` runs, above what was allocated when it started (see the
    module doc: CUDA's allocator statistics, or the CPU allocator's events in torch's profiler)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # the raw events: the summary (prof.events()) folds allocations into the ops that made them
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_attention_score(T: int, heads: int = 16, head_dim: int = 64, dtype: torch.dtype = torch.float32,
                            repeats: int = 3, batch: int = 1, device: str = "cpu", padding: int = 0,
                            materialised: bool = False, seed: int = 0) -> dict:
    """Causal attention forward + backward alone vs with the attention score, at sequence length T.

    `padding`: left-padding tokens in every sequence (the score then excludes them through its validity column;
    the attention itself stays unmasked, as the timing is of the score).  Returns a dict: T, heads, head_dim,
    dtype, device, the fastest of `repeats` runs in seconds, `time_attention`, `time_with_score` (and
    `time_with_materialised`; `cpu_time_*` the same in this process's CPU seconds, all threads: steadier on a
    loaded machine), the peak bytes `peak_attention`, `peak_with_score` (and `peak_with_materialised`), and the ratios `time_ratio`,
    `peak_mem_ratio` (with score / alone; `*_materialised` likewise), `method` (how peak memory was measured).
    """
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    shape = (batch, heads, T, head_dim)
    q, k, v = (torch.randn(shape, generator=g, device=dev, dtype=dtype).requires_grad_() for _ in range(3))
    values_BUM = torch.softmax(torch.randn(batch, T, 2, generator=g, device=dev), -1)
    valid_BU = (torch.arange(T, device=dev) >= padding).expand(batch, T)

    def attention(score=None):
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if score is not None:
            score()                  # as in training: in the forward, while the attention's activations live
        y.float().sum().backward()
        q.grad = k.grad = v.grad = None

    def fused_score():
        head_mean_attention_mix(q.detach(), k.detach(), values_BUM, valid_BU, causal=True)

    def materialised_score():
        from ds_smoes.hf.attention import head_mean_attention_probs   # the layer above core: the old path
        mask = valid_BU[:, None, None, :] & torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        torch.bmm(head_mean_attention_probs(q.detach(), k.detach(), mask, None, True), values_BUM)

    def with_score():
        attention(fused_score)

    def with_materialised():
        attention(materialised_score)

    variants = {"attention": attention, "with_score": with_score}
    if materialised:
        variants["with_materialised"] = with_materialised
    out = dict(T=T, heads=heads, head_dim=head_dim, batch=batch, dtype=str(dtype).removeprefix("torch."),
               device=str(dev), repeats=repeats,
               method=("torch.cuda.max_memory_allocated above the start" if dev.type == "cuda" else
                       "torch.profiler CPU allocator events (profile_memory), running sum's maximum"))
    for name, fn in variants.items():
        fn()                                                    # warm-up (kernel selection, allocator)
        times, cpu_times = [], []
        for _ in range(repeats):
            _sync(dev)
            start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            _sync(dev)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        out[f"time_{name}"] = min(times)   # the least disturbed by other load on the machine
        out[f"cpu_time_{name}"] = min(cpu_times)
        out[f"peak_{name}"] = peak_allocated_bytes(fn, dev)
    out["time_ratio"] = out["time_with_score"] / out["time_attention"]
    out["cpu_time_ratio"] = out["cpu_time_with_score"] / out["cpu_time_attention"]
    out["peak_mem_ratio"] = out["peak_with_score"] / out["peak_attention"]
    if materialised:
        out["time_ratio_materialised"] = out["time_with_materialised"] / out["time_attention"]
        out["peak_mem_ratio_materialised"] = out["peak_with_materialised"] / out["peak_attention"]
    return out
