"""One expert-parallel rank of `python -m ds_smoes.bench infer --shapes` (started through the DeepSpeed launcher;
not meant to be run by hand).

Per shape: the block model (`ds_smoes.bench.infer.block`), its five variants sharing its weights, and the
workloads, each rank with its own sequences (attention data-parallel, the MoE expert-parallel):

- prefill (P, B): B sequences of P image tokens + 64 text tokens, one forward (logits of the last position
  only, as a server computes them); each image token gets its own feature vector (`ImageFeatures`), as from
  a vision tower and projector, whose cost is not part of the block;
- decode (b): `--decode-steps` steps of one text token for each of b sequences, after a KV cache of
  `--decode-context` positions (per token of a sequence: the step time).

Each round runs every variant (order rotated round by round) on every workload, a barrier before each; a
time is the slowest rank's.  Routes are drawn once per (variant, workload) (`Routes`); remote bytes are
what the dispatch reported (`MoECall.remote_bytes`, collected), summed over the ranks, per measurement.
After the rounds, one more run per (variant, workload) under the memory profiler gives its peak allocation
on rank 0 above what was allocated before (`ds_smoes.bench.scale.attention.peak_allocated_bytes`).

Shapes: Q timed rounds, X (variant, workload) pairs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch

from ds_smoes.bench.infer import block as B
from ds_smoes.bench.infer.shapes import BLOCK_SHAPES
from ds_smoes.bench.scale.synthetic_routes import OwnRouteModel
from ds_smoes.bench.simulate.model import RouterProfile
from ds_smoes.moe.collector import RoutingCollector
from ds_smoes.parallel import console, distributed

log0 = partial(console.log0, tag="bench")   # progress lines, rank 0 only
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ds_smoes.bench.infer.block_worker")
    p.add_argument("--shapes", nargs="+", required=True, choices=list(BLOCK_SHAPES))
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--prefill", nargs="+", required=True, help="IMAGE_TOKENS:BATCH per prefill workload")
    p.add_argument("--decode-batches", nargs="+", type=int, required=True)
    p.add_argument("--decode-context", type=int, required=True)
    p.add_argument("--decode-steps", type=int, default=4)
    p.add_argument("--variants", nargs="+", default=list(B.VARIANTS), choices=list(B.VARIANTS))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile-json", type=Path, required=True, help="RouterProfile as JSON (k, vision_share, "
                   "own_routes_MJ)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)
    return p.parse_args(argv)


def workloads(args) -> list[dict]:
    out = []
    for item in args.prefill:
        image, _, batch = item.partition(":")
        out.append({"kind": "prefill", "image_tokens": int(image), "batch": int(batch),
                    "tokens_per_rank": int(batch) * (int(image) + B.TEXT_TOKENS)})
    for batch in args.decode_batches:
        out.append({"kind": "decode", "batch": batch, "context": args.decode_context, "steps": args.decode_steps,
                    "tokens_per_rank": batch * args.decode_steps})
    return out


class Workload:
    """One workload's inputs on this rank, and per routed variant its drawn routes (one tensor per forward)."""

    def __init__(self, spec: dict, model, shape, dtype: torch.dtype, routes: B.Routes, variants: list[str],
                 generator: torch.Generator, device: torch.device) -> None:
        self.spec, self.device = spec, device
        self.features = None
        if spec["kind"] == "prefill":
            ids_BT, labels_S = B.prefill_inputs(spec["batch"], spec["image_tokens"], generator)
            self.steps = [ids_BT]
            labels = [labels_S]
            self.kv = None
            self.features = B.ImageFeatures.draw(model, ids_BT, generator)
        else:
            self.steps = B.decode_inputs(spec["batch"], spec["steps"], generator)
            labels = [torch.zeros(spec["batch"], dtype=torch.long)] * spec["steps"]
            self.kv = tuple(t.to(device) for t in B.decode_cache_kv(shape, spec["batch"], spec["context"], dtype,
                                                                    generator))
        self.steps = [ids.to(device) for ids in self.steps]   # drawn on the host (seeded), used on the device
        self.given = {v: [routes.draw(v, l_S, generator).to(device) for l_S in labels]
                      for v in variants if v in B.ROUTED}

    @torch.inference_mode()
    def run(self, model, variants: B.BlockVariants, variant: str, images: B.ImageFeatures) -> int:
        """The workload's forwards under `variant`; the remote bytes this rank's dispatches sent."""
        images.set(self.steps[0] if self.features is not None else None, self.features)
        sent = 0
        cache = None if self.kv is None else B.fresh_cache(self.kv)
        context = 0 if self.kv is None else self.kv[0].shape[2]
        for i, ids_BT in enumerate(self.steps):
            if variant in self.given:
                variants.give(self.given[variant][i])
            mask_BU = torch.ones(ids_BT.shape[0], context + (i + 1) * ids_BT.shape[1], dtype=torch.long,
                                 device=self.device)
            extra = {} if cache is None else {"past_key_values": cache}
            with RoutingCollector(variants.moe_layers(), stats=False) as collector:
                model(input_ids=ids_BT, attention_mask=mask_BU, logits_to_keep=1, **extra)
            sent += sum(call.remote_bytes for calls in collector.take() for call in calls)
        return sent


def measure(key: str, args, router: OwnRouteModel) -> dict:
    import torch.distributed as dist

    shape, dtype = BLOCK_SHAPES[key], DTYPES[args.dtype]
    ep, rank = distributed.world_size(), distributed.rank()
    device = distributed.collective_device()   # NCCL takes device tensors only: the block lives there
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)   # a kernel's end, not its launch
    t0 = time.time()
    model = B.build_block_model(shape, ep, rank, dtype, args.seed, device=device)
    variants = B.BlockVariants(model, shape, args.seed)
    images = B.ImageFeatures(model)
    built = time.time() - t0
    routes = B.Routes(router, shape.moe.k, shape.moe.num_experts, ep)
    generator = torch.Generator().manual_seed(args.seed * 7919 + rank)
    specs = workloads(args)
    loads = [Workload(spec, model, shape, dtype, routes, args.variants, generator, device) for spec in specs]
    names = list(args.variants)
    per = len(loads)
    # Q = timed rounds; X = (variant, workload) pairs, variant-major: the columns of the figure table
    times_QX = torch.zeros(args.repeats, len(names) * per, dtype=torch.float64)
    bytes_X = torch.zeros(len(names) * per, dtype=torch.float64)
    log0(f"{shape.label}: built in {built:.0f}s ({args.dtype}, {ep} EP ranks)")
    for r in range(args.warmup + args.repeats):
        for i in range(len(names)):
            x = (r + i) % len(names)
            variants.install(names[x])
            for w, load in enumerate(loads):
                if distributed.is_distributed():
                    dist.barrier()
                sync()
                start = time.perf_counter()
                sent = load.run(model, variants, names[x], images)
                sync()
                elapsed = time.perf_counter() - start
                if r >= args.warmup:
                    times_QX[r - args.warmup, x * per + w] = elapsed
                    bytes_X[x * per + w] += sent
        log0(f"  {shape.key} {args.dtype}: round {r + 1}/{args.warmup + args.repeats} "
             f"({'warmup' if r < args.warmup else 'timed'}, {time.time() - t0:.0f}s)")
    distributed.world_max_(times_QX)
    distributed.world_sum_(bytes_X)
    peaks = {}
    if not args.no_memory:
        from ds_smoes.bench.scale.attention import peak_allocated_bytes

        for x, name in enumerate(names):
            variants.install(name)
            peaks[name] = [peak_allocated_bytes(partial(load.run, model, variants, name, images), device)
                           for load in loads]
        log0(f"  {shape.key}: peak memory measured ({time.time() - t0:.0f}s)")
    return {"shape": key, "dtype": args.dtype, "workloads": specs, "build_seconds": built,
            "seconds": {name: times_QX[:, x * per:(x + 1) * per].tolist() for x, name in enumerate(names)},
            "remote_bytes": {name: (bytes_X[x * per:(x + 1) * per] / args.repeats).tolist()
                             for x, name in enumerate(names)},
            "peak_bytes_rank0": peaks, "wall_seconds": time.time() - t0}


def main(argv=None) -> int:
    from ds_smoes.bench.runs import worker_main

    args = parse_args(argv)
    return worker_main(args.out, lambda: measure_all(args))


def measure_all(args) -> dict:
    out = {"setup": {"ep_size": distributed.world_size(), "dtype": args.dtype, "warmup": args.warmup,
                     "repeats": args.repeats, "threads_per_rank": torch.get_num_threads(), "seed": args.seed,
                     "decode_steps": args.decode_steps, "decode_context": args.decode_context},
           "results": []}
    raw = json.loads(args.profile_json.read_text())
    router = OwnRouteModel.fit(RouterProfile(raw["k"], raw["vision_share"],
                                             tuple(tuple(row) for row in raw["own_routes_MJ"])))
    for key in args.shapes:
        out["results"].append(measure(key, args, router))
    return out


if __name__ == "__main__":
    sys.exit(main())
