"""Checks of an MoE layer's inputs, with messages a user can act on (`SMoESMoE.forward` calls them).

Shapes and dtypes are read from tensor metadata: no device sync, so they always run.  Values need a
device-to-host read, so they run only with `SMoESConfig.validate_inputs` (a debug option), and then
come back as one boolean.
"""
from __future__ import annotations

import math

import torch


def check_input_shapes(hidden_states: torch.Tensor, hidden_size: int, **per_token: torch.Tensor | None) -> None:
    """Shapes and dtypes of the layer's arguments, from tensor metadata only (no device sync, so always run).

    hidden_states is [..., hidden_size]; every per-token argument (modality_labels, used_token, sample_ids;
    modality_scores with a trailing 2) has hidden_states' leading shape, or is flat with one entry per token.
    """
    shape = tuple(hidden_states.shape)
    if hidden_states.dim() < 2 or shape[-1] != hidden_size:
        raise ValueError(f"hidden_states has shape {shape}; the layer expects [..., {hidden_size}] "
                         f"(e.g. [batch, seq, {hidden_size}]): its last dimension is the hidden size it was built with")
    if not hidden_states.is_floating_point():
        raise ValueError(f"hidden_states has dtype {hidden_states.dtype}; pass the floating-point hidden states "
                         "(embed token ids first)")
    lead = shape[:-1]
    num_tokens = math.prod(lead)
    for name, t in per_token.items():
        if t is None:
            continue
        tail = (2,) if name == "modality_scores" else ()
        if tuple(t.shape) not in (lead + tail, (num_tokens, *tail)):
            what = "a [text, vision] score pair" if tail else "one entry"
            raise ValueError(f"{name} has shape {tuple(t.shape)} but hidden_states {shape} holds {num_tokens} "
                             f"tokens: give {what} per token, shape {lead + tail} (or {(num_tokens, *tail)})")
        if name in ("modality_labels", "sample_ids") and (t.is_floating_point() or t.is_complex()):
            raise ValueError(f"{name} has dtype {t.dtype}; it holds integers ("
                             + ("0 text, 1 vision" if name == "modality_labels" else "each token's sample index")
                             + "): pass an integer or bool tensor, e.g. .long() of a mask")


def check_input_values(x_SD: torch.Tensor, labels_S: torch.Tensor, valid_S: torch.Tensor,
                       sample_id_S: torch.Tensor | None, scores_SM: torch.Tensor | None) -> None:
    """Value checks of `SMoESConfig.validate_inputs`, ValueError naming the argument on the first that fails.

    The checks run on the device and come back as ONE boolean (one device-to-host sync); only a failure
    pays more syncs, to say where.  sample_id_S / scores_SM: None when the caller did not pass them.
    """
    num_tokens = x_SD.shape[0]
    if num_tokens == 0:
        raise ValueError(f"hidden_states holds no token (shape {tuple(x_SD.shape)}): an empty batch reaches "
                         "the MoE layer; check the data loader and the batch size (with validate_inputs off "
                         "it returns an empty output and l_aux 0)")
    bad = {
        "modality_labels": (labels_S != 0) & (labels_S != 1),
        "sample_ids": (((sample_id_S < 0) | (sample_id_S >= num_tokens)) if sample_id_S is not None
                       else torch.zeros_like(valid_S)),
        "hidden_states": ~torch.isfinite(x_SD).all(1),
        "modality_scores": (~(torch.isfinite(scores_SM) & (scores_SM >= 0) & (scores_SM <= 1)).all(1)
                            if scores_SM is not None else torch.zeros_like(valid_S)),
    }
    any_bad_X = torch.stack([b.any() for b in bad.values()] + [~valid_S.any()])
    if not bool(any_bad_X.any()):  # the one sync
        return
    for name, bad_S in bad.items():
        where = bad_S.nonzero().flatten()
        if where.numel() == 0:
            continue
        first = int(where[0])
        if name == "modality_labels":
            raise ValueError(f"modality_labels must be 0 (text) or 1 (vision); {where.numel()} of {num_tokens} "
                             f"tokens are not, e.g. {int(labels_S[first])} at token {first} (flattened): map image "
                             "tokens to 1 and every other token, padding included, to 0")
        if name == "sample_ids":
            raise ValueError(f"sample_ids must lie in [0, {num_tokens}) (each token's sample index, at most one "
                             f"sample per token); {where.numel()} do not, e.g. {int(sample_id_S[first])} at token "
                             f"{first} (flattened): number the batch's samples 0, 1, ...")
        if name == "hidden_states":
            raise ValueError(f"hidden_states holds NaN or inf at {where.numel()} of {num_tokens} tokens, first at "
                             f"token {first} (flattened): the layers before this MoE layer diverged or the input "
                             "is corrupt; check the data, lower the learning rate or enable gradient clipping")
        raise ValueError(f"modality_scores must be finite and in [0, 1] (a [text, vision] pair per token); "
                         f"{where.numel()} of {num_tokens} tokens are not, e.g. {scores_SM[first].tolist()} at "
                         f"token {first} (flattened)")
    raise ValueError(f"used_token marks none of the {num_tokens} tokens as valid (all padding): check the mask's "
                     "polarity (True or 1 = real token) and that the batch is not empty")
