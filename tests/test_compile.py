"""`torch.compile` of the SMoES layer (one process): forward and backward equal eager, and the graph breaks that
remain are counted and pinned.

What breaks a graph, and why it stays (docs/dispatch.md, "Compiling"):
- the stock dispatch without dropping reads its capacity on the host: the [E, C, D] buffer's C is the largest
  expert load (DeepSpeed's dropless gates read it alike); with `drop_tokens` the capacity comes from the token
  count and nothing breaks;
- rank_once reads its split sizes (and, with one EP rank, the experts' sizes with them) on the host: the
  exchange's `all_to_all_single` takes them as Python ints.
Dynamo compiles the code before and after a read as separate graphs.  A read inside nested calls is counted
once per frame dynamo resumes in, so one read shows as several breaks: `torch._dynamo.explain` (torch 2.13)
counts 4 for the stock capacity read and 3 for rank_once's split sizes.  The test pins those counts and that
every break it lists is that read.
"""
import pytest
import torch
from torch import nn

from ds_smoes.core.config import SMoESConfig
from ds_smoes.moe.layer import SMoESMoE

D, B, T = 16, 2, 6

# (dispatch, drop_tokens) -> graph breaks of one forward, training and eval alike
EXPECTED_BREAKS = {("deepspeed", True): 0, ("deepspeed", False): 4, ("rank_once", False): 3}
# where each remaining break is: the function that reads the host
BREAK_AT = {"deepspeed": "_capacity", "rank_once": "_read"}


def _layer(dispatch: str, drop_tokens: bool, score_type: str) -> SMoESMoE:
    torch.manual_seed(0)
    cfg = SMoESConfig(num_experts=4, k=2, ep_size=1, num_bins=2, score_type=score_type, binning="adaptive",
                      rebin_interval=1, dispatch=dispatch, drop_tokens=drop_tokens, capacity_factor=2.0)
    return SMoESMoE(D, nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D)), cfg)


def _inputs():
    g = torch.Generator().manual_seed(1)
    x_BTD = torch.randn(B, T, D, generator=g)
    labels_BT = (torch.arange(B * T).view(B, T) % 3 == 0).long()
    scores_BTM = torch.softmax(torch.randn(B, T, 2, generator=g), -1)
    probe_BTD = torch.randn(B, T, D, generator=g)
    return x_BTD, labels_BT, scores_BTM, probe_BTD


def _step(layer, fn, inputs):
    """One forward and backward through `fn` (the layer, eager or compiled): output, l_aux and every gradient."""
    x_BTD, labels_BT, scores_BTM, probe_BTD = inputs
    layer.zero_grad(set_to_none=True)
    x_BTD = x_BTD.clone().requires_grad_(True)
    out_BTD, l_aux = fn(x_BTD, labels_BT, scores_BTM)
    ((out_BTD * probe_BTD).sum() + l_aux).backward()
    grads = [x_BTD.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in layer.parameters()]
    return out_BTD.detach(), l_aux.detach(), grads


@pytest.mark.parametrize("dispatch, drop_tokens", sorted(EXPECTED_BREAKS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compiled_layer_equals_eager_and_its_breaks_are_pinned(dispatch, drop_tokens, training):
    layer = _layer(dispatch, drop_tokens, "gaussian" if training else "attention").train(training)

    def forward(x_BTD, labels_BT, scores_BTM):
        out_BTD, l_aux, _ = layer(x_BTD, modality_labels=labels_BT, modality_scores=scores_BTM)
        return out_BTD, l_aux

    inputs = _inputs()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(forward)(*inputs[:3])
    where = [f"{b.reason.splitlines()[0]} @ {b.user_stack[-1].filename}:{b.user_stack[-1].lineno}"
             for b in explained.break_reasons if b.user_stack]
    assert explained.graph_break_count == EXPECTED_BREAKS[dispatch, drop_tokens], where
    assert all(b.user_stack[-1].name == BREAK_AT[dispatch] for b in explained.break_reasons), where

    torch._dynamo.reset()
    compiled = torch.compile(forward, backend="aot_eager")   # dynamo and autograd's graphs, no codegen: quick
    pending = layer.gate.binning.pending_load_ME
    before = pending.clone()
    eager = _step(layer, forward, inputs)
    after_eager = pending.clone()
    got = _step(layer, compiled, inputs)
    assert torch.allclose(got[0], eager[0], atol=1e-6) and got[0].abs().sum() > 0
    assert torch.allclose(got[1], eager[1], atol=1e-6)
    assert (float(eager[1]) > 0) == training   # eval computes no auxiliary loss
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got[2], eager[2]))
    # the compiled forward records the bins' load as the eager one does (training only)
    assert torch.equal(pending - after_eager, after_eager - before)
    assert float((after_eager - before).sum()) == (B * T * 2 if training else 0)
