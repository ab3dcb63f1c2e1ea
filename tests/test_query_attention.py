"""Stage 2's score (issue 19): the attention chosen query rows pay to each key, from those rows only, equals the rows
of the materialised softmax(QK^T) it claims to read: by hand, against a dense [T, T] reference, and against the
built-in block's eager attention probabilities (either attention path's weights give the same score); and the
per-sample top-budget selection."""
import math

import pytest
import torch

from ds_smoes.compress.query_attention import keep_top_budget, query_attention_scores
from ds_smoes.model.attention import SelfAttention, attention_mask
from ds_smoes.compress.in_llm import block_vision_scores, query_rows


def test_scores_by_hand():
    # one head, d = 1, scaling 1: logits = q * k.  Keys k = [0, ln 2, ln 3]; query q=1 at position 2 sees all
    # three: e^k = [1, 2, 3] -> [1/6, 2/6, 3/6]; query q=1 at position 1 sees keys 0, 1: [1/3, 2/3, 0]
    key = torch.tensor([0.0, math.log(2), math.log(3)]).reshape(1, 1, 3, 1)
    query = torch.ones(1, 1, 2, 1)
    both = query_attention_scores(query, key, torch.tensor([[2, 1]]), torch.tensor([[True, True]]), scaling=1.0)
    assert torch.allclose(both, torch.tensor([[1 / 4, 1 / 2, 1 / 4]]))
    # the second query row is padding: the first row alone
    one = query_attention_scores(query, key, torch.tensor([[2, 1]]), torch.tensor([[True, False]]), scaling=1.0)
    assert torch.allclose(one, torch.tensor([[1 / 6, 2 / 6, 3 / 6]]))
    # key 1 is padding: position 2 renormalises over keys 0, 2: [1/4, 0, 3/4]
    masked = query_attention_scores(query, key, torch.tensor([[2, 1]]), torch.tensor([[True, False]]),
                                    torch.tensor([[True, False, True]]), scaling=1.0)
    assert torch.allclose(masked, torch.tensor([[1 / 4, 0.0, 3 / 4]]))
    # a second head with q = 0 is uniform over the allowed keys; heads are averaged: ([1/6, 2/6, 3/6] + 1/3) / 2
    two_heads = query_attention_scores(torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1), key.expand(1, 2, 3, 1),
                                       torch.tensor([[2]]), torch.tensor([[True]]), scaling=1.0)
    assert torch.allclose(two_heads, torch.tensor([[1 / 4, 1 / 3, 5 / 12]]))
    # a row without a valid query scores nothing; the default scaling is 1/sqrt(d)
    none = query_attention_scores(query, key, torch.tensor([[2, 1]]), torch.tensor([[False, False]]))
    assert torch.equal(none, torch.zeros(1, 3))


def dense_reference(q_BATd, k_BATd, valid_BT, query_BT):
    """The materialised form: the [T, T] causal softmax with key padding, head-mean, mean over the query rows."""
    probs_BATT = torch.softmax((q_BATd @ k_BATd.transpose(-1, -2) / math.sqrt(q_BATd.shape[-1])).masked_fill(
        ~attention_mask(valid_BT, causal=True), float("-inf")), dim=-1)
    rows_BTT = probs_BATT.mean(1) * query_BT[:, :, None]
    return rows_BTT.sum(1) / query_BT.sum(1, keepdim=True).clamp_min(1)


def test_scores_equal_the_dense_softmax_rows():
    g = torch.Generator().manual_seed(0)
    b, a, t, d = 3, 4, 9, 8
    q_BATd, k_BATd = torch.randn(b, a, t, d, generator=g) * 2, torch.randn(b, a, t, d, generator=g) * 2
    valid_BT = torch.ones(b, t, dtype=torch.bool)
    valid_BT[1, :3] = False                  # left padding
    valid_BT[2, 7:] = False                  # right padding
    query_BT = torch.rand(b, t, generator=g) < 0.4
    query_BT[:, t - 3] = True
    query_BT &= valid_BT
    query_BT[2] = False                      # a row without queries
    reference = dense_reference(q_BATd, k_BATd, valid_BT, query_BT.float())
    n_q = int(query_BT.sum(1).max())
    position_BQ = torch.sort((~query_BT).to(torch.uint8), dim=1, stable=True).indices[:, :n_q]
    query_valid_BQ = torch.gather(query_BT, 1, position_BQ)
    q_BAQd = torch.gather(q_BATd, 2, position_BQ[:, None, :, None].expand(b, a, n_q, d))
    got = query_attention_scores(q_BAQd, k_BATd, position_BQ, query_valid_BQ, valid_BT)
    assert (got - reference).abs().max() < 1e-6
    assert torch.equal(got[2], torch.zeros(t))
    assert torch.allclose(got[:2].sum(1), torch.ones(2))     # each row's probabilities sum to one


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_block_scores_equal_the_eager_attention_probabilities(impl):
    """The built-in block's eager attention returns mean_h A @ M; with M the identity over positions that is the
    head-mean probability matrix itself.  The score read from a module of either path (same weights) is its
    query rows' mean."""
    torch.manual_seed(1)
    b, t, d_model = 3, 10, 32
    eager = SelfAttention(d_model, 4, "eager", causal=True)
    with torch.no_grad():
        eager.qkv.weight.mul_(3.0)
    attn = SelfAttention(d_model, 4, impl, causal=True)
    attn.load_state_dict(eager.state_dict())
    h_BTD = torch.randn(b, t, d_model)
    valid_BT = torch.ones(b, t, dtype=torch.bool)
    valid_BT[0, :4] = False                  # a left-padded prompt
    valid_BT[1, 8:] = False                  # a right-padded training row
    modality_BT = torch.zeros(b, t, dtype=torch.long)
    modality_BT[:, 4:7] = 1
    prompt_BT = torch.ones(b, t, dtype=torch.bool)
    prompt_BT[2, 8:] = False                 # an answer: never a query
    identity_BTT = torch.eye(t).expand(b, t, t)
    with torch.no_grad():
        _, probs_BTT = eager(h_BTD, attention_mask(valid_BT, causal=True), valid_BT, identity_BTT)
    for last_only in (False, True):
        query_BT = query_rows(valid_BT, modality_BT, prompt_BT, last_only)
        expected = (probs_BTT * query_BT[:, :, None]).sum(1) / query_BT.sum(1, keepdim=True)
        got = block_vision_scores(attn, h_BTD, query_BT, valid_BT, int(query_BT.sum(1).max()))
        assert (got - expected).abs().max() < 1e-6
        assert float(got[:, 4:7].min()) > 0           # the vision keys are read
    # FastV's query: each row's last valid prompt text token
    assert query_rows(valid_BT, modality_BT, prompt_BT, True).nonzero().tolist() == [[0, 9], [1, 7], [2, 7]]


def test_keep_top_budget():
    score_BT = torch.tensor([[0.1, 0.5, 0.2, 0.5, 0.9, 0.3],
                             [0.4, 0.1, 0.3, 0.2, 0.0, 0.0],
                             [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    candidate_BT = torch.tensor([[0, 1, 1, 1, 1, 0],
                                 [1, 1, 1, 0, 0, 0],
                                 [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    keep = keep_top_budget(score_BT, candidate_BT, torch.tensor([2, 5, 2]))
    # row 0: 0.9 at 4, then the tie 0.5 at 1 and 3 goes to the earlier, 1 (position 5's 0.3 is no candidate)
    assert keep.nonzero().tolist() == [[0, 1], [0, 4], [1, 0], [1, 1], [1, 2]]   # row 1: fewer than the budget
    assert not keep_top_budget(score_BT, candidate_BT, torch.tensor([0, 0, 0])).any()
    with pytest.raises(ValueError, match="must be"):
        keep_top_budget(score_BT, candidate_BT, torch.tensor([1, 1]))
