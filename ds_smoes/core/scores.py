"""Soft modality scores M[token, modality] (SMOES.md section 1).

Modality index 0 is text, 1 is vision.  Each score row is a distribution over modalities.
Scores are routing side-information, without gradient: `hard_scores`, `attention_score_update`,
`gaussian_scores` and `GaussianModalityStats` return tensors that need no grad.  The helpers
`gaussian_log_likelihood` and `ema_welford_update` are plain math and keep the gradient of their inputs.

Shapes: S tokens (flattened), B batch, T sequence, D hidden, M modalities (2).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

TEXT, VISION = 0, 1
NUM_MODALITIES = 2

ReduceFn = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over the data-parallel world in place and returns it (identity on one process)."""


def hard_scores(labels_S: torch.Tensor) -> torch.Tensor:
    """One-hot scores from hard labels (0 text, 1 vision): `[S] -> [S, 2]` float32."""
    return F.one_hot(labels_S.long(), NUM_MODALITIES).float()


@torch.no_grad()
def attention_score_update(modality_BTM: torch.Tensor, attn_probs_BTT: torch.Tensor,
                           attn_out_norm_BT: torch.Tensor, resid_norm_BT: torch.Tensor) -> torch.Tensor:
    """One residual step of the attention score.

    M~ = A @ M (what each token attended to), then a norm-weighted mix mirroring
    x' = x + attn_out:  M' = (|attn_out| M~ + |x| M) / (|attn_out| + |x|).

    attn_probs_BTT are the head-averaged attention probabilities (rows sum to 1 over keys).
    A token with |attn_out| + |x| == 0 has no weights to mix by: it keeps its score, M' = M
    (a row of M' still sums to 1; the weights 0/0 would give NaN, a clamped denominator zeros).
    """
    mixed_BTM = torch.bmm(attn_probs_BTT.float(), modality_BTM.float())
    w_attn = attn_out_norm_BT.float().unsqueeze(-1)
    w_res = resid_norm_BT.float().unsqueeze(-1)
    total_BT1 = w_attn + w_res
    moved_BT1 = total_BT1 > 0
    new_BTM = (w_attn * mixed_BTM + w_res * modality_BTM.float()) / torch.where(moved_BT1, total_BT1, 1.0)
    return torch.where(moved_BT1, new_BTM, modality_BTM.float())


def gaussian_log_likelihood(x_SD: torch.Tensor, mean_MD: torch.Tensor, var_MD: torch.Tensor) -> torch.Tensor:
    """LL[s, m] = -1/2 sum_d (log var[m,d] + (x[s,d] - mean[m,d])^2 / var[m,d])  ->  [S, M]."""
    x = x_SD.float()
    inv_var_MD = var_MD.reciprocal()
    # (x - mu)^2 / var expanded so no [S, M, D] tensor is materialised.
    quad_SM = (x * x) @ inv_var_MD.T - 2.0 * x @ (mean_MD * inv_var_MD).T + (mean_MD * mean_MD * inv_var_MD).sum(-1)
    return -0.5 * (var_MD.log().sum(-1) + quad_SM)


@torch.no_grad()
def gaussian_scores(x_SD: torch.Tensor, mean_MD: torch.Tensor, var_MD: torch.Tensor, tau: float) -> torch.Tensor:
    """M[s, m] = softmax_m(LL[s, m] / tau)."""
    return torch.softmax(gaussian_log_likelihood(x_SD, mean_MD, var_MD) / tau, dim=-1)


def ema_welford_update(mean_D: torch.Tensor, var_D: torch.Tensor, batch_mean_D: torch.Tensor,
                       batch_var_D: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """EMA form of Welford's update with a whole batch as one observation.

    With a = 1 - beta and delta = batch_mean - mean:
      mean' = mean + a * delta
      var'  = beta * (var + a * delta^2) + a * batch_var
    (the single-sample EMA-Welford step, plus the batch's own spread).
    """
    a = 1.0 - beta
    delta_D = batch_mean_D - mean_D
    new_mean_D = mean_D + a * delta_D
    new_var_D = beta * (var_D + a * delta_D * delta_D) + a * batch_var_D
    return new_mean_D, new_var_D


class GaussianModalityStats(nn.Module):
    """Per-modality diagonal Gaussian of one MoE layer's input, kept in buffers.

    `update` folds a training batch in (hard-labelled tokens only, statistics summed over the
    data-parallel world by `reduce_fn` so that every rank holds identical buffers); `forward`
    scores tokens.  Buffers travel with `state_dict` and DeepSpeed checkpoints.
    """

    def __init__(self, hidden_size: int, beta: float = 0.99, tau: float | None = None,
                 var_floor: float = 1e-4) -> None:
        super().__init__()
        self.beta = beta
        self.tau = tau if tau is not None else 0.5 * hidden_size
        self.var_floor = var_floor
        self.register_buffer("mean_MD", torch.zeros(NUM_MODALITIES, hidden_size))
        self.register_buffer("var_MD", torch.ones(NUM_MODALITIES, hidden_size))
        self.register_buffer("count_M", torch.zeros(NUM_MODALITIES))  # tokens folded in so far

    @torch.no_grad()
    def update(self, x_SD: torch.Tensor, labels_S: torch.Tensor, valid_S: torch.Tensor,
               reduce_fn: ReduceFn | None = None) -> None:
        x = x_SD.detach().float()
        onehot_SM = hard_scores(labels_S) * valid_S.float().unsqueeze(-1)
        # Sufficient statistics in one tensor so a single all-reduce syncs them: [M, 2D + 1].
        stats = torch.cat([onehot_SM.T @ x, onehot_SM.T @ (x * x), onehot_SM.sum(0, keepdim=True).T], dim=1)
        if reduce_fn is not None:
            stats = reduce_fn(stats)
        d = x.shape[1]
        sum_MD, sumsq_MD, n_M = stats[:, :d], stats[:, d:2 * d], stats[:, 2 * d]
        for m in range(NUM_MODALITIES):
            n = n_M[m]
            if n < 1:
                continue
            batch_mean = sum_MD[m] / n
            batch_var = (sumsq_MD[m] / n - batch_mean * batch_mean).clamp_min(0.0)
            if self.count_M[m] == 0:  # first observation initialises the estimate
                new_mean, new_var = batch_mean, batch_var
            else:
                new_mean, new_var = ema_welford_update(self.mean_MD[m], self.var_MD[m], batch_mean, batch_var,
                                                       self.beta)
            self.mean_MD[m] = new_mean
            self.var_MD[m] = new_var.clamp_min(self.var_floor)
            self.count_M[m] += n

    @torch.no_grad()
    def forward(self, x_SD: torch.Tensor) -> torch.Tensor:
        return gaussian_scores(x_SD, self.mean_MD, self.var_MD, self.tau)
