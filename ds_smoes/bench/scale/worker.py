"""One expert-parallel rank of `python -m ds_smoes.bench scale` (started through the DeepSpeed launcher on
`ep_size` ranks; not meant to be run by hand).

Per model shape (ds_smoes.bench.scale.shapes) and dtype, ONE SMoESMoE layer at that shape (SwiGLU experts,
the shape's shared experts as a dense SwiGLU MLP beside it) runs fwd+bwd in eight variants that share
its expert weights; a variant is (router, dispatch):

    smoes/rank_once  topk/rank_once  smoes/stock  topk/stock
        the SMoES gate (soft scores given, adaptive bins recording, MI and bin-balance losses) and
        DeepSpeed's TopKGate, each routing with its own router (random init: near-uniform routes);
    profile/rank_once  profile/stock  uniform/rank_once  uniform/stock
        the SMoES gate with its routes replaced by drawn ones (ds_smoes.bench.scale.synthetic_routes): from
        the trained demo router's own-route statistics, or k distinct uniform experts.

With `--autoep`, four more variants run DeepSpeed's AutoEP layer at the same shape, on copies of the layer's router
and this rank's expert weights (`ds_smoes.bench.scale.autoep`).

Each round runs every variant once on the round's batch (variant order rotated round by round, a
barrier before each); a time is the slowest rank's.  Remote bytes are what each dispatch reported
(`MoECall.remote_bytes`, collected), summed over the ranks.  Rank 0 writes the raw figures as JSON.

Shapes: S tokens on this rank, B sequences, T positions, D hidden, K routes per token, E experts.
"""
from __future__ import annotations

from functools import partial

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ds_smoes.bench.scale.shapes import SHAPES, MoEShape
from ds_smoes.bench.simulate.model import RouterProfile
from ds_smoes.bench.scale.synthetic_routes import (OwnRouteModel, draw_modality_labels, draw_profile_routes,
                                             draw_uniform_routes)
from ds_smoes.core.config import SMoESConfig
from ds_smoes.moe.collector import RoutingCollector
from ds_smoes.moe.dispatchers import build_dispatcher
from ds_smoes.moe.gate import SMoESGate
from ds_smoes.parallel import distributed
from ds_smoes.parallel import console, expert_kernels

log0 = partial(console.log0, tag="bench")   # progress lines, rank 0 only

VARIANTS = ("smoes/rank_once", "topk/rank_once", "smoes/stock", "topk/stock",
            "profile/rank_once", "profile/stock", "uniform/rank_once", "uniform/stock",
            "profile/rank_once:modules")   # rank_once running its experts by the module loop, whatever auto chose
SEQUENCE = 256   # tokens per sequence: the MI loss is per sample
# a variant's dispatch part -> the config's dispatch name (`ds_smoes.moe.dispatchers`)
VARIANT_DISPATCH = {"rank_once": "rank_once", "stock": "deepspeed"}




class GivenRoutesGate(SMoESGate):
    """The SMoES gate (its probabilities, losses and statistics) with the chosen experts handed in: `given_SK`."""
    given_SK: torch.Tensor | None = None

    def select(self, probs_SE, inputs, valid_S):
        if self.given_SK is None or self.given_SK.shape[0] != probs_SE.shape[0]:
            raise RuntimeError("GivenRoutesGate: set given_SK [S, k] before each forward")
        return self.given_SK



def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ds_smoes.bench.scale.worker")
    p.add_argument("--shapes", nargs="+", required=True, choices=list(SHAPES))
    p.add_argument("--dtypes", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    p.add_argument("--tokens", type=int, required=True, help="tokens per rank")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--profile-json", type=Path, required=True,
                   help="RouterProfile as JSON (k, vision_share, own_routes_MJ)")
    p.add_argument("--vision-share", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--autoep", action="store_true", help="also DeepSpeed AutoEP's layer (ds_smoes.bench.scale.autoep)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)
    return p.parse_args(argv)


def shape_config(shape: MoEShape, ep_size: int, gate: str, dispatch: str) -> SMoESConfig:
    return SMoESConfig(num_experts=shape.num_experts, k=shape.k, ep_size=ep_size, num_bins=ep_size, gate=gate,
                       dispatch=dispatch, score_type="attention", binning="adaptive")


def companion_gate(layer, gate: str, cls=None):
    """A gate of the registry's kind `gate` (or of class `cls`) for `layer`, on the layer's config with that gate,
    sharing the layer's router weight and EP group: the variants of a benchmark route with one router."""
    from ds_smoes.moe.registry import build_gate

    cfg = layer.config.model_copy(update={"gate": gate})
    d = layer.gate.wg.weight.shape[1]
    out = build_gate(d, cfg) if cls is None else cls(d, cfg)
    out.wg.weight.data.copy_(layer.gate.wg.weight.data)
    if cfg.ep_size > 1:
        out._set_ep_group(layer.deepspeed_moe.ep_group)
    return out.to(layer.gate.wg.weight)   # the layer's device and dtype


def build(shape: MoEShape, ep_size: int, dtype: torch.dtype, seed: int):
    """The layer (SMoES gate, rank_once), the other gates sharing its experts, the shared-expert MLP."""
    from ds_smoes.hf.experts import GatedExpert
    from ds_smoes.moe.layer import SMoESMoE

    torch.manual_seed(seed)
    d = shape.hidden
    layer = SMoESMoE(d, GatedExpert(d, shape.expert_ffn, F.silu), shape_config(shape, ep_size, "smoes", "rank_once"))
    layer.set_deepspeed_parallelism()
    gen = torch.Generator().manual_seed(seed * 1009 + distributed.rank())
    with torch.no_grad():
        for p in layer.deepspeed_moe.experts.parameters():   # in place: a stacked expert storage stays stacked
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        layer.gate.wg.weight.copy_(torch.randn(layer.gate.wg.weight.shape, generator=gen) / d ** 0.5)
    gates = {"smoes": layer.gate, "topk": companion_gate(layer, "topk"), "given": companion_gate(layer, "smoes",
                                                                                                  GivenRoutesGate)}
    shared = GatedExpert(d, shape.expert_ffn * shape.shared_experts, F.silu) if shape.shared_experts else None
    modules = [layer, *gates.values(), *([shared] if shared is not None else [])]
    for m in modules:
        m.to(dtype)
        m.train()
    return layer, gates, shared


def install_gate(layer, gate, dispatch: str, kernel: str = "auto") -> None:
    """Route `layer` (an SMoESMoE) with `gate` and the dispatch named `dispatch` (a config name: deepspeed,
    rank_once), its experts run by `kernel` (configs are frozen: copies with the dispatch)."""
    gate.config = gate.config.model_copy(update={"dispatch": dispatch, "expert_kernel": kernel})
    layer.config = gate.config
    layer.dispatcher = build_dispatcher(gate.config.dispatch)   # the component, not only the config's name
    gate.slotless = layer.dispatcher.slotless(gate.drop_tokens)
    layer.deepspeed_moe.gate = gate


def use_variant(layer, gates: dict, variant: str, given: dict, batch_index: int) -> None:
    """Install the variant's router, dispatch and expert kernel (`router/dispatch[:kernel]`; default auto) on the
    layer."""
    router, rest = variant.split("/")
    dispatch, _, kernel = rest.partition(":")
    gate = gates[router] if router in ("smoes", "topk") else gates["given"]
    install_gate(layer, gate, VARIANT_DISPATCH[dispatch], kernel or "auto")
    if router in ("profile", "uniform"):
        gate.given_SK = given[router][batch_index]


def make_batches(shape: MoEShape, tokens: int, dtype: torch.dtype, model: OwnRouteModel, seed: int,
                 count: int = 2) -> tuple[list[dict], dict]:
    rank = distributed.rank()
    ep_size = distributed.world_size()
    gen = torch.Generator().manual_seed(seed * 7919 + rank)
    b = max(1, tokens // SEQUENCE)
    t = tokens // b
    batches, given = [], {"profile": [], "uniform": []}
    for _ in range(count):
        labels_S = draw_modality_labels(b * t, model.vision_share, gen)
        # soft scores leaning to the hard label (what the attention score carries)
        lean_S = 0.6 + 0.4 * torch.rand(b * t, generator=gen)
        vision_S = torch.where(labels_S == 1, lean_S, 1 - lean_S)
        scores_SM = torch.stack([1 - vision_S, vision_S], dim=-1)
        batches.append({"x_BTD": torch.randn(b, t, shape.hidden, generator=gen).to(dtype),
                        "labels_BT": labels_S.reshape(b, t), "scores_BTM": scores_SM.reshape(b, t, 2),
                        "probe_BTD": torch.randn(b, t, shape.hidden, generator=gen).to(dtype)})
        given["profile"].append(draw_profile_routes(model, labels_S, shape.k, shape.num_experts, ep_size, gen))
        given["uniform"].append(draw_uniform_routes(b * t, shape.k, shape.num_experts, gen))
    return batches, given


def fwd_bwd(layer, shared, batch: dict) -> int:
    """One fwd+bwd; returns the remote bytes the dispatch reported."""
    x_BTD = batch["x_BTD"].detach().requires_grad_(True)
    with RoutingCollector([layer], stats=False) as collector:
        out_BTD, l_aux, _ = layer(x_BTD, modality_labels=batch["labels_BT"], modality_scores=batch["scores_BTM"])
    if shared is not None:
        out_BTD = out_BTD + shared(x_BTD)
    ((out_BTD.float() * batch["probe_BTD"].float()).sum() + l_aux).backward()
    [[call]] = collector.take()
    return call.remote_bytes


def measure(shape: MoEShape, dtype_name: str, args, model: OwnRouteModel) -> dict:
    import torch.distributed as dist

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    t0 = time.time()
    layer, gates, shared = build(shape, distributed.world_size(), dtype, args.seed)
    batches, given = make_batches(shape, args.tokens, dtype, model, args.seed)
    params = [p for m in (layer, *gates.values(), *([shared] if shared else [])) for p in m.parameters()]
    variants = list(VARIANTS)
    autoep = None
    if args.autoep:
        from ds_smoes.bench.scale.autoep import VARIANTS as AUTOEP_VARIANTS
        from ds_smoes.bench.scale.autoep import AutoEPBench

        autoep = AutoEPBench(layer, shape, distributed.world_size(), distributed.rank(), dtype, GivenRoutesGate)
        params += autoep.parameters()
        variants += AUTOEP_VARIANTS
    times_QX = torch.zeros(args.repeats, len(variants), dtype=torch.float64)   # Q = timed rounds, X = variants
    bytes_X = torch.zeros(len(variants), dtype=torch.float64)
    for r in range(args.warmup + args.repeats):
        bi = r % len(batches)
        for i in range(len(variants)):
            v = (r + i) % len(variants)
            on_autoep = variants[v].startswith("autoep")
            if not on_autoep:
                use_variant(layer, gates, variants[v], given, bi)
            if distributed.is_distributed():
                dist.barrier()
            start = time.perf_counter()
            sent = (autoep.fwd_bwd(variants[v], batches[bi], given["profile"][bi], shared) if on_autoep
                    else fwd_bwd(layer, shared, batches[bi]))
            elapsed = time.perf_counter() - start
            for p in params:
                p.grad = None
            if r >= args.warmup:
                times_QX[r - args.warmup, v] = elapsed
                bytes_X[v] += sent
        log0(f"  {shape.key} {dtype_name}: round {r + 1}/{args.warmup + args.repeats} "
             f"({'warmup' if r < args.warmup else 'timed'}, {time.time() - t0:.0f}s)")
    distributed.world_max_(times_QX)
    distributed.world_sum_(bytes_X)
    tokens_all = args.tokens * distributed.world_size() * args.repeats
    return {"shape": shape.key, "dtype": dtype_name, "tokens_per_rank": args.tokens,
            "seconds": {key: times_QX[:, v].tolist() for v, key in enumerate(variants)},
            "remote_bytes_per_token": {key: float(bytes_X[v]) / tokens_all for v, key in enumerate(variants)},
            # what "auto" chose for the layer's experts on rank 0 (key -> kernel), with the probe's times
            "expert_kernels": [{"key": [str(part) for part in key], "kernel": kernel, "seconds": seconds}
                               for key, (kernel, seconds) in expert_kernels.chosen().items()],
            "wall_seconds": time.time() - t0}


def main(argv=None) -> int:
    from ds_smoes.bench.runs import worker_main

    args = parse_args(argv)
    return worker_main(args.out, lambda: measure_all(args))


def measure_all(args) -> dict:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    raw = json.loads(args.profile_json.read_text())
    profile = RouterProfile(raw["k"], raw["vision_share"], tuple(tuple(row) for row in raw["own_routes_MJ"]))
    model = OwnRouteModel.fit(profile)
    if args.vision_share is not None:
        model = OwnRouteModel(model.mean_M, model.rho_M, args.vision_share, model.source_k)
    out = {"setup": {"ep_size": distributed.world_size(), "tokens_per_rank": args.tokens, "autoep": args.autoep,
                     "warmup": args.warmup, "repeats": args.repeats, "threads_per_rank": torch.get_num_threads(),
                     "seed": args.seed, "vision_share": model.vision_share,
                     "own_route_model": {"mean_M": model.mean_M, "rho_M": model.rho_M, "source_k": model.source_k}},
           "results": []}
    for key in args.shapes:
        for dtype_name in args.dtypes:
            log0(f"{SHAPES[key].label}: {dtype_name}, {args.tokens} tokens per rank")
            out["results"].append(measure(SHAPES[key], dtype_name, args, model))
    return out


if __name__ == "__main__":
    sys.exit(main())
