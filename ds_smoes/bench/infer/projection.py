"""From one measured decoder block to the whole model at 2..64 EP ranks (docs/bench.md, "inference at scale").

Per variant, one MoE decoder layer costs its **compute** plus its **communication**:

    layer_s(R) = compute_s + comm_s(R)
    comm_s(R)  = 2 * latency + bytes_per_token(R) * tokens_per_rank / bandwidth

- compute_s: the block's measured time at 2 EP ranks (the slowest rank's median; its own 2-rank exchange,
  over shared memory on a CPU machine, is inside it).  Per rank it does not change with R: each rank serves
  its own sequences (attention data-parallel) and, with balanced routes, runs as many expert rows at any R.
- comm_s: two all-to-alls per MoE layer (dispatch and combine), each paying the link's `latency` once;
  `bytes_per_token` counts both directions (what a rank sends and receives back per token of its own), so
  the bytes over the link's per-direction `bandwidth` are the time of the two (sent and received overlap).
- bytes_per_token(R), per the simulation's model of the dispatch (`ds_smoes.bench.simulate.model`): rank_once
  2 * D * b * E[remote ranks] from the router's own-route statistics (smoes: the trained router's
  histogram; hard: every route in the token's modality's experts; smoes-bin1: one rank per token); DeepSpeed's
  stock dispatch 2 * D * b * k * lambda * (1 - 1/R), lambda (capacity over the mean expert load) fitted to the
  bytes measured at 2 ranks and held there (favourable to the stock dispatch: a dropless capacity grows with R).
  The dense block sends nothing.

The whole model: `moe_layers` such layers plus `layers - moe_layers` dense ones (the dense variant's measured
block time).  Prefill latency = the sum over layers; decode throughput of the EP group = R * b tokens per
step / the step's sum over layers (each rank decodes its own b sequences).  Not modelled: the embedding and
the LM head, overlap of communication with compute, the vision tower, pipeline or tensor parallelism.

Shapes: R EP ranks, E experts, K routes per token, D hidden.
"""
from __future__ import annotations

from dataclasses import dataclass

from ds_smoes.bench.simulate.model import (RouterProfile, bin_limited_figures, capacity_ratio_from_bytes,
                                           rank_once_bytes_per_token, rank_once_figures, stock_bytes_per_token)

EP_SIZES = (2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Interconnect:
    key: str
    bandwidth_gbps: float     # GB/s per GPU and direction that an all-to-all achieves
    latency_us: float         # one all-to-all's fixed cost
    note: str


INTERCONNECTS = (
    Interconnect("nvlink", 300.0, 15.0, "NVLink-class (H100 SXM NVLink 4: 450 GB/s per direction peak, about 2/3 of it "
                 "in an all-to-all; 15 us per all-to-all)"),
    Interconnect("infiniband", 40.0, 30.0, "InfiniBand-class (NDR 400 Gb/s per GPU: 50 GB/s peak, 40 GB/s achieved; "
                 "30 us per all-to-all)"),
)


def hard_profile(k: int, vision_share: float) -> RouterProfile:
    """Hard modality routing: all k routes in the token's own modality's experts."""
    own = tuple([0.0] * k + [1.0])
    return RouterProfile(k, vision_share, (own, own))


def bytes_per_token(variant: str, ep_size: int, num_experts: int, k: int, hidden: int, element_size: int,
                    smoes: RouterProfile, capacity_ratio: float, vision_share: float | None = None) -> float:
    """Expected remote bytes per token (both directions) of one MoE layer at `ep_size` ranks, for tokens of which
    `vision_share` are vision (default: the router profile's mix; the modality groups follow the profile)."""
    if variant == "dense":
        return 0.0
    if variant == "topk":
        return stock_bytes_per_token(k, capacity_ratio, ep_size, hidden, element_size)
    if variant == "smoes-bin1":
        figures = bin_limited_figures(k, num_experts, ep_size)
    else:
        profile = smoes if variant == "smoes" else hard_profile(k, smoes.vision_share)
        figures = rank_once_figures(profile, num_experts, ep_size, vision_share)
    return rank_once_bytes_per_token(figures.remote_ranks_per_token, hidden, element_size)


def comm_seconds(bytes_per_token_: float, tokens_per_rank: int, link: Interconnect) -> float:
    """Dispatch + combine of one MoE layer on `link` (module docstring)."""
    return 2.0 * link.latency_us * 1e-6 + bytes_per_token_ * tokens_per_rank / (link.bandwidth_gbps * 1e9)


def fitted_capacity_ratio(measured_bytes_per_token: float, k: int, hidden: int, element_size: int,
                          ep_size: int = 2) -> float:
    """lambda of the stock dispatch from its bytes measured at `ep_size` ranks."""
    return capacity_ratio_from_bytes(measured_bytes_per_token, k, ep_size, hidden, element_size)


@dataclass(frozen=True)
class ModelLayers:
    layers: int
    moe_layers: int


def model_seconds(moe_layer_s: float, dense_layer_s: float, layers: ModelLayers) -> float:
    return layers.moe_layers * moe_layer_s + (layers.layers - layers.moe_layers) * dense_layer_s


def project(compute_s: dict[str, float], bytes_fn, tokens_per_rank: int, layers: ModelLayers, ep_size: int,
            link: Interconnect) -> dict[str, float]:
    """Whole-model seconds per variant at `ep_size` on `link`: `compute_s` the measured block seconds per variant
    (the dense one's for the dense layers), `bytes_fn(variant, ep_size)` the bytes per token."""
    dense_s = compute_s["dense"]
    out = {}
    for variant, block_s in compute_s.items():
        comm = 0.0 if variant == "dense" else comm_seconds(bytes_fn(variant, ep_size), tokens_per_rank, link)
        out[variant] = model_seconds(block_s + comm, dense_s, layers)
    return out


def breakeven_bandwidth(compute_s: dict[str, float], bytes_fn, tokens_per_rank: int, ep_size: int,
                        variant: str = "smoes", reference: str = "topk") -> dict:
    """Where `variant` is faster than `reference` at `ep_size`, as a link bandwidth: {"faster": "below", "gbps": B}
    when it costs more compute but sends fewer bytes (faster on links slower than B GB/s); "always" (no more
    compute, no more bytes), "never" (more compute, no fewer bytes) or "above" (less compute, more bytes: faster
    on links faster than B).  Latency is the same for both (two all-to-alls each)."""
    extra_s = compute_s[variant] - compute_s[reference]
    saved_bytes = (bytes_fn(reference, ep_size) - bytes_fn(variant, ep_size)) * tokens_per_rank
    if extra_s <= 0.0 and saved_bytes >= 0.0:
        return {"faster": "always", "gbps": None}
    if extra_s > 0.0 and saved_bytes <= 0.0:
        return {"faster": "never", "gbps": None}
    return {"faster": "below" if extra_s > 0.0 else "above", "gbps": saved_bytes / extra_s / 1e9}


def crossover(compute_s: dict[str, float], bytes_fn, tokens_per_rank: int, layers: ModelLayers, link: Interconnect,
              ep_sizes, variant: str = "smoes", reference: str = "topk") -> int | None:
    """The smallest EP size at which `variant`'s projected time is below `reference`'s, or None."""
    for ep in ep_sizes:
        t = project(compute_s, bytes_fn, tokens_per_rank, layers, ep, link)
        if t[variant] < t[reference]:
            return ep
    return None
