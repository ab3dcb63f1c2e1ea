"""The attention score's M~ = mean_h softmax(q k^T * scale + mask) @ M through the fused kernel (issue 18, item 1).

`head_mean_attention_mix` against the materialised form (`head_mean_attention_probs` @ M), case by case, each
run with the CPU's flash kernel as the only backend allowed (so a case that fell back to the math kernel, which
materialises [B, A, T, U], would fail here); the built-in model's sdpa path against its eager path; the Hugging
Face wrapper's sdpa path against eager attention; and the memory the fused form saves, measured.
"""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import hf_tiny
from ds_smoes.core.attention_score import head_mean_attention_mix
from ds_smoes.core.config import SMoESConfig
from ds_smoes.hf.attention import head_mean_attention_probs
from ds_smoes.moe.collector import RoutingCollector

B, A, T, d = 2, 4, 12, 8


def _inputs(a=A, t=T, u=T, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, A, t, d, generator=g).to(dtype)
    k = torch.randn(B, a, u, d, generator=g).to(dtype)
    values_BUM = torch.softmax(torch.randn(B, u, 2, generator=g), -1)
    return q, k, values_BUM


def _reference(q, k, values_BUM, valid_BU, causal, scaling=None):
    """The materialised form: A = head-mean softmax over the allowed keys (bottom-right causal & valid), A @ M."""
    n_q, n_k = q.shape[2], k.shape[2]
    allowed_TU = torch.ones(n_q, n_k, dtype=torch.bool)
    if causal:
        allowed_TU = torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None] + (n_k - n_q)
    mask = allowed_TU.expand(B, 1, n_q, n_k)
    if valid_BU is not None:
        mask = mask & valid_BU[:, None, None, :]
    return torch.bmm(head_mean_attention_probs(q, k, mask, scaling, causal), values_BUM)


def _fused(*args, **kwargs):
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):   # the fused kernel or an error, never the math kernel
        return head_mean_attention_mix(*args, **kwargs)


def _left_padding(u=T, pads=(0, 4)):
    return torch.stack([torch.arange(u) >= p for p in pads])


def _right_padding(u=T, lengths=(T, 7)):
    return torch.stack([torch.arange(u) < n for n in lengths])


@pytest.mark.parametrize("padding", ["none", "all_valid", "left", "right"])
@pytest.mark.parametrize("causal", [True, False])
def test_fused_mix_equals_the_materialised_form(padding, causal):
    q, k, values_BUM = _inputs()
    valid_BU = {"none": None, "all_valid": torch.ones(B, T, dtype=torch.bool), "left": _left_padding(),
                "right": _right_padding()}[padding]
    got = _fused(q, k, values_BUM, valid_BU, causal=causal)
    ref = _reference(q, k, values_BUM, valid_BU, causal)
    assert got.dtype == torch.float32 and got.shape == (B, T, 2)
    if padding == "left" and causal:
        # a padding query before the first token has no valid key: it keeps its own values (the old mask's
        # identity), where the materialised form gives zeros
        rows_BT = _left_padding()
        assert torch.equal(got[~rows_BT], values_BUM[~rows_BT])
        got, ref = got[rows_BT], ref[rows_BT]
    assert (got - ref).abs().max() < 1e-5


def test_rows_sum_to_one_and_a_scaling_is_honoured():
    q, k, values_BUM = _inputs()
    got = _fused(q, k, values_BUM, _right_padding(), scaling=0.05, causal=True)
    assert (got - _reference(q, k, values_BUM, _right_padding(), True, scaling=0.05)).abs().max() < 1e-5
    assert torch.allclose(got.sum(-1), torch.ones(B, T), atol=1e-6)


@pytest.mark.parametrize("padding", ["none", "left"])
def test_grouped_query_attention(padding):
    q, k, values_BUM = _inputs(a=2)
    valid_BU = _left_padding() if padding == "left" else None
    rows_BT = _left_padding() if padding == "left" else torch.ones(B, T, dtype=torch.bool)
    got = _fused(q, k, values_BUM, valid_BU, causal=True)
    assert (got - _reference(q, k, values_BUM, valid_BU, True))[rows_BT].abs().max() < 1e-5


@pytest.mark.parametrize("n_q", [1, 3])
def test_kv_cache_queries_are_the_last_keys(n_q):
    # U = 12 keys, the last n_q are this forward's queries (bottom-right causal); left-padded prompts
    q, k, values_BUM = _inputs(t=n_q, a=2)
    got = _fused(q, k, values_BUM, _left_padding(), causal=True)
    assert got.shape == (B, n_q, 2)
    assert (got - _reference(q, k, values_BUM, _left_padding(), True)).abs().max() < 1e-5
    # without padding too
    assert (_fused(q, k, values_BUM, None, causal=True) - _reference(q, k, values_BUM, None, True)).abs().max() < 1e-5


def test_more_value_columns_than_head_dims_run_in_chunks():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(B, A, T, 2, generator=g), torch.randn(B, A, T, 2, generator=g)   # d = 2 < M + 1 = 3
    values_BUM = torch.softmax(torch.randn(B, T, 2, generator=g), -1)
    got = _fused(q, k, values_BUM, _right_padding(), causal=True)
    assert (got - _reference(q, k, values_BUM, _right_padding(), True)).abs().max() < 1e-5


def test_bf16_inputs():
    q, k, values_BUM = _inputs(dtype=torch.bfloat16, a=2)
    ref = _reference(q, k, values_BUM, _right_padding(), True)      # the materialised form computes in float32
    # computed in float32 (the default): as exact as for float32 inputs
    assert (_fused(q, k, values_BUM, _right_padding(), causal=True) - ref).abs().max() < 1e-5
    # computed in bf16 (dtype=None: the inputs' dtype): bf16's 8-bit mantissa, on values in [0, 1]: within 2e-2
    got = _fused(q, k, values_BUM, _right_padding(), causal=True, dtype=None)
    assert got.dtype == torch.float32 and (got - ref).abs().max() < 2e-2


def test_queries_after_their_keys_are_refused():
    q, k, values_BUM = _inputs(t=T, u=5)
    with pytest.raises(ValueError, match="last of the keys"):
        head_mean_attention_mix(q, k, values_BUM[:, :5], None, causal=True)


def test_the_fused_mix_makes_no_query_by_key_tensor():
    """Peak memory of the mix measured (torch's profiler, every CPU allocation): far below one [B, A, T, T]
    float32 tensor, which the materialised form needs several of."""
    from ds_smoes.bench.scale.attention import peak_allocated_bytes

    b, a, t, dh = 1, 4, 2048, 32
    q, k = torch.randn(b, a, t, dh), torch.randn(b, a, t, dh)
    values_BUM = torch.softmax(torch.randn(b, t, 2), -1)
    valid_BU = torch.ones(b, t, dtype=torch.bool)
    dense = b * a * t * t * 4                                   # 64 MiB
    fused = peak_allocated_bytes(lambda: head_mean_attention_mix(q, k, values_BUM, valid_BU, causal=True))
    materialised = peak_allocated_bytes(lambda: head_mean_attention_probs(q, k, None, None, True))
    assert materialised >= dense                                # the measurement sees the dense tensors
    assert fused < dense / 8, (fused, dense)


# -- the built-in model: sdpa against eager ---------------------------------------------------------------
def _vlm_pair():
    from ds_smoes.model import TinyMoEVLM
    from ds_smoes.model.config import ModelConfig

    cfg = SMoESConfig(num_experts=4, k=2, ep_size=1, num_bins=2, score_type="attention", drop_tokens=False)
    models = {}
    for impl in ("eager", "sdpa"):
        torch.manual_seed(0)
        mc = ModelConfig(d_model=32, n_layers=4, n_heads=4, patch_size=4, vision_dim=16, vision_layers=1, max_len=32,
                         attn_impl=impl)
        models[impl] = TinyMoEVLM(mc, vocab_size=12, image_token_id=11, smoes=cfg).eval()
    models["sdpa"].load_state_dict(models["eager"].state_dict())
    return models


def _vlm_batch(padding):
    ids = torch.tensor([[1, 11, 11, 11, 11, 5, 6, 7, 2, 3], [1, 11, 11, 11, 11, 4, 8, 2, 0, 0]])
    valid = ids != 0
    valid[0, 0] = True
    if padding == "left":
        ids[1], valid[1] = ids[1].roll(2), valid[1].roll(2)
    return ids, valid, (ids == 11).long(), torch.rand(2, 1, 8, 8), torch.tensor([True, True])


def _run_vlm(model, batch):
    scores, masks = [], []
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw: scores.append(kw["modality_scores"]), with_kwargs=True)
             for layer in model.moe_layers()]
    hooks += [blk.attn.register_forward_pre_hook(lambda m, a: masks.append(a[1])) for blk in model.blocks]
    # in eval the score is carried only for a caller that asks for the losses it feeds
    with torch.no_grad(), RoutingCollector(model.moe_layers(), stats=False, losses=True):
        logits = model(*batch).logits_BTV
    for h in hooks:
        h.remove()
    return logits, torch.stack(scores), masks


@pytest.mark.parametrize("padding", ["left", "right"])
def test_builtin_model_sdpa_gives_the_eager_logits_and_scores(padding):
    models, batch = _vlm_pair(), _vlm_batch(padding)
    logits_e, scores_e, _ = _run_vlm(models["eager"], batch)
    logits_s, scores_s, masks = _run_vlm(models["sdpa"], batch)
    valid_BT = batch[1]
    if padding == "left":
        # a dense mask only with padding before tokens, the same as eager's: every position agrees
        assert all(m is not None for m in masks)
        assert (logits_e - logits_s).abs().max() < 1e-5
        assert (scores_e - scores_s).abs().max() < 1e-5
    else:
        # right padding: is_causal without a mask; padding positions differ, nothing reads them
        assert all(m is None for m in masks)
        assert (logits_e - logits_s)[valid_BT].abs().max() < 1e-5
        assert (scores_e - scores_s)[:, valid_BT].abs().max() < 1e-5
    assert torch.allclose(scores_s[:, valid_BT].sum(-1), torch.ones(()), atol=1e-6)
    assert scores_s[:, valid_BT].amin() >= 0 and (scores_s[:, batch[2].bool()][..., 1] > 0.5).all()


def test_inference_carries_no_attention_score_unless_losses_are_asked_for():
    # the score feeds the gates' losses, not their routing: an eval forward skips it, with the same logits
    model, batch = _vlm_pair()["sdpa"], _vlm_batch("left")
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["modality_scores"]), with_kwargs=True)
             for layer in model.moe_layers()]
    with torch.no_grad():
        plain = model(*batch).logits_BTV
        with RoutingCollector(model.moe_layers(), stats=False, losses=True):
            asked = model(*batch).logits_BTV
    for h in hooks:
        h.remove()
    n = len(model.moe_layers())
    assert all(s is None for s in seen[:n]) and all(s is not None for s in seen[n:])
    assert torch.equal(plain, asked)


def test_builtin_model_generates_the_same_with_sdpa_and_eager():
    models, batch = _vlm_pair(), _vlm_batch("left")
    out = {impl: m.generate(*batch, max_new_tokens=4, eos_id=2) for impl, m in models.items()}
    assert out["eager"] == out["sdpa"]


# -- the Hugging Face wrapper: sdpa against eager -----------------------------------------------------------
def _hf_scores(impl, batch, arch="olmoe", monkeypatch=None, generate=0):
    from ds_smoes.hf import convert_to_smoes

    config = hf_tiny.llava_config(arch) if arch != "qwen3_vl_moe" else hf_tiny.qwen3_vl_moe_config()
    hf = hf_tiny.build(config)
    hf.set_attn_implementation(impl)
    model = convert_to_smoes(hf, SMoESConfig(num_bins=2, alpha_mi=0.0, alpha_bal=0.0, score_type="attention")).eval()
    if monkeypatch is not None and impl == "sdpa":
        def refuse(*args, **kwargs):
            raise AssertionError("the materialised probabilities were computed")
        monkeypatch.setattr("ds_smoes.hf.attention.head_mean_attention_probs", refuse)
    with torch.no_grad(), RoutingCollector(model.moe_layers(), stats=False, losses=True):
        if generate:
            model.generate(**batch, max_new_tokens=generate, do_sample=False)
            return model.context.batch.scores_BTM.clone(), {i: s.clone() for i, s in model.context.key_scores.items()}
        model(**batch)
    return model.context.batch.scores_BTM.clone()


def _left_padded(batch):
    out = dict(batch)
    n = int((batch["attention_mask"][1] == 0).sum())
    out["input_ids"] = torch.stack([batch["input_ids"][0], batch["input_ids"][1].roll(n)])
    out["attention_mask"] = torch.stack([batch["attention_mask"][0], batch["attention_mask"][1].roll(n)])
    return out


@pytest.mark.parametrize("padding", ["right", "left"])
def test_hf_wrapper_sdpa_scores_equal_eager_without_materialising(padding, monkeypatch):
    batch = hf_tiny.batch_for("llava")
    batch = _left_padded(batch) if padding == "left" else batch
    eager = _hf_scores("eager", batch)
    sdpa = _hf_scores("sdpa", batch, monkeypatch=monkeypatch)     # the fused path or an AssertionError
    valid = batch["attention_mask"].bool()
    assert (eager - sdpa)[valid].abs().max() < 1e-5
    if padding == "right":
        assert (eager - sdpa).abs().max() < 1e-5                  # padding queries see earlier tokens alike


def test_hf_wrapper_kv_cache_decoding_scores_equal_eager(monkeypatch):
    # grouped-query attention (4 query heads, 2 key heads), left-padded prompts, 3 cached decoding steps
    batch = _left_padded({k: v for k, v in hf_tiny.batch_for("llava").items()})
    eager, eager_keys = _hf_scores("eager", batch, generate=4)
    sdpa, sdpa_keys = _hf_scores("sdpa", batch, monkeypatch=monkeypatch, generate=4)
    assert eager.shape[1] == 1 and sorted(eager_keys) == sorted(sdpa_keys)
    assert (eager - sdpa).abs().max() < 1e-5
    valid = torch.cat([batch["attention_mask"].bool(), torch.ones(2, 3, dtype=torch.bool)], 1)
    for i in eager_keys:
        assert (eager_keys[i] - sdpa_keys[i])[valid].abs().max() < 1e-5


def test_hf_masks_other_than_causal_padding_take_the_materialised_path():
    from transformers.masking_utils import causal_mask_function, sdpa_mask, sliding_window_causal_mask_function

    from ds_smoes.hf.attention import _CAUSAL_PADDING, _tagging, attention_mix

    tagged = _tagging(sdpa_mask)
    padding_BU = _right_padding()
    common = dict(batch_size=B, q_length=T, kv_length=T, attention_mask=padding_BU, allow_is_causal_skip=False)
    causal = tagged(mask_function=causal_mask_function, **common)
    window = tagged(mask_function=sliding_window_causal_mask_function(4), **common)
    assert getattr(causal, _CAUSAL_PADDING, False) and not getattr(window, _CAUSAL_PADDING, False)
    shifted = tagged(mask_function=causal_mask_function, **{**common, "q_length": 3}, q_offset=2)
    assert not getattr(shifted, _CAUSAL_PADDING, False)        # queries not the last of the keys (a static cache)
    q, k, values_BUM = _inputs(a=2)
    for mask in (causal, window):
        ref = torch.bmm(head_mean_attention_probs(q, k, mask, None, True), values_BUM)
        rows_BT = mask.any(-1)[:, 0]
        assert (attention_mix(q, k, values_BUM, mask, None, True) - ref)[rows_BT].abs().max() < 1e-5
