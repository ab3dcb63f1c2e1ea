"""Bad inputs get a clear error where it is cheap to catch them, not a crash deep inside.

- the collate boundary (ds_smoes.data.collate): what modality labels, sample indices and images are made
  from, checked on the host: DatasetError;
- the MoE layer's entry: shapes and dtypes always (metadata only, no device sync): ValueError;
- the layer's `validate_inputs` debug option: values (labels in {0, 1}, sample ids in [0, S), finite hidden
  states and scores, at least one valid token): ValueError naming the argument, at the price of one
  device-to-host sync, which the default step does not pay (counted below);
- sample ids at or past the token count: refused by the per-sample losses in any case (free: they read the
  largest id anyway);
- zero tokens: with the option off, an empty output and l_aux 0 (an EP rank without tokens still joins the
  collectives); with it on, an error.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ds_smoes.core.config import SMoESConfig
from ds_smoes.core.errors import DatasetError
from ds_smoes.data import collate_prompts, collate_train
from ds_smoes.moe.layer import SMoESMoE
from ds_smoes.moe.collector import RoutingCollector

D = 8
LABELS_BT = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
MASK_BT = torch.tensor([[True] * 6, [True] * 5 + [False]])


def _layer(**fields) -> SMoESMoE:
    cfg = SMoESConfig(**{"num_experts": 4, "num_bins": 2, "k": 2, "score_type": "hard", "binning": "fixed",
                         **fields})
    torch.manual_seed(0)
    return SMoESMoE(D, nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D)), cfg)


def _x(*shape) -> torch.Tensor:
    return torch.randn(*(shape or (2, 6, D)), generator=torch.Generator().manual_seed(1))


# -- the collate boundary ---------------------------------------------------------------------------------
def _item(index=0, prompt=(1, 4, 4, 7, 5), answer=(9, 2), num_image_tokens=2, image=None) -> dict:
    return {"index": index, "prompt_ids": list(prompt), "answer_ids": list(answer),
            "num_image_tokens": num_image_tokens, "has_image": num_image_tokens > 0,
            "image_CHW": torch.zeros(1, 4, 4) if image is None else image}


def test_good_items_collate():
    batch = collate_train([_item(0), _item(1, num_image_tokens=0)])
    assert batch.modality_BT.tolist() == [[0, 1, 1, 0, 0, 0, 0], [0] * 7]
    assert collate_prompts([_item(3)]).sample_index_B.tolist() == [3]


@pytest.mark.parametrize("bad, message", [
    (dict(num_image_tokens=5), "num_image_tokens is 5, but its image tokens (modality label 1) must fit"),
    (dict(num_image_tokens=-1), "num_image_tokens is -1"),
    (dict(num_image_tokens=1.5), "be an integer in 0..4"),
    (dict(index=-3), "index is -3, expected the sample's non-negative position"),
    (dict(index="7"), "index is '7'"),
    (dict(prompt=(), num_image_tokens=0), "has no tokens"),
    (dict(image=torch.full((1, 4, 4), float("nan"))), "NaN or inf pixels"),
    (dict(image=torch.zeros(1, 8, 8)), "image_CHW has shape (1, 8, 8), item 0's has (1, 4, 4)"),
], ids=["image_tokens_past_prompt", "negative_image_tokens", "float_image_tokens", "negative_index",
        "string_index", "zero_tokens", "nan_image", "image_shape"])
@pytest.mark.parametrize("collate", [collate_train, collate_prompts])
def test_bad_items_raise_dataset_error_at_collate(bad, message, collate):
    with pytest.raises(DatasetError) as err:
        collate([_item(0), _item(**{"index": 1, **bad})])
    assert message in str(err.value) and "item 1 of the batch" in str(err.value)


def test_has_image_must_agree_with_image_tokens():
    item = {**_item(0, num_image_tokens=0), "has_image": True}
    with pytest.raises(DatasetError, match="has_image is True but num_image_tokens is 0"):
        collate_train([item])


# -- the layer's entry: shapes, always --------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(modality_labels=LABELS_BT.T), "modality_labels has shape (6, 2) but hidden_states (2, 6, 8) holds 12 "
                                        "tokens: give one entry per token, shape (2, 6) (or (12,))"),
    (dict(modality_labels=LABELS_BT.float()), "modality_labels has dtype torch.float32; it holds integers"),
    (dict(modality_labels=LABELS_BT, used_token=MASK_BT[:, :5]), "used_token has shape (2, 5)"),
    (dict(modality_labels=LABELS_BT, sample_ids=torch.zeros(2, 5, dtype=torch.long)), "sample_ids has shape (2, 5)"),
    (dict(modality_labels=LABELS_BT, sample_ids=torch.zeros(2, 6)), "sample_ids has dtype torch.float32"),
], ids=["labels_transposed", "float_labels", "mask_shape", "sample_ids_shape", "float_sample_ids"])
def test_per_token_arguments_must_match_the_hidden_states(kwargs, message):
    with pytest.raises(ValueError) as err:
        _layer()(_x(), **kwargs)
    assert message in str(err.value)


def test_scores_and_hidden_states_shapes():
    layer = _layer(score_type="attention")
    with pytest.raises(ValueError, match=r"modality_scores has shape \(2, 6, 3\).*a \[text, vision\] score pair per "
                                         r"token, shape \(2, 6, 2\)"):
        layer(_x(), modality_labels=LABELS_BT, modality_scores=torch.ones(2, 6, 3) / 3)
    with pytest.raises(ValueError, match=r"hidden_states has shape \(2, 6, 5\); the layer expects \[\.\.\., 8\]"):
        layer(_x(2, 6, 5), modality_labels=LABELS_BT)
    with pytest.raises(ValueError, match="hidden_states has dtype torch.int64"):
        layer(torch.zeros(2, 6, D, dtype=torch.long), modality_labels=LABELS_BT)
    # flat per-token arguments are fine too
    out, _, _ = layer(_x(), MASK_BT.reshape(-1), modality_labels=LABELS_BT.reshape(-1),
                      modality_scores=torch.full((12, 2), 0.5), sample_ids=torch.arange(2).repeat_interleave(6))
    assert out.shape == (2, 6, D)


# -- values, with validate_inputs -------------------------------------------------------------------------
def _nan_x():
    x = _x()
    x[1, 2, 3] = float("nan")
    return x


@pytest.mark.parametrize("case, message", [
    (dict(modality_labels=torch.tensor([[0, 2, 1, 0, 0, 0], [0] * 6])),
     "modality_labels must be 0 (text) or 1 (vision); 1 of 12 tokens are not, e.g. 2 at token 1"),
    (dict(modality_labels=-LABELS_BT), "modality_labels must be 0 (text) or 1 (vision); 5 of 12 tokens are not, "
                                        "e.g. -1 at token 0"),
    (dict(sample_ids=torch.tensor([[0] * 6, [1, 1, -1, 1, 1, 1]])),
     "sample_ids must lie in [0, 12) (each token's sample index, at most one sample per token); 1 do not, e.g. -1 "
     "at token 8"),
    (dict(sample_ids=torch.tensor([[0] * 6, [10 ** 6] * 6])), "sample_ids must lie in [0, 12)"),
    (dict(x=_nan_x()), "hidden_states holds NaN or inf at 1 of 12 tokens, first at token 8"),
    (dict(x=torch.full((2, 6, D), float("inf"))), "hidden_states holds NaN or inf at 12 of 12 tokens"),
    (dict(used_token=torch.zeros(2, 6, dtype=torch.bool)), "used_token marks none of the 12 tokens as valid"),
], ids=["label_2", "label_minus_1", "negative_sample_id", "huge_sample_id", "nan_hidden", "inf_hidden",
        "all_padding"])
@pytest.mark.parametrize("dispatch", ["deepspeed", "rank_once"])
def test_validate_inputs_names_the_bad_argument(case, message, dispatch):
    kwargs = {"modality_labels": LABELS_BT, "used_token": MASK_BT, **case}
    x = kwargs.pop("x", _x())
    used = kwargs.pop("used_token")
    with pytest.raises(ValueError) as err:
        _layer(validate_inputs=True, dispatch=dispatch)(x, used, **kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("fields", [dict(), dict(gate="ltdr", k=1, ltdr_top_a=3), dict(bin_objective="kl")],
                         ids=["smoes_mi", "ltdr", "smoes_kl"])
def test_sample_ids_past_the_token_count_are_refused_even_without_validate_inputs(fields):
    # the per-sample losses read the largest id anyway (the rows of their table): refusing it is free, and
    # saves allocating a row per id (a dataset index passed as a sample id)
    with pytest.raises(ValueError, match=r"sample ids reach 1000000 for 12 tokens: a sample id numbers the token's "
                                         r"sample within the batch"):
        _layer(**fields)(_x(), MASK_BT, modality_labels=LABELS_BT, sample_ids=torch.tensor([[0] * 6, [10 ** 6] * 6]))


def test_validate_inputs_checks_attention_scores():
    layer = _layer(score_type="attention", validate_inputs=True)
    scores = torch.full((2, 6, 2), 0.5)
    scores[0, 4] = torch.tensor([1.5, -0.5])
    with pytest.raises(ValueError, match=r"modality_scores must be finite and in \[0, 1\].*1 of 12 tokens are not, "
                                         r"e\.g\. \[1\.5, -0\.5\] at token 4"):
        layer(_x(), modality_labels=LABELS_BT, modality_scores=scores)


def test_validate_inputs_changes_nothing_on_good_inputs():
    outs = []
    for validate in (False, True):
        layer = _layer(validate_inputs=validate, score_type="gaussian", binning="adaptive")
        outs.append(layer(_x(), MASK_BT, modality_labels=LABELS_BT, sample_ids=torch.tensor([[1] * 6, [0] * 6])))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_validate_inputs_is_off_by_default_and_documented():
    field = SMoESConfig.model_fields["validate_inputs"]
    assert SMoESConfig().validate_inputs is False
    assert "device-to-host sync" in field.description


# -- zero tokens ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(0, 6, D), (2, 0, D), (0, D)], ids=["no_samples", "no_positions", "flat"])
@pytest.mark.parametrize("fields", [dict(), dict(dispatch="rank_once"), dict(score_type="gaussian"),
                                    dict(gate="topk"), dict(gate="ltdr", k=1, ltdr_top_a=3),
                                    dict(drop_tokens=True)],
                         ids=["smoes", "rank_once", "gaussian", "topk", "ltdr", "capacity"])
def test_zero_tokens_give_an_empty_output_and_zero_loss(shape, fields):
    layer = _layer(**fields)
    x = torch.randn(*shape, requires_grad=True)
    with RoutingCollector([layer]) as collector:
        out, l_aux, counts = layer(x, modality_labels=torch.zeros(shape[:-1], dtype=torch.long))
    assert out.shape == shape and float(l_aux.detach()) == 0.0 and counts.tolist() == [0, 0, 0, 0]
    (out.sum() + l_aux).backward()
    assert x.grad.shape == shape
    [[call]] = collector.take()
    assert call.stats.num_tokens == 0 and call.comm().num_tokens == 0


def test_zero_tokens_are_an_error_under_validate_inputs():
    with pytest.raises(ValueError, match=r"hidden_states holds no token \(shape \(0, 8\)\): an empty batch"):
        _layer(validate_inputs=True)(torch.randn(0, 6, D), modality_labels=torch.zeros(0, 6, dtype=torch.long))


# -- the cost: no host sync for value checks in the default step -----------------------------------------------
class _CountHostSyncs(TorchDispatchMode):
    """Counts `aten._local_scalar_dense`: every `.item()`, `int(t)`, `bool(t)` of a tensor (a device-to-host
    sync on an accelerator)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


# one training forward of _layer on (_x(), MASK_BT, LABELS_BT), measured before the checks were added
SYNCS_BEFORE_THE_CHECKS = {"deepspeed": 12, "rank_once": 9}


@pytest.mark.parametrize("dispatch", ["deepspeed", "rank_once"])
def test_value_checks_cost_no_host_sync_unless_asked_for(dispatch):
    counts = {}
    for validate in (False, True):
        layer = _layer(dispatch=dispatch, validate_inputs=validate)
        with _CountHostSyncs() as syncs:
            layer(_x(), MASK_BT, modality_labels=LABELS_BT)
        counts[validate] = syncs.count
    assert counts[False] <= SYNCS_BEFORE_THE_CHECKS[dispatch]  # the shape checks read only metadata
    assert counts[True] == counts[False] + 1  # all value checks come back as one boolean
