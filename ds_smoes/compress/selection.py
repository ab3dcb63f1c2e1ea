"""Choosing which tokens of a sequence to keep: the math of visual token compression (issue 19).

Pure torch functions, no modules and no state, shared by the pre-LLM compressors (`ds_smoes.compress`) and
the in-LLM pruning.  Shapes (glossary: `ds_smoes/__init__.py`): B sequences or images, T the tokens a function
chooses from (an image's patches, in raster order), D hidden, Q the tokens kept (the budget; Q is the glossary's
ad-hoc letter and means the budget wherever this module uses it).

Kept tokens stay in their ORIGINAL order: every index function returns indices sorted ascending along Q, so the
kept tokens of an image are a subsequence of its patches (positions stay monotone, a raster scan stays a raster
scan).  Ties in the scores go to the earlier token (a stable sort), so the choice is deterministic.
"""
from __future__ import annotations

import math

import torch


def topk_indices(scores_BT: torch.Tensor, k: int) -> torch.Tensor:
    """index_BQ (Q = k, long): the k highest-scoring tokens of each row, in ascending token order.

    Ties go to the earlier token (stable descending sort), so equal scores keep the first k."""
    _check_budget(k, scores_BT.shape[-1])
    order_BT = torch.sort(scores_BT, dim=-1, descending=True, stable=True).indices
    return order_BT[..., :k].sort(dim=-1).values


def gather_tokens(x_BTD: torch.Tensor, index_BQ: torch.Tensor) -> torch.Tensor:
    """x_BQD: the rows of each sequence that `index_BQ` names, in that order."""
    return x_BTD.gather(1, index_BQ.unsqueeze(-1).expand(-1, -1, x_BTD.shape[-1]))


def hard_mask(index_BQ: torch.Tensor, num_tokens: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """mask_BT: 1 on the tokens `index_BQ` names, 0 elsewhere."""
    mask_BT = torch.zeros(index_BQ.shape[0], num_tokens, dtype=dtype, device=index_BQ.device)
    return mask_BT.scatter(1, index_BQ, 1.0)


def straight_through(hard_BT: torch.Tensor, soft_BT: torch.Tensor) -> torch.Tensor:
    """`hard_BT` in the forward, the gradient of `soft_BT` in the backward.

    Written `hard + (soft - soft.detach())`: the bracket is exactly 0 in the forward, so the value is `hard` bit for
    bit (a kept token multiplied by it keeps its exact value)."""
    return hard_BT + (soft_BT - soft_BT.detach())


def straight_through_topk(scores_BT: torch.Tensor, k: int, tau: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask_BT, index_BQ): the top-k mask, hard 0/1 in the forward, and the gradient of softmax(scores / tau)
    in the backward; index_BQ (Q = k) as `topk_indices`.

    Why a softmax over the tokens as the soft scores: the mask's value on a kept token is the token's share of the
    attention-like distribution, so raising one token's score lowers the others' (the scorer learns a ranking, which
    is what top-k reads), and the scale of the scores stays free (only differences matter)."""
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    index_BQ = topk_indices(scores_BT, k)
    soft_BT = torch.softmax(scores_BT.float() / tau, dim=-1)
    return straight_through(hard_mask(index_BQ, scores_BT.shape[-1]), soft_BT), index_BQ


def gumbel_noise(shape: tuple[int, ...], device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gumbel samples, -log(-log(u)), u uniform in (0, 1) (float32; `generator` on `device`)."""
    u = torch.rand(shape, generator=generator, device=device)
    return -torch.log(-torch.log(u.clamp(torch.finfo(torch.float32).tiny, 1.0 - 1e-7)))


def gumbel_topk(scores_BT: torch.Tensor, k: int, tau: float = 1.0,
                noise_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask_BT, index_BQ): `straight_through_topk` of the Gumbel-perturbed scores `scores + noise`.

    The top-k of Gumbel-perturbed scores samples k tokens without replacement with probabilities softmax(scores)
    (the Gumbel-top-k trick): training explores other subsets than the current best.  `noise_BT` defaults to fresh
    Gumbel samples; pass it to reproduce a draw (tests pass zeros: then this is `straight_through_topk`)."""
    if noise_BT is None:
        noise_BT = gumbel_noise(tuple(scores_BT.shape), scores_BT.device)
    return straight_through_topk(scores_BT.float() + noise_BT, k, tau)


def random_indices(batch: int, num_tokens: int, k: int, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """index_BQ (Q = k): k distinct tokens per row, drawn uniformly with `generator`, in ascending order.

    Drawn where the generator lives (a CPU generator: on the host) and copied to `device` (a host-to-device copy,
    no read back)."""
    _check_budget(k, num_tokens)
    where = "cpu" if generator is None else generator.device
    keys_BT = torch.rand(batch, num_tokens, generator=generator, device=where)
    return keys_BT.argsort(dim=-1)[:, :k].sort(dim=-1).values.to(device)


def pool_rows(budget: int, height: int, width: int) -> list[int]:
    """How many pooled tokens each row band of an `height` x `width` grid gives, for `budget` tokens in all.

    The rule (ours): G = round(sqrt(budget * height / width)) row bands (the pooled grid keeps the patch grid's
    aspect), clamped to ceil(budget / width) .. min(height, budget) so that every band fits; the budget is split over
    the bands as evenly as possible, the first bands taking one more.  A budget g * g on a square grid is the g x g
    grid (`adaptive_avg_pool2d`); other budgets give a ragged grid, e.g. 13 on 8 x 8: bands of 4, 3, 3, 3."""
    _check_budget(budget, height * width)
    bands = min(max(round(math.sqrt(budget * height / width)), math.ceil(budget / width)), height, budget)
    base, extra = divmod(budget, bands)
    return [base + 1 if r < extra else base for r in range(bands)]


def _adaptive_bins(size: int, bins: int) -> list[tuple[int, int]]:
    """[start, end) of each of `bins` adaptive pooling bins over `size` (PyTorch's rule: floor, ceil)."""
    return [(i * size // bins, -(-(i + 1) * size // bins)) for i in range(bins)]


def pool_matrix(height: int, width: int, budget: int) -> torch.Tensor:
    """weights_QT (Q = budget, T = height * width, float32): pooled token q is sum_t weights[q, t] * patch t.

    Each row band of `pool_rows` averages its rows (adaptive bins over the height), then its columns in that
    band's number of adaptive bins over the width; pooled tokens are in raster order (band by band, left to right),
    every row sums to 1.  A fixed matrix, so pooling a batch is one matmul and the same for every image."""
    counts = pool_rows(budget, height, width)
    weights_QT = torch.zeros(budget, height * width)
    q = 0
    for (r0, r1), count in zip(_adaptive_bins(height, len(counts)), counts):
        for c0, c1 in _adaptive_bins(width, count):
            cell_HW = torch.zeros(height, width)
            cell_HW[r0:r1, c0:c1] = 1.0 / ((r1 - r0) * (c1 - c0))
            weights_QT[q] = cell_HW.flatten()
            q += 1
    return weights_QT


def _check_budget(k: int, num_tokens: int) -> None:
    if not 1 <= k <= num_tokens:
        raise ValueError(f"cannot keep {k} of {num_tokens} tokens: the budget must be in 1..{num_tokens}")
