"""Routings at shapes the demo never trained: drawn from a trained router's per-modality statistics.

`python -m ds_smoes.bench scale` times the dispatches at published model shapes (64-128 experts,
top-6/8), where no trained SMoES router exists on this machine.  Its routes come from the demo
router's statistics, the own-route histogram P_m(j) that `bench simulate` uses (docs/bench.md): of a
modality-m token's k routes, j land in the experts of its modality's own bins.

Carrying a histogram measured at the demo's k (2) to a real model's k (6 or 8) needs a model of how
a token's routes share out.  Ours (a design choice, documented in docs/bench.md): each token has its
own probability p of putting a route into its modality's bins, p ~ Beta(a_m, b_m), and its k routes
are Bernoulli(p) draws: a beta-binomial.  Its two parameters per modality are fitted by moments
(mean and intra-token correlation rho), which at k = 2 reproduces the measured histogram exactly
(three probabilities summing to 1: two free).  rho <= 0 (routes spread more evenly than independent
ones would) degenerates to the binomial (rho = 0); rho >= 1 to all-or-nothing.

Given j, the j own experts are distinct and uniform over the own modality's ranks' experts, the
k - j others distinct and uniform over the other ranks' experts (`modality_groups`: vision owns
round(pi_v * R) ranks, at least one each), as the simulator assumes.

Shapes: S tokens, K routes per token, E experts, M = 2 modalities (0 text, 1 vision), J = k + 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ds_smoes.bench.simulate.model import RouterProfile, modality_groups
from ds_smoes.core.errors import ConfigError


@dataclass(frozen=True)
class OwnRouteModel:
    """Per modality (text, vision): the mean share of a token's routes in its own bins and the
    intra-token correlation of those routes (beta-binomial), fitted from a measured profile."""
    mean_M: tuple[float, float]
    rho_M: tuple[float, float]
    vision_share: float
    source_k: int

    @classmethod
    def fit(cls, profile: RouterProfile) -> OwnRouteModel:
        k = profile.k
        means, rhos = [], []
        for row in profile.own_routes_MJ:
            mean_j = sum(j * p for j, p in enumerate(row))
            var_j = sum(j * j * p for j, p in enumerate(row)) - mean_j ** 2
            mu = mean_j / k
            if k == 1 or mu <= 0.0 or mu >= 1.0:
                rho = 0.0   # one route, or every route on one side: no spread to fit
            else:
                rho = (var_j / (k * mu * (1.0 - mu)) - 1.0) / (k - 1)
            means.append(min(max(mu, 0.0), 1.0))
            rhos.append(min(max(rho, 0.0), 1.0))
        return cls((means[0], means[1]), (rhos[0], rhos[1]), profile.vision_share, k)

    def own_probs(self, modality: int, k: int) -> list[float]:
        """P(j of k routes in the own bins), j = 0 .. k, under the fitted beta-binomial."""
        mu, rho = self.mean_M[modality], self.rho_M[modality]
        if rho >= 1.0 or mu in (0.0, 1.0):
            return [1.0 - mu] + [0.0] * (k - 1) + [mu]
        if rho == 0.0:
            return [_comb(k, j) * mu ** j * (1.0 - mu) ** (k - j) for j in range(k + 1)]
        a, b = mu * (1.0 / rho - 1.0), (1.0 - mu) * (1.0 / rho - 1.0)
        log_norm = torch.special.gammaln(torch.tensor(a + b, dtype=torch.float64)) - torch.special.gammaln(
            torch.tensor(a, dtype=torch.float64)) - torch.special.gammaln(torch.tensor(b, dtype=torch.float64))
        out = []
        for j in range(k + 1):
            lg = (torch.special.gammaln(torch.tensor(j + a, dtype=torch.float64))
                  + torch.special.gammaln(torch.tensor(k - j + b, dtype=torch.float64))
                  - torch.special.gammaln(torch.tensor(k + a + b, dtype=torch.float64)))
            out.append(_comb(k, j) * float(torch.exp(log_norm + lg)))
        total = sum(out)
        return [p / total for p in out]


def _comb(n: int, r: int) -> float:
    import math

    return float(math.comb(n, r))


def _distinct_uniform(num_tokens: int, pool_E: torch.Tensor, draws: int, generator: torch.Generator) -> torch.Tensor:
    """[S, draws]: per token, `draws` distinct experts uniform over `pool_E` (random keys, sorted)."""
    keys_SQ = torch.rand(num_tokens, len(pool_E), generator=generator)   # Q = experts of the pool
    return pool_E[keys_SQ.argsort(dim=1)[:, :draws]]


def draw_modality_labels(num_tokens: int, vision_share: float, generator: torch.Generator) -> torch.Tensor:
    """labels_S: 1 (vision) with probability `vision_share`, else 0 (text)."""
    return (torch.rand(num_tokens, generator=generator) < vision_share).long()


def draw_profile_routes(model: OwnRouteModel, labels_S: torch.Tensor, k: int, num_experts: int, ep_size: int,
                        generator: torch.Generator) -> torch.Tensor:
    """indices_SK: k distinct experts per token, j of them in its modality's own ranks, j ~ the fitted model."""
    if num_experts % ep_size or k > num_experts:
        raise ConfigError(f"{num_experts} experts on {ep_size} EP ranks with top-{k}: ep_size must divide the experts "
                          "and k must not exceed them")
    per_rank = num_experts // ep_size
    text_ranks, _ = modality_groups(model.vision_share, ep_size)
    pools = (torch.arange(text_ranks * per_rank), torch.arange(text_ranks * per_rank, num_experts))
    num_tokens = labels_S.shape[0]
    own_S = torch.zeros(num_tokens, dtype=torch.long)
    for m in range(2):
        probs_J = torch.tensor(model.own_probs(m, k), dtype=torch.float64)
        is_m_S = labels_S == m
        count = int(is_m_S.sum())
        if count:
            own_S[is_m_S] = torch.multinomial(probs_J, count, replacement=True, generator=generator)
    indices_SK = torch.empty(num_tokens, k, dtype=torch.long)
    for m in range(2):
        own_pool, other_pool = pools[m], pools[1 - m]
        own_SK = _distinct_uniform(num_tokens, own_pool, min(k, len(own_pool)), generator)
        other_SK = _distinct_uniform(num_tokens, other_pool, min(k, len(other_pool)), generator)
        # routes that do not fit the own pool move to the other one (as the simulator's split_draws)
        own_used_S = own_S.clamp_max(len(own_pool)).clamp_min(k - len(other_pool))
        slot_K = torch.arange(k)
        take_own_SK = slot_K.unsqueeze(0) < own_used_S.unsqueeze(1)
        own_part_SK = own_SK.gather(1, slot_K.clamp_max(own_SK.shape[1] - 1).expand(num_tokens, k))
        other_slot_SK = (slot_K.unsqueeze(0) - own_used_S.unsqueeze(1)).clamp(0, other_SK.shape[1] - 1)
        other_part_SK = other_SK.gather(1, other_slot_SK)
        chosen_SK = torch.where(take_own_SK, own_part_SK, other_part_SK)
        is_m_S = labels_S == m
        indices_SK[is_m_S] = chosen_SK[is_m_S]
    return indices_SK


def hard_routing_model(vision_share: float, k: int) -> OwnRouteModel:
    """Hard modality routing as an own-route model: every route of a token in its modality's own experts."""
    return OwnRouteModel((1.0, 1.0), (1.0, 1.0), vision_share, k)


def draw_one_bin_routes(model: OwnRouteModel, labels_S: torch.Tensor, k: int, num_experts: int, ep_size: int,
                        generator: torch.Generator) -> torch.Tensor:
    """indices_SK for SMoES with one bin per token (bins = EP ranks): all k experts of a token on one rank, a rank
    of its modality's own ranks with probability mean_M[m] (the fitted share of its routes in its own bins), else
    one of the other modality's; the rank uniform within the chosen group, the k experts distinct and uniform
    on it."""
    per_rank = num_experts // ep_size
    if num_experts % ep_size or k > per_rank:
        raise ConfigError(f"one bin per token needs k={k} experts on one of {ep_size} ranks ({num_experts} experts): "
                          "k must not exceed the experts per rank")
    text_ranks, _ = modality_groups(model.vision_share, ep_size)
    groups = (torch.arange(text_ranks), torch.arange(text_ranks, ep_size))
    num_tokens = labels_S.shape[0]
    own_mean_S = torch.tensor(model.mean_M, dtype=torch.float64)[labels_S]
    own_S = torch.rand(num_tokens, generator=generator, dtype=torch.float64) < own_mean_S
    group_S = torch.where(own_S, labels_S, 1 - labels_S)        # 0: the text ranks, 1: the vision ranks
    rank_S = torch.empty(num_tokens, dtype=torch.long)
    for g in range(2):
        on_g = group_S == g
        pick = torch.randint(len(groups[g]), (int(on_g.sum()),), generator=generator)
        rank_S[on_g] = groups[g][pick]
    local_SK = torch.rand(num_tokens, per_rank, generator=generator).argsort(dim=1)[:, :k]
    return rank_S.unsqueeze(1) * per_rank + local_SK


def draw_uniform_routes(num_tokens: int, k: int, num_experts: int, generator: torch.Generator) -> torch.Tensor:
    """indices_SK: k distinct experts per token, uniform over all experts (a balanced router without specialisation)."""
    return _distinct_uniform(num_tokens, torch.arange(num_experts), k, generator)
