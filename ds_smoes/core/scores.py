"""Soft modality scores M[token, modality] (docs/method.md, "Soft modality scores").

Modality index 0 is text, 1 is vision.  Each score row is a distribution over modalities.
Scores are routing side-information, without gradient: `hard_scores`, `attention_score_update`,
`attention_score_mix_update`, `gaussian_scores` and `GaussianModalityStats` return tensors that need no grad.
The helpers `gaussian_log_likelihood` and `ema_welford_update` are plain math and keep the gradient of their
inputs.

Shapes: S tokens (flattened), B batch, T sequence, D hidden, M modalities (2).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ds_smoes.core.step_state import Float32State, warn_unapplied

TEXT, VISION = 0, 1
NUM_MODALITIES = 2

ReduceFn = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over the data-parallel world in place and returns it (identity on one process)."""


def hard_scores(labels_S: torch.Tensor) -> torch.Tensor:
    """One-hot scores from hard labels (0 text, 1 vision): `[S] -> [S, 2]` float32 (a comparison, not
    `F.one_hot`, which reads the labels' range back to the host on the CPU)."""
    return (labels_S.long().unsqueeze(-1) == torch.arange(NUM_MODALITIES, device=labels_S.device)).float()


@torch.no_grad()
def attention_score_update(modality_BTM: torch.Tensor, attn_probs_BTT: torch.Tensor,
                           attn_out_norm_BT: torch.Tensor, resid_norm_BT: torch.Tensor) -> torch.Tensor:
    """One residual step of the attention score from the attention probabilities.

    M~ = A @ M (what each token attended to), then `attention_score_mix_update`.  attn_probs_BTT are the
    head-averaged attention probabilities (rows sum to 1 over keys).  Without the probabilities (fused
    attention kernels), `ds_smoes.core.attention_score.head_mean_attention_mix` computes M~ directly.
    """
    mixed_BTM = torch.bmm(attn_probs_BTT.float(), modality_BTM.float())
    return attention_score_mix_update(modality_BTM, mixed_BTM, attn_out_norm_BT, resid_norm_BT)


@torch.no_grad()
def attention_score_mix_update(modality_BTM: torch.Tensor, mixed_BTM: torch.Tensor,
                               attn_out_norm_BT: torch.Tensor, resid_norm_BT: torch.Tensor) -> torch.Tensor:
    """One residual step of the attention score from M~ = A @ M (mixed_BTM: what each token attended to).

    A norm-weighted mix mirroring x' = x + attn_out:  M' = (|attn_out| M~ + |x| M) / (|attn_out| + |x|).
    A token with |attn_out| + |x| == 0 has no weights to mix by: it keeps its score, M' = M
    (a row of M' still sums to 1; the weights 0/0 would give NaN, a clamped denominator zeros).
    """
    w_attn = attn_out_norm_BT.float().unsqueeze(-1)
    w_res = resid_norm_BT.float().unsqueeze(-1)
    total_BT1 = w_attn + w_res
    moved_BT1 = total_BT1 > 0
    new_BTM = (w_attn * mixed_BTM.float() + w_res * modality_BTM.float()) / torch.where(moved_BT1, total_BT1, 1.0)
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


def gaussian_sufficient_stats(x_SD: torch.Tensor, labels_S: torch.Tensor, valid_S: torch.Tensor) -> torch.Tensor:
    """stats_MX [M, 2D + 1] (float32): per hard modality, sum x, sum x^2 and the token count, over valid tokens.
    Sums, so the statistics of several batches (or ranks) add up."""
    x = x_SD.detach().float()
    onehot_SM = hard_scores(labels_S) * valid_S.float().unsqueeze(-1)
    return torch.cat([onehot_SM.T @ x, onehot_SM.T @ (x * x), onehot_SM.sum(0).unsqueeze(1)], dim=1)


def gaussian_stats_update(mean_MD: torch.Tensor, var_MD: torch.Tensor, count_M: torch.Tensor,
                          stats_MX: torch.Tensor, beta: float, var_floor: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean_MD, var_MD, count_M) after folding in one step's sufficient statistics (`gaussian_sufficient_stats`).

    Per modality m with n tokens this step: none -> unchanged; the first observation ever (count 0) -> the
    batch's mean and variance; else `ema_welford_update`.  Variances are floored at `var_floor`.  Branch-free
    (no value is read back to the host).
    """
    d = mean_MD.shape[1]
    sum_MD, sumsq_MD, n_M = stats_MX[:, :d], stats_MX[:, d:2 * d], stats_MX[:, 2 * d]
    n_M1 = n_M.unsqueeze(1)
    batch_mean_MD = sum_MD / n_M1.clamp_min(1.0)
    batch_var_MD = (sumsq_MD / n_M1.clamp_min(1.0) - batch_mean_MD * batch_mean_MD).clamp_min(0.0)
    ema_mean_MD, ema_var_MD = ema_welford_update(mean_MD, var_MD, batch_mean_MD, batch_var_MD, beta)
    first_M1 = (count_M == 0).unsqueeze(1)
    new_mean_MD = torch.where(first_M1, batch_mean_MD, ema_mean_MD)
    new_var_MD = torch.where(first_M1, batch_var_MD, ema_var_MD).clamp_min(var_floor)
    seen_M1 = n_M1 >= 1
    return (torch.where(seen_M1, new_mean_MD, mean_MD), torch.where(seen_M1, new_var_MD, var_MD),
            count_M + torch.where(n_M >= 1, n_M, 0.0))


class GaussianModalityStats(Float32State):
    """Per-modality diagonal Gaussian of one MoE layer's input, kept in buffers.

    `forward` scores tokens with the current estimate.  The estimate changes once per optimizer
    step, never inside a forward: `record` (the layer's training forward) adds the batch's
    sufficient statistics of hard-labelled tokens to `pending_MX`; once per step
    `ds_smoes.moe.updates.apply_step_updates` sums `pending()` over the data-parallel world and calls
    `apply_pending`, so every rank holds identical buffers.  `update` does the three at once (a direct caller's
    one-liner).  Buffers travel with `state_dict` and DeepSpeed checkpoints.
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
        # sufficient statistics recorded since the last step (this rank), not checkpointed
        self.register_buffer("pending_MX", torch.zeros(NUM_MODALITIES, 2 * hidden_size + 1), persistent=False)
        self._unapplied = 0   # forwards recorded since the last `apply_pending`

    @torch.no_grad()
    def record(self, x_SD: torch.Tensor, labels_S: torch.Tensor, valid_S: torch.Tensor) -> None:
        self.pending_MX.add_(gaussian_sufficient_stats(x_SD, labels_S, valid_S))
        self._unapplied = warn_unapplied(self._unapplied + 1, "Gaussian modality statistics")

    def pending(self) -> list[torch.Tensor]:
        return [self.pending_MX]

    @torch.no_grad()
    def apply_pending(self, reduced: list[torch.Tensor]) -> None:
        """Fold the world's pending statistics in and clear the pending ones."""
        self._fold(reduced[0])
        self.pending_MX.zero_()
        self._unapplied = 0

    @torch.no_grad()
    def update(self, x_SD: torch.Tensor, labels_S: torch.Tensor, valid_S: torch.Tensor,
               reduce_fn: ReduceFn | None = None) -> None:
        """Fold one batch in at once (summed over the world by `reduce_fn`), leaving the pending statistics alone."""
        stats_MX = gaussian_sufficient_stats(x_SD, labels_S, valid_S)
        self._fold(reduce_fn(stats_MX) if reduce_fn is not None else stats_MX)

    def _fold(self, stats_MX: torch.Tensor) -> None:
        mean_MD, var_MD, count_M = gaussian_stats_update(self.mean_MD, self.var_MD, self.count_M, stats_MX,
                                                         self.beta, self.var_floor)
        self.mean_MD.copy_(mean_MD)
        self.var_MD.copy_(var_MD)
        self.count_M.copy_(count_M)

    @torch.no_grad()
    def forward(self, x_SD: torch.Tensor) -> torch.Tensor:
        return gaussian_scores(x_SD, self.mean_MD, self.var_MD, self.tau)
