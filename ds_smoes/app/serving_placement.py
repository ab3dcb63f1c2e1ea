"""Expert placement for serving engines: physical-to-logical maps, replicas, and a serving-load model.

Serving engines with expert parallelism (SGLang `--init-expert-location`, DeepSeek's EPLB, vLLM's
EPLB state) describe a placement with three maps per MoE layer (docs/serving.md has the formats):

- `phy2log_LP`: the logical expert held by physical slot p; slot p lives on rank p // (P / R), so
  every rank has the same number of slots;
- `log2phy_LEQ`: the slots holding logical expert e, ascending, padded with -1
  (Q = the most copies any expert has in any layer);
- `logcnt_LE`: how many copies expert e has.

Base placements (every expert once, n = E / R per rank):

- **bins**: bin b's experts on rank b * R // num_bins, as `core.placement` plans it; an expert
  already on its bin's rank keeps its physical id (`plan_physical`), so a bin-ordered export is
  served as it is stored;
- **linear**: expert e on rank e // n (slot e);
- **round_robin**: expert e on rank e % R (local slot e // R);
- **eplb**: load only, its own replicas (`eplb_physical`, DeepSeek's EPLB idea in our words): copies
  first (each extra slot to the expert with the highest load per copy that has fewer than R copies;
  ties: lower id), then the copies, heaviest first (load / copies; ties: lower id), each onto the rank
  with the least packed load that has a free slot and no copy of it (ties: lower rank).

`app.placement_search` searches placements on measured routes, from these as starting points.

**Replicas** for bins, linear and round-robin (`redundant_experts`, a multiple of R: every rank gets
s = redundant / R extra slots, after its n base slots).  Greedy, one copy at a time: the expert with the
highest load per copy (load_E / copies_E, ties by lower id) among those that can still be copied gets a
copy on the rank that lacks it, has a free extra slot and has the least load, where a rank's load is the
sum over its slots of load_E / copies_E (ties by lower rank).  Never two copies of one expert on one
rank; at most R copies of an expert, so redundant_experts <= E * (R - 1).

**Serving-load model** (`figures_on_routes`; `simulate_serving` draws the routes first), per MoE layer: a
trace of S tokens, a share of them vision.  Replayed (`replay_routes`, where per-token routes were
measured): each token of modality m is a measured token of that modality drawn uniformly with
replacement, with its whole expert set (the experts it used together).  Sampled (`sample_routes`,
where only the load is known): a token of modality m draws its k distinct experts with
`torch.multinomial` (without replacement) from load_ME[m] normalised (an expert's inclusion
probability follows its load, not exactly proportionally; the co-activation of experts is lost).
Every token's home rank is uniform over the R ranks, independent of its routes (computed exactly, not
sampled).  A route
runs on the copy on the token's home rank if there is one (as SGLang's static dispatch picks the
same-GPU copy), otherwise its copies share it evenly (each takes 1/copies of the route; for traffic,
each route picks one of its copies uniformly, independently of the token's other routes).  Figures:

- max / mean rank load: the busiest rank's routes over the mean (1.0 = perfectly even);
- remote ranks per token, E[number of ranks other than home that hold a route of the token];
- cross-rank rate: P(the token has at least one remote route);
- remote bytes per token for the rank_once dispatch (a token goes once to each remote rank holding
  one of its experts and comes back once): 2 * D * element_bytes * remote ranks per token.

Shapes: L MoE layers, E experts (logical ids), P physical slots, R ranks, M modalities (0 text,
1 vision), S tokens, K routes per token, Q replicas of one expert (padded).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ds_smoes.core.errors import ConfigError
from ds_smoes.core.placement import plan_physical

PLACEMENTS = ("bins", "linear", "round_robin", "eplb")
TRACES = {"image_heavy": 0.8, "mixed": 0.5, "text_heavy": 0.1}   # trace -> share of vision tokens


class PlacementError(ConfigError):
    """A serving placement (phy2log / log2phy / logcnt) is malformed or breaks a placement rule."""


# -- base placements --------------------------------------------------------------------------------
def base_physical(kind: str, num_experts: int, num_ranks: int, bin_E: torch.Tensor | None = None,
                  physical_E: torch.Tensor | None = None, num_bins: int | None = None) -> torch.Tensor:
    """physical_E of a base placement (every expert once): expert e's slot, slot p on rank p // (E / R)."""
    if num_ranks < 1 or num_experts % num_ranks:
        raise PlacementError(f"{num_experts} experts do not split evenly over {num_ranks} ranks: "
                             "choose a number of ranks that divides the number of experts")
    n = num_experts // num_ranks
    e_E = torch.arange(num_experts)
    if kind == "linear":
        return e_E
    if kind == "round_robin":
        return (e_E % num_ranks) * n + e_E // num_ranks
    if kind == "bins":
        if bin_E is None or num_bins is None:
            raise PlacementError("the bins placement needs bin_E and num_bins")
        if num_bins % num_ranks:
            raise PlacementError(f"{num_bins} bins cannot be placed whole on {num_ranks} ranks: the number of "
                                 "ranks must divide the number of bins")
        current_E = e_E if physical_E is None else physical_E.long().cpu()
        return plan_physical(bin_E.long().cpu(), current_E, num_bins, num_ranks)
    raise PlacementError(f"unknown placement {kind!r}: one of {PLACEMENTS[:3]} (eplb plans its own replicas: "
                         "plan_serving)")


def phy2log_of(physical_E: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: phy2log_P[physical_E[e]] = e."""
    phy2log_P = torch.empty_like(physical_E.long())
    phy2log_P[physical_E.long()] = torch.arange(physical_E.numel())
    return phy2log_P


def add_replicas(phy2log_P: torch.Tensor, load_E: torch.Tensor, num_ranks: int,
                 redundant_experts: int) -> torch.Tensor:
    """Base phy2log_P (n slots per rank, every expert once) -> E + redundant_experts slots with the hottest
    experts copied (rule in the module docstring).  Rank r's slots: its n base experts, then its s copies."""
    num_experts = phy2log_P.numel()
    if redundant_experts < 0 or redundant_experts % num_ranks:
        raise PlacementError(f"redundant_experts={redundant_experts} must be a non-negative multiple of the "
                             f"{num_ranks} ranks (every rank holds the same number of physical slots)")
    if redundant_experts > num_experts * (num_ranks - 1):
        raise PlacementError(f"redundant_experts={redundant_experts} needs more copies than there are ranks: "
                             f"{num_experts} experts on {num_ranks} ranks have at most "
                             f"{num_experts * (num_ranks - 1)} extra copies (never two copies on one rank)")
    n, s = num_experts // num_ranks, redundant_experts // num_ranks
    load_E = load_E.double().cpu()
    base_RQ = phy2log_P.long().cpu().view(num_ranks, n)   # Q = the n base slots of a rank
    holds_RE = torch.zeros(num_ranks, num_experts, dtype=torch.bool)
    holds_RE.scatter_(1, base_RQ, True)
    extra = [[] for _ in range(num_ranks)]
    for _ in range(redundant_experts):   # host loop: planning, once per export
        copies_E = holds_RE.sum(0)
        rank_load_R = (holds_RE.double() * (load_E / copies_E)).sum(1)
        room_R = torch.tensor([len(x) < s for x in extra])
        open_RE = ~holds_RE & room_R.unsqueeze(1)            # rank r can take a copy of e
        candidates_E = open_RE.any(0)                          # never empty (the bound checked above)
        per_copy_E = torch.where(candidates_E, load_E / copies_E, torch.full_like(load_E, -1.0))
        e = int(torch.argmax(per_copy_E))                      # first maximum: lowest id on ties
        r = int(torch.argmin(torch.where(open_RE[:, e], rank_load_R, torch.full_like(rank_load_R, float("inf")))))
        holds_RE[r, e] = True
        extra[r].append(e)
    rows = [torch.cat([base_RQ[r], torch.tensor(extra[r], dtype=torch.long)]) for r in range(num_ranks)]
    return torch.cat(rows)


def eplb_physical(load_E: torch.Tensor, num_ranks: int, redundant_experts: int = 0) -> torch.Tensor:
    """phy2log_P (E + redundant_experts slots, rank-major) of the EPLB-style rule in the module docstring."""
    num_experts = load_E.numel()
    if num_ranks < 1 or num_experts % num_ranks or redundant_experts % num_ranks or redundant_experts < 0:
        raise PlacementError(f"{num_experts} experts + {redundant_experts} redundant slots do not split evenly over "
                             f"{num_ranks} ranks")
    if redundant_experts > num_experts * (num_ranks - 1):
        raise PlacementError(f"redundant_experts={redundant_experts}: at most {num_experts * (num_ranks - 1)} "
                             "(never two copies of an expert on one rank)")
    load_E = load_E.double().cpu().clamp_min(0)
    copies_E = torch.ones(num_experts, dtype=torch.long)
    for _ in range(redundant_experts):   # host loop: planning, once per export
        per_copy_E = torch.where(copies_E < num_ranks, load_E / copies_E, torch.full_like(load_E, -1.0))
        copies_E[int(torch.argmax(per_copy_E))] += 1
    items = sorted(((float(load_E[e] / copies_E[e]), e) for e in range(num_experts) for _ in range(int(copies_E[e]))),
                   key=lambda item: (-item[0], item[1]))
    slots = (num_experts + redundant_experts) // num_ranks
    held: list[list[int]] = [[] for _ in range(num_ranks)]
    packed = [0.0] * num_ranks
    for weight, e in items:
        open_ranks = [r for r in range(num_ranks) if len(held[r]) < slots and e not in held[r]]
        if not open_ranks:   # never met in random plans (tests/test_serving_placement.py); a bug if it is
            raise PlacementError(f"the EPLB-style packing found no rank with room for a copy of expert {e}: please "
                                 f"report the load {load_E.tolist()} with {num_ranks} ranks and {redundant_experts} "
                                 "redundant experts")
        r = min(open_ranks, key=lambda r: (packed[r], r))
        held[r].append(e)
        packed[r] += weight
    return torch.tensor([e for r in range(num_ranks) for e in sorted(held[r])], dtype=torch.long)


# -- the three maps -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServingMaps:
    """One placement of every MoE layer, in the EPLB form (docs/serving.md)."""
    phy2log_LP: torch.Tensor     # long
    log2phy_LEQ: torch.Tensor    # long, padded with -1
    logcnt_LE: torch.Tensor      # long
    num_ranks: int

    @property
    def num_experts(self) -> int:
        return self.logcnt_LE.shape[1]

    @property
    def slots_per_rank(self) -> int:
        return self.phy2log_LP.shape[1] // self.num_ranks

    def holds_LRE(self) -> torch.Tensor:
        """How many copies of expert e rank r holds (0 or 1 in a valid placement)."""
        return holds_of(self.phy2log_LP, self.num_experts, self.num_ranks)


def holds_of(phy2log_LP: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    """holds_LRE: how many copies of expert e the slots of rank r hold (slot p on rank p // (P / R))."""
    L, P = phy2log_LP.shape
    rank_P = torch.arange(P) // (P // num_ranks)
    holds = torch.zeros(L, num_ranks, num_experts, dtype=torch.long)
    holds.view(L, -1).scatter_add_(1, rank_P * num_experts + phy2log_LP, torch.ones_like(phy2log_LP))
    return holds


def maps_from_phy2log(phy2log_LP: torch.Tensor, num_experts: int, num_ranks: int) -> ServingMaps:
    """log2phy (slots ascending, padded -1 to the most copies of any expert) and logcnt from phy2log; validated."""
    phy2log_LP = torch.as_tensor(phy2log_LP, dtype=torch.long)
    _check_phy2log(phy2log_LP, num_experts, num_ranks)
    L, P = phy2log_LP.shape
    logcnt_LE = torch.zeros(L, num_experts, dtype=torch.long).scatter_add_(1, phy2log_LP, torch.ones_like(phy2log_LP))
    width = int(logcnt_LE.max())
    # Q = the most copies of any expert in any layer (DeepSeek's EPLB pads to the same width)
    log2phy_LEQ = torch.full((L, num_experts, width), -1, dtype=torch.long)
    for l in range(L):   # host loop: planning
        for e in range(num_experts):
            slots = (phy2log_LP[l] == e).nonzero().squeeze(1)
            log2phy_LEQ[l, e, :slots.numel()] = slots
    return ServingMaps(phy2log_LP, log2phy_LEQ, logcnt_LE, num_ranks)


def plan_serving(kind: str, bin_LE: torch.Tensor, physical_LE: torch.Tensor, load_LME: torch.Tensor,
                 num_bins: int, num_ranks: int, redundant_experts: int = 0) -> ServingMaps:
    """Every layer's placement `kind` on `num_ranks` ranks, plus `redundant_experts` copies per layer chosen
    from the layer's measured load (summed over modalities)."""
    num_layers, num_experts = bin_LE.shape
    if load_LME.shape != (num_layers, 2, num_experts):
        raise PlacementError(f"load_LME has shape {tuple(load_LME.shape)}, expected ({num_layers}, 2, {num_experts})")
    rows = []
    for l in range(num_layers):
        if kind == "eplb":   # replicas are part of its plan
            rows.append(eplb_physical(load_LME[l].sum(0), num_ranks, redundant_experts))
            continue
        base_P = phy2log_of(base_physical(kind, num_experts, num_ranks, bin_LE[l], physical_LE[l], num_bins))
        rows.append(add_replicas(base_P, load_LME[l].sum(0), num_ranks, redundant_experts)
                    if redundant_experts else base_P)
    return maps_from_phy2log(torch.stack(rows), num_experts, num_ranks)


# -- validation and parsing -------------------------------------------------------------------------------
def _check_phy2log(phy2log_LP: torch.Tensor, num_experts: int, num_ranks: int) -> None:
    if phy2log_LP.dim() != 2:
        raise PlacementError(f"phy2log must be [layers, physical slots], got shape {tuple(phy2log_LP.shape)}")
    L, P = phy2log_LP.shape
    if num_ranks < 1 or P % num_ranks:
        raise PlacementError(f"{P} physical slots do not split evenly over {num_ranks} ranks: every rank must "
                             "hold the same number of slots (redundant experts: a multiple of the ranks)")
    if ((phy2log_LP < 0) | (phy2log_LP >= num_experts)).any():
        raise PlacementError(f"phy2log holds ids outside 0..{num_experts - 1}")
    per_rank = P // num_ranks
    for l in range(L):
        seen = set()
        for p, e in enumerate(phy2log_LP[l].tolist()):
            if (p // per_rank, e) in seen:
                raise PlacementError(f"MoE layer {l}: expert {e} has two copies on rank {p // per_rank}")
            seen.add((p // per_rank, e))
        missing = sorted(set(range(num_experts)) - {e for _, e in seen})
        if missing:
            raise PlacementError(f"MoE layer {l}: experts {missing} have no physical slot")


def validate_maps(maps: ServingMaps) -> None:
    """Every expert of every layer placed (>= 1 copy), equal slots per rank, no two copies of an expert on one
    rank, and log2phy / logcnt consistent with phy2log: each slot in exactly one expert's replica set, each
    copy listed once, ascending, padded with -1."""
    _check_phy2log(maps.phy2log_LP, maps.num_experts, maps.num_ranks)
    expected = maps_from_phy2log(maps.phy2log_LP, maps.num_experts, maps.num_ranks)
    if not torch.equal(maps.logcnt_LE, expected.logcnt_LE):
        raise PlacementError("logcnt does not count phy2log's copies of each expert")
    width = maps.log2phy_LEQ.shape[-1]
    if maps.log2phy_LEQ.shape[:2] != expected.log2phy_LEQ.shape[:2] or width < expected.log2phy_LEQ.shape[-1]:
        raise PlacementError(f"log2phy has shape {tuple(maps.log2phy_LEQ.shape)}, expected "
                             f"{tuple(expected.log2phy_LEQ.shape)} (the last dimension may be wider, padded with -1)")
    padded = torch.nn.functional.pad(expected.log2phy_LEQ, (0, width - expected.log2phy_LEQ.shape[-1]), value=-1)
    if not torch.equal(maps.log2phy_LEQ, padded):
        raise PlacementError("log2phy does not list each expert's slots of phy2log (ascending, once each, -1 after)")


def maps_from_eplb(phy2log, log2phy, logcnt, num_ranks: int) -> ServingMaps:
    """Parse the EPLB triple (lists or tensors) back into validated maps."""
    maps = ServingMaps(torch.as_tensor(phy2log, dtype=torch.long), torch.as_tensor(log2phy, dtype=torch.long),
                       torch.as_tensor(logcnt, dtype=torch.long), num_ranks)
    if maps.logcnt_LE.dim() != 2 or maps.log2phy_LEQ.dim() != 3:
        raise PlacementError("logcnt must be [layers, experts] and log2phy [layers, experts, replicas]")
    validate_maps(maps)
    return maps


# -- the serving-load model --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServingFigures:
    """One placement on one trace, averaged over MoE layers (per layer in the lists)."""
    max_over_mean_load: float
    remote_ranks_per_token: float
    cross_rank_rate: float
    remote_bytes_per_token: float
    max_over_mean_load_L: tuple[float, ...]
    remote_bytes_per_token_L: tuple[float, ...]


def sample_routes(load_ME: torch.Tensor, k: int, num_tokens: int, vision_share: float,
                  generator: torch.Generator) -> torch.Tensor:
    """indices_SK: the first round(vision_share * S) tokens are vision, the rest text; each draws k distinct
    experts with probability following its modality's measured load."""
    num_vision = round(vision_share * num_tokens)
    parts = []
    for m, count in ((1, num_vision), (0, num_tokens - num_vision)):
        if count == 0:
            continue
        weights_E = load_ME[m].double().clamp_min(0)
        if int((weights_E > 0).sum()) < k:
            raise PlacementError(f"the measured {('text', 'vision')[m]} load reaches {int((weights_E > 0).sum())} "
                                 f"experts, fewer than k={k}: measure the load on more tokens")
        parts.append(torch.multinomial(weights_E.expand(count, -1), k, replacement=False, generator=generator))
    return torch.cat(parts)


def replay_routes(indices_SK: torch.Tensor, labels_S: torch.Tensor, vision_share: float, num_tokens: int,
                  generator: torch.Generator) -> torch.Tensor:
    """indices_SK of a trace of measured tokens: round(vision_share * S) drawn uniformly, with replacement, from
    the measured vision tokens, the rest from the text tokens (each keeps its whole expert set: the experts a
    token really used together, which `sample_routes` cannot give)."""
    num_vision = round(vision_share * num_tokens)
    parts = []
    for m, count in ((1, num_vision), (0, num_tokens - num_vision)):
        if count == 0:
            continue
        pool_S = (labels_S == m).nonzero().squeeze(1)
        if pool_S.numel() == 0:
            raise PlacementError(f"the measured routes hold no {('text', 'vision')[m]} token, and the trace asks for "
                                 f"{count}: measure on data with both modalities")
        parts.append(indices_SK[pool_S[torch.randint(pool_S.numel(), (count,), generator=generator)]])
    return torch.cat(parts)


def layer_figures(indices_SK: torch.Tensor, holds_RE: torch.Tensor, chunk: int = 4096) -> tuple[float, float, float]:
    """(max / mean rank load, remote ranks per token, cross-rank rate) of one layer: exact over the home rank,
    each of the R ranks with probability 1 / R.  A route of expert e from home h stays on h when h holds e, else
    it is spread over e's copies, so P(no route of the token on rank r != h) is the product over its routes not
    held at h of (1 - spread_ER[e, r]), summed in logs: one batched product, `chunk` tokens at a time."""
    num_ranks, num_experts = holds_RE.shape
    holds_RE = holds_RE.double()
    spread_ER = (holds_RE / holds_RE.sum(0)).t()                 # a route shared evenly by its copies
    away_QE = 1.0 - holds_RE                                     # Q = the home rank (the R ranks again): lacks e
    # load: routes held at home stay there, the others spread (summed over the homes, each 1 / R)
    routes_E = torch.bincount(indices_SK.reshape(-1), minlength=num_experts).double()
    load_R = (holds_RE @ routes_E + (routes_E * away_QE.sum(0)) @ spread_ER) / num_ranks
    log_keep_ER = torch.log1p(-spread_ER).clamp_min(-1e4)        # log P(a route of e not on r); -1e4: never
    other_QR = 1.0 - torch.eye(num_ranks, dtype=torch.float64)   # the ranks other than home
    remote = cross = 0.0
    num_tokens = indices_SK.shape[0]
    for start in range(0, num_tokens, chunk):   # host loop over token chunks: bounds the [S, R, R] memory
        idx_SK = indices_SK[start:start + chunk]
        log_miss_SQR = torch.einsum("skq,skr->sqr", away_QE.t()[idx_SK], log_keep_ER[idx_SK])
        hit_SQR = (1.0 - log_miss_SQR.exp()) * other_QR
        remote += float(hit_SQR.sum()) / num_ranks
        cross += float((1.0 - (log_miss_SQR * other_QR).sum(2).exp()).sum()) / num_ranks
    return float(load_R.max() / load_R.mean()), remote / num_tokens, cross / num_tokens


def simulate_serving(maps: ServingMaps, load_LME: torch.Tensor, k: int, hidden_size: int, element_bytes: int,
                     vision_share: float, num_tokens: int = 20000, seed: int = 0) -> ServingFigures:
    """The serving-load model (module docstring) of `maps` on a trace with this vision share, its routes drawn
    from the load (`trace_routes`)."""
    return figures_on_routes(maps, trace_routes(load_LME, k, num_tokens, vision_share, seed), hidden_size,
                             element_bytes)


def figures_on_routes(maps: ServingMaps, routes_LSK: Sequence[torch.Tensor], hidden_size: int,
                      element_bytes: int) -> ServingFigures:
    """The serving-load model of `maps` on given routes per layer (drawn or replayed: every placement of a
    comparison then sees the same tokens)."""
    holds_LRE = maps.holds_LRE()
    loads, remotes, crosses = [], [], []
    for l, indices_SK in enumerate(routes_LSK):
        ratio, remote, cross = layer_figures(indices_SK, holds_LRE[l])
        loads.append(ratio)
        remotes.append(remote)
        crosses.append(cross)
    bytes_L = [2.0 * hidden_size * element_bytes * r for r in remotes]
    mean = lambda xs: sum(xs) / len(xs)   # noqa: E731
    return ServingFigures(mean(loads), mean(remotes), mean(crosses), mean(bytes_L), tuple(loads), tuple(bytes_L))


def trace_routes(load_LME: torch.Tensor, k: int, num_tokens: int, vision_share: float, seed: int = 0) -> list:
    """Per layer, the routes of one trace (seeded: the same tokens for every placement)."""
    generator = torch.Generator().manual_seed(seed)
    return [sample_routes(load_LME[l], k, num_tokens, vision_share, generator) for l in range(load_LME.shape[0])]
