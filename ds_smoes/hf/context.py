"""Per-forward modality side information shared by the hooks and the converted MoE blocks.

A Hugging Face decoder layer calls its MLP with the hidden states only.  The SMoES gate also
needs, per token, the hard modality label, whether the token is padding and (for
`score_type="attention"`) the soft attention score carried through the depth.  The converted
model fills one `ModalityContext` at the start of each forward (from `input_ids` and
`attention_mask`); hooks on the decoder layers update the attention score layer by layer; each
`SMoESBlock` reads it and hands its `l_aux` back.

Shapes: B batch, T tokens of this forward, U key positions (T plus cached tokens), M = 2 modalities.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ds_smoes.core.scores import hard_scores


@dataclass
class ModalityBatch:
    labels_BT: torch.Tensor                 # 0 text, 1 vision (image or video placeholder)
    valid_BT: torch.Tensor                  # False on padding
    scores_BTM: torch.Tensor | None         # running attention score; None unless tracked


@dataclass
class ModalityContext:
    """State of the current forward.  `track_scores`: carry the attention score through the depth."""
    image_token_ids: tuple[int, ...]
    track_scores: bool
    batch: ModalityBatch | None = None
    aux_losses: list = field(default_factory=list)
    resid_norm_BT: torch.Tensor | None = None        # |x| entering the current decoder layer
    pending_probs_BTU: torch.Tensor | None = None    # head-averaged attention probs recorded for this layer
    key_scores: dict = field(default_factory=dict)   # layer -> [B, U, M] scores of all tokens seen (cached decoding)

    def begin(self, input_ids_BT: torch.Tensor, attention_mask_BU: torch.Tensor | None, cached: bool,
              track: bool | None = None) -> None:
        """Start a forward: hard labels from the placeholder token ids, validity from the attention mask.  `track`:
        carry the attention score in this forward (default `track_scores`; the model passes False where nothing
        computes the losses it feeds)."""
        ids = torch.tensor(self.image_token_ids, device=input_ids_BT.device, dtype=input_ids_BT.dtype)
        labels_BT = torch.isin(input_ids_BT, ids).long()
        t = input_ids_BT.shape[1]
        valid_BT = (attention_mask_BU[:, -t:].bool() if attention_mask_BU is not None and attention_mask_BU.dim() == 2
                    else torch.ones_like(labels_BT, dtype=torch.bool))
        labels_BT = labels_BT * valid_BT
        track = self.track_scores if track is None else track and self.track_scores
        scores = hard_scores(labels_BT.reshape(-1)).reshape(*labels_BT.shape, 2) if track else None
        self.batch = ModalityBatch(labels_BT, valid_BT, scores)
        self.aux_losses = []
        if not cached:
            self.key_scores = {}

    def require(self, leading_shape: tuple[int, ...]) -> ModalityBatch:
        if self.batch is None:
            raise RuntimeError("an SMoES block ran without modality information: call the converted model "
                               "(ds_smoes.hf.SMoESHFModel) with input_ids, not the inner Hugging Face modules")
        if tuple(self.batch.labels_BT.shape) != tuple(leading_shape):
            raise RuntimeError(f"SMoES block got hidden states for {tuple(leading_shape)} tokens but the forward's "
                               f"input_ids were {tuple(self.batch.labels_BT.shape)}: pass input_ids (not inputs_embeds) "
                               "to the converted model")
        return self.batch

    def take_aux(self, like: torch.Tensor) -> torch.Tensor:
        """Sum of the MoE layers' l_aux of this forward (zero without MoE layers); clears them."""
        total = like.new_zeros(())
        for l_aux in self.aux_losses:
            total = total + l_aux
        self.aux_losses = []
        return total
