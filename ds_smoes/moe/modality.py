"""The soft modality scores an MoE layer hands its gate: one function, shared by the layers (`SMoESMoE` on
DeepSpeed's MoE, `SMoESAutoEPLayer` on DeepSpeed's AutoEP).

Shapes: S tokens, D hidden, M = 2 modalities.
"""
from __future__ import annotations

import torch

from ds_smoes.core.config import SMoESConfig
from ds_smoes.core.scores import GaussianModalityStats, hard_scores
from ds_smoes.core.step_state import in_backward


def modality_scores(config: SMoESConfig, scorer: GaussianModalityStats | None, training: bool, x_SD: torch.Tensor,
                    labels_S: torch.Tensor, valid_S: torch.Tensor, given_SM: torch.Tensor | None) -> torch.Tensor:
    """The score `config` asks for, detached, [S, 2]; the hard one when the gate does not read it.

    gaussian: `scorer`'s estimate of the last optimizer step (as a recomputation sees it), and in training this
    forward's statistics recorded for the next step's update (`ds_smoes.moe.updates`).  attention: `given_SM`, the
    score the model's attention carried to this layer."""
    kind = config.effective_score_type
    if kind == "hard":
        return hard_scores(labels_S)
    if kind == "gaussian":
        scores_SM = scorer(x_SD)
        if training and not in_backward():
            scorer.record(x_SD, labels_S, valid_S)
        return scores_SM
    if given_SM is None:
        raise ValueError("score_type='attention' needs modality_scores=... from the model's attention "
                         "(see ds_smoes.core.scores.attention_score_update); pass them, or use "
                         "score_type='gaussian' or 'hard'")
    return given_SM.reshape(-1, 2).detach().float()
