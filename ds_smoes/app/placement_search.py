"""A serving placement searched on replayed routes: the experts tokens use together, not only their load.

**Search** (`search_placement`): a local search over one MoE layer's physical slots, scored on traces
of measured routes (each token's real expert set, `serving_placement.replay_routes`), by the
serving-load model of `serving_placement.layer_figures`.  A placement's score on traces t = 1..T:

    excess = sum_t max(0, load_t - max_load)     load_t = max / mean rank load on trace t
    remote = mean_t remote ranks per token on trace t

compared lexicographically (excess first: a placement within the load bound on every trace beats any
that is not; then remote; a change must improve by more than 1e-9).  One move at a time cannot always get
there: moving a pair of hot experts' copies onto each other's ranks overloads a rank after the first move
and evens it out after the second.  So the search runs in stages that weigh the excess more and more,
`remote + lam * excess` for lam in PENALTIES, then the lexicographic order, and returns the best placement
it met in the lexicographic order (never worse than the start).  Moves keep every rule of a
serving placement (every expert at least once, never two copies on one rank, the same slots per rank):

- swap: the experts of two slots on different ranks trade places (copy counts unchanged);
- retarget: a slot's expert becomes another expert the rank lacks, when the old one keeps a copy
  elsewhere (the replica set changes).

Each pass visits every move once in a seeded random order and takes each one that improves the stage's
score (first improvement); a stage's passes repeat until one improves nothing; all stages together
compute at most `max_evals` scores.
Start: the given placement (`app.serving` starts from the modality bins and from the best of the
base placements of `serving_placement`: the bins are a starting point, not a constraint).  Deterministic for a seed.

Shapes: S tokens, K routes per token, E experts, P physical slots, R ranks.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ds_smoes.app.serving_placement import PlacementError, holds_of, layer_figures

TOLERANCE = 1e-9
PENALTIES = (0.5, 2.0, 8.0)   # the stages' weights of the load excess, before the lexicographic stage


# -- the search -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Score:
    excess: float                 # sum over traces of the load ratio above the bound
    remote: float                 # mean over traces of remote ranks per token
    loads: tuple[float, ...]      # max / mean rank load per trace

    def better_than(self, other: Score, penalty: float | None = None) -> bool:
        """Lexicographic (penalty None), or by remote + penalty * excess."""
        if penalty is not None:
            return self.remote + penalty * self.excess < other.remote + penalty * other.excess - TOLERANCE
        if self.excess < other.excess - TOLERANCE:
            return True
        return self.excess <= other.excess + TOLERANCE and self.remote < other.remote - TOLERANCE


def score(phy2log_P: torch.Tensor, traces: Sequence[torch.Tensor], num_experts: int, num_ranks: int,
          max_load: float) -> Score:
    """The placement's score on the traces (module docstring)."""
    holds_RE = holds_of(phy2log_P.unsqueeze(0), num_experts, num_ranks)[0]
    figures = [layer_figures(indices_SK, holds_RE) for indices_SK in traces]
    loads = tuple(f[0] for f in figures)
    return Score(sum(max(0.0, x - max_load) for x in loads), sum(f[1] for f in figures) / len(figures), loads)


def _moves(phy2log_P: torch.Tensor, num_experts: int, num_ranks: int) -> list[tuple[str, int, int]]:
    """Every swap (p, q) of slots on different ranks and every retarget (p, x) of slot p to expert x."""
    per_rank = phy2log_P.numel() // num_ranks
    num_slots = phy2log_P.numel()
    swaps = [("swap", p, q) for p in range(num_slots) for q in range(p + 1, num_slots) if p // per_rank != q // per_rank]
    retargets = [("retarget", p, x) for p in range(num_slots) for x in range(num_experts)]
    return swaps + retargets


def _apply(phy2log_P: torch.Tensor, move: tuple[str, int, int], num_experts: int, num_ranks: int) -> torch.Tensor | None:
    """The placement after `move`, or None where the move breaks a placement rule (or changes nothing)."""
    kind, p, b = move
    per_rank = phy2log_P.numel() // num_ranks
    experts = phy2log_P.tolist()
    on_rank = lambda r: experts[r * per_rank:(r + 1) * per_rank]   # noqa: E731
    if kind == "swap":
        e, f = experts[p], experts[b]
        if e == f or e in on_rank(b // per_rank) or f in on_rank(p // per_rank):
            return None
        experts[p], experts[b] = f, e
    else:
        e, x = experts[p], b
        if e == x or x in on_rank(p // per_rank) or experts.count(e) < 2:
            return None
        experts[p] = x
    return torch.tensor(experts, dtype=torch.long)


def search_placement(start_P: torch.Tensor, traces: Sequence[torch.Tensor], num_experts: int, num_ranks: int,
                     max_load: float = 1.1, max_evals: int = 5000, seed: int = 0,
                     progress: Callable[[str], None] | None = None) -> tuple[torch.Tensor, Score, int]:
    """The local search of the module docstring from `start_P`: (best phy2log_P, its score, scores computed)."""
    if not traces:
        raise PlacementError("the placement search needs at least one trace of routes")
    current = start_P.long().clone()
    current_score = score(current, traces, num_experts, num_ranks, max_load)
    best, best_score = current, current_score
    moves = _moves(current, num_experts, num_ranks)
    generator = torch.Generator().manual_seed(seed)
    evals = 1
    for stage, penalty in enumerate((*PENALTIES, None)):
        improved = True
        while improved and evals < max_evals:
            improved = False
            for i in torch.randperm(len(moves), generator=generator).tolist():
                if evals >= max_evals:
                    break
                candidate = _apply(current, moves[i], num_experts, num_ranks)
                if candidate is None:
                    continue
                candidate_score = score(candidate, traces, num_experts, num_ranks, max_load)
                evals += 1
                if candidate_score.better_than(current_score, penalty):
                    current, current_score, improved = candidate, candidate_score, True
                    if current_score.better_than(best_score):
                        best, best_score = current, current_score
        if progress is not None:
            progress(f"stage {stage + 1}: {evals} placements scored, best remote ranks/token {best_score.remote:.4f}, "
                     f"max/mean load {max(best_score.loads):.3f}")
    return best, best_score, evals
