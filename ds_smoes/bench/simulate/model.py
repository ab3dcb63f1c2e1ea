"""Expected EP traffic beyond 2 ranks: a statistical model fed by a trained router's statistics.

docs/bench.md states the model; in short, for one MoE layer with E experts on R expert-parallel
ranks (L = E / R experts per rank, one bin per rank), k routes per token, hidden size D and
element size b bytes:

* A token's **home rank** is uniform over the R ranks and independent of its routing (data
  parallelism shards sequences without looking at them).
* **Modality groups.** Vision owns n_v = round(pi_v * R) ranks (clipped to 1 .. R - 1, pi_v the
  vision share of routed tokens), text owns the other n_t = R - n_v: the bins that a balanced
  bin loss hands to each modality.
* **Routing.** A token of modality m puts j of its k routes into its own group with the
  measured probability P_m(j) ("own-route histogram", measured on the trained router with the
  modality's own bins); the j experts are distinct and uniform over the own group's n_m * L
  experts, the k - j others distinct and uniform over the other group's experts.  Routes that do
  not fit a group (j > n_m * L) move to the other one.
* **rank_once** sends a token once to every remote rank holding one of its experts and gets one
  vector back: 2 * D * b * E[remote ranks] bytes per token, E[remote ranks] = E[ranks hit] *
  (1 - 1/R).  Cross-rank rate = 1 - P(one rank hit) / R.
* **Stock dispatch** moves the capacity-padded [E, C, D] buffer twice, the own rank's chunk
  staying local: 2 * (E - L) * C * D * b per rank.  With C = lambda * k * S / E (lambda: the
  capacity over the mean expert load of the S tokens of a rank; measured from the bench's own
  stock bytes, or a capacity factor given by the user) that is 2 * D * b * k * lambda * (1 - 1/R)
  per token, whatever E.  Holding lambda at its measured value is favourable to the stock
  dispatch: a dropless capacity (the largest load) grows with E.
* **Bin-limited routing** (max_bins_per_token = 1): each token uses M = ceil(k / L) bins, i.e.
  M ranks, whatever the router: E[remote ranks] = M * (1 - 1/R).

Shapes: M = 2 modalities (0 text, 1 vision), J = k + 1 possible own-route counts.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ds_smoes.core.errors import ConfigError

EXPERTS_GRID = (8, 16, 32, 64, 128, 256)
EP_GRID = (2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class RouterProfile:
    """What the model needs from a router: k, the vision share and P_m(j) per modality (rows sum to 1)."""
    k: int
    vision_share: float
    own_routes_MJ: tuple[tuple[float, ...], tuple[float, ...]]

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"router profile: k={self.k} must be >= 1")
        if not 0.0 <= self.vision_share <= 1.0:
            raise ConfigError(f"router profile: vision_share={self.vision_share} is not in [0, 1]")
        for m, row in enumerate(self.own_routes_MJ):
            if len(row) != self.k + 1 or any(p < 0 for p in row) or abs(sum(row) - 1.0) > 1e-6:
                raise ConfigError(f"router profile: own_routes_MJ[{m}] = {list(row)} must be {self.k + 1} "
                                  "non-negative probabilities summing to 1 (P(j of k routes in own bins))")

    @classmethod
    def from_counts(cls, k: int, own_route_counts_MJ) -> RouterProfile:
        """From measured token counts [2, k + 1] (text, vision) x (own routes j = 0 .. k)."""
        counts = np.asarray(own_route_counts_MJ, dtype=np.float64)
        if counts.shape != (2, k + 1):
            raise ConfigError(f"own-route counts have shape {counts.shape}, expected (2, {k + 1})")
        tokens_M = counts.sum(1)
        if tokens_M.sum() <= 0:
            raise ConfigError("own-route counts are all zero: the router saw no tokens")
        rows = tuple(tuple((counts[m] / tokens_M[m]).tolist()) if tokens_M[m] > 0
                     else tuple([1.0] + [0.0] * k) for m in range(2))
        return cls(k, float(tokens_M[1] / tokens_M.sum()), rows)


@dataclass(frozen=True)
class RankFigures:
    """Per token: expected ranks holding its experts, remote ranks among them, P(any remote)."""
    ranks_per_token: float
    remote_ranks_per_token: float
    cross_rank_rate: float


# -- combinatorics ------------------------------------------------------------------------------------
def expected_ranks_hit(num_ranks: int, experts_per_rank: int, draws: int) -> float:
    """E[distinct ranks] when `draws` distinct experts are drawn uniformly from num_ranks * L experts."""
    if draws <= 0 or num_ranks <= 0:
        return 0.0
    pool = num_ranks * experts_per_rank
    if draws > pool:
        raise ValueError(f"{draws} distinct experts drawn from {pool}")
    return num_ranks * (1.0 - math.comb(pool - experts_per_rank, draws) / math.comb(pool, draws))


def prob_one_rank(num_ranks: int, experts_per_rank: int, draws: int) -> float:
    """P(all `draws` distinct experts of num_ranks * L lie on one rank); draws >= 1."""
    pool = num_ranks * experts_per_rank
    return num_ranks * math.comb(experts_per_rank, draws) / math.comb(pool, draws)


def modality_groups(vision_share: float, ep_size: int) -> tuple[int, int]:
    """(text ranks, vision ranks): vision owns round(pi_v * R) ranks, at least one each."""
    if ep_size < 2:
        raise ConfigError(f"ep_size={ep_size}: the model needs at least 2 EP ranks")
    vision = min(ep_size - 1, max(1, round(vision_share * ep_size)))
    return ep_size - vision, vision


def split_draws(own: int, k: int, own_pool: int, other_pool: int) -> tuple[int, int]:
    """(own draws, other draws) after moving routes that do not fit a group to the other one."""
    own = min(own, own_pool)
    other = k - own
    if other > other_pool:  # cannot happen with k <= E, kept for clarity
        own, other = own + other - other_pool, other_pool
    return own, other


# -- the variants ------------------------------------------------------------------------------------
def rank_once_figures(profile: RouterProfile, num_experts: int, ep_size: int,
                      token_vision_share: float | None = None) -> RankFigures:
    """Expected rank figures of the router in `profile` with E experts on R ranks (analytic).  The modality groups
    follow the profile's vision share (the bins were balanced on it); `token_vision_share` is the mix of the tokens
    being routed when it differs (a vision-heavy prefill, text-only decoding; default: the profile's)."""
    _check_layout(profile.k, num_experts, ep_size)
    per_rank = num_experts // ep_size
    groups = modality_groups(profile.vision_share, ep_size)
    mix = profile.vision_share if token_vision_share is None else token_vision_share
    shares = (1.0 - mix, mix)
    ranks = one_rank = 0.0
    for m in range(2):
        own_n, other_n = groups[m], ep_size - groups[m]
        for j, p_j in enumerate(profile.own_routes_MJ[m]):
            if p_j == 0.0:
                continue
            own, other = split_draws(j, profile.k, own_n * per_rank, other_n * per_rank)
            ranks += shares[m] * p_j * (expected_ranks_hit(own_n, per_rank, own)
                                        + expected_ranks_hit(other_n, per_rank, other))
            if other == 0:
                one_rank += shares[m] * p_j * prob_one_rank(own_n, per_rank, own)
            elif own == 0:
                one_rank += shares[m] * p_j * prob_one_rank(other_n, per_rank, other)
    return RankFigures(ranks, ranks * (1.0 - 1.0 / ep_size), 1.0 - one_rank / ep_size)


def bin_limited_figures(k: int, num_experts: int, ep_size: int) -> RankFigures:
    """max_bins_per_token = 1 with one bin per rank: M = ceil(k / L) bins (ranks), whatever the router."""
    _check_layout(k, num_experts, ep_size)
    bins = -(-k // (num_experts // ep_size))
    return RankFigures(float(bins), bins * (1.0 - 1.0 / ep_size), 1.0 - (1.0 / ep_size if bins == 1 else 0.0))


def rank_once_bytes_per_token(remote_ranks_per_token: float, hidden: int, element_size: int) -> float:
    """One vector out and one back per (token, remote rank)."""
    return 2.0 * hidden * element_size * remote_ranks_per_token


def stock_bytes_per_token(k: int, capacity_ratio: float, ep_size: int, hidden: int, element_size: int) -> float:
    """2 (E - L) C D b / S with C = capacity_ratio * k S / E: 2 D b k lambda (1 - 1/R)."""
    return 2.0 * hidden * element_size * k * capacity_ratio * (1.0 - 1.0 / ep_size)


def capacity_ratio_from_bytes(bytes_per_token: float, k: int, ep_size: int, hidden: int, element_size: int) -> float:
    """lambda that makes `stock_bytes_per_token` equal a measured stock figure."""
    return bytes_per_token / (2.0 * hidden * element_size * k * (1.0 - 1.0 / ep_size))


def _check_layout(k: int, num_experts: int, ep_size: int) -> None:
    if ep_size < 2 or num_experts % ep_size:
        raise ConfigError(f"{num_experts} experts on {ep_size} EP ranks: ep_size must be >= 2 and divide the "
                          "number of experts")
    if k > num_experts:
        raise ConfigError(f"k={k} exceeds num_experts={num_experts}")


# -- Monte Carlo (a seeded cross-check of the analytic rank figures) -----------------------------------
def monte_carlo_figures(profile: RouterProfile, num_experts: int, ep_size: int, samples: int = 20000,
                        seed: int = 0) -> RankFigures:
    """The same model sampled token by token (for checking `rank_once_figures`)."""
    _check_layout(profile.k, num_experts, ep_size)
    rng = np.random.default_rng(seed)
    per_rank = num_experts // ep_size
    text_n, _ = modality_groups(profile.vision_share, ep_size)
    # ranks 0 .. text_n - 1 are text's, the rest vision's; experts r*L .. r*L + L - 1 live on rank r
    own_experts = (np.arange(text_n * per_rank), np.arange(text_n * per_rank, num_experts))
    ranks = remote = cross = 0.0
    for _ in range(samples):
        m = int(rng.random() < profile.vision_share)
        j = int(rng.choice(profile.k + 1, p=profile.own_routes_MJ[m]))
        own_pool, other_pool = own_experts[m], own_experts[1 - m]
        own, other = split_draws(j, profile.k, len(own_pool), len(other_pool))
        experts = np.concatenate([rng.choice(own_pool, own, replace=False),
                                  rng.choice(other_pool, other, replace=False)])
        hit = set((experts // per_rank).tolist())
        home = int(rng.integers(ep_size))
        ranks += len(hit)
        remote += len(hit - {home})
        cross += bool(hit - {home})
    return RankFigures(ranks / samples, remote / samples, cross / samples)


# -- the grid ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SimulationInputs:
    """Everything the grid needs: the routers' profiles and the stock capacity ratios."""
    smoes: RouterProfile             # the SMoES router (variants b, c)
    topk: RouterProfile | None       # the top-k router (variant e); None leaves e out
    capacity_ratio_a: float          # lambda of the top-k gate under the stock dispatch
    capacity_ratio_b: float          # lambda of the SMoES gate under the stock dispatch
    hidden: int
    element_size: int


VARIANT_LABELS = {
    "a": "top-k gate + stock dispatch",
    "b": "SMoES gate + stock dispatch",
    "c": "SMoES gate + rank_once dispatch",
    "d": "(c) with max_bins_per_token = 1",
    "e": "top-k gate + rank_once dispatch",
}


def simulate_grid(inputs: SimulationInputs, experts: tuple[int, ...] = EXPERTS_GRID,
                  ep_sizes: tuple[int, ...] = EP_GRID,
                  rank_model: Callable[[RouterProfile, int, int], RankFigures] | None = None) -> list[dict]:
    """One row per (E, R, variant) with 2 <= R <= E and R | E: bytes per token and rank figures.
    `rank_model` computes a router's rank figures (default: the analytic `rank_once_figures`)."""
    figures_of = rank_model or rank_once_figures
    rows = []
    k, d, b = inputs.smoes.k, inputs.hidden, inputs.element_size
    for num_experts in experts:
        for ep in ep_sizes:
            if ep < 2 or ep > num_experts or num_experts % ep or k > num_experts:
                continue
            c = figures_of(inputs.smoes, num_experts, ep)
            t = figures_of(inputs.topk, num_experts, ep) if inputs.topk is not None else None
            dd = bin_limited_figures(k, num_experts, ep)
            # the rank figures describe the routing, whichever dispatch moves the tokens
            figures = {
                "a": (stock_bytes_per_token(k, inputs.capacity_ratio_a, ep, d, b), t),
                "b": (stock_bytes_per_token(k, inputs.capacity_ratio_b, ep, d, b), c),
                "c": (rank_once_bytes_per_token(c.remote_ranks_per_token, d, b), c),
                "d": (rank_once_bytes_per_token(dd.remote_ranks_per_token, d, b), dd),
            }
            if t is not None:
                figures["e"] = (rank_once_bytes_per_token(t.remote_ranks_per_token, d, b), t)
            ref = figures["a"][0]
            for key, (bytes_pt, fig) in figures.items():
                rows.append({"experts": num_experts, "ep_size": ep, "variant": key, "label": VARIANT_LABELS[key],
                             "bytes_per_token": bytes_pt,
                             "delta_vs_a_pct": 100.0 * (bytes_pt - ref) / ref if ref else float("nan"),
                             "ranks_per_token": fig.ranks_per_token if fig else float("nan"),
                             "remote_ranks_per_token": fig.remote_ranks_per_token if fig else float("nan"),
                             "cross_rank_rate": fig.cross_rank_rate if fig else float("nan")})
    return rows
