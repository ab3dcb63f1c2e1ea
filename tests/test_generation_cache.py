"""Generation through the built-in model's KV cache (issue 21, item 1): cached greedy decoding equals the
cache-free one (every step re-runs the whole sequence), token for token, with each step's logits and the
attention scores handed to the MoE layers equal to those of the whole sequence's last position; on one process
here, for both attention paths and both dispatches, on 2 expert-parallel ranks in the slow test; and the
evaluation decodes through the cache with the same answers."""
import functools

import pytest
import torch

from ds_smoes.core.config import SMoESConfig
from ds_smoes.model import TinyMoEVLM
from ds_smoes.model.attention import attention_mask
from ds_smoes.model.config import ModelConfig
from ds_smoes.model.kv_cache import KVCache, LayerCache
from ds_smoes.moe.collector import RoutingCollector


VOCAB, IMAGE_ID, EOS = 16, 15, 2
PATCHES = 4                       # 8x8 images, patch 4


def build(attn_impl: str, dispatch: str = "deepspeed", score_type: str = "attention", seed: int = 0) -> TinyMoEVLM:
    """A small model with weights scaled up from the initialisation, so attention is peaked, routing and the
    scores spread, and greedy tokens vary from step to step as a trained model's do."""
    torch.manual_seed(seed)
    smoes = SMoESConfig(num_experts=4, k=2, ep_size=1, num_bins=2, score_type=score_type, dispatch=dispatch)
    cfg = ModelConfig(d_model=32, n_layers=4, n_heads=4, patch_size=4, vision_dim=16, vision_layers=1, max_len=40,
                      moe_layers="every_other", attn_impl=attn_impl)
    model = TinyMoEVLM(cfg, VOCAB, IMAGE_ID, smoes, expert_seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and "vision" not in name:
                p.mul_(3.0)
    return model.eval()


def prompts(lengths=(8, 3, 11, 6), images=(True, False, True, False), seed=0):
    """Left-padded prompts of different lengths; rows with an image start with its placeholders."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    valid = torch.zeros(len(lengths), t, dtype=torch.bool)
    for row, (n, has_image) in enumerate(zip(lengths, images)):
        text = torch.randint(3, IMAGE_ID, (n,), generator=g)
        if has_image:
            text[1:1 + PATCHES] = IMAGE_ID
        ids[row, t - n:], valid[row, t - n:] = text, True
    has_image_B = torch.tensor(images)
    return ids, valid, (ids == IMAGE_ID).long(), torch.rand(len(lengths), 1, 8, 8, generator=g), has_image_B


class Recorder:
    """Per forward: the last position's logits; per MoE call: (last position's scores, labels, used tokens)."""

    def __init__(self, model: TinyMoEVLM) -> None:
        self.logits, self.moe = [], []
        self.handles = [model.lm_head.register_forward_hook(lambda m, a, out: self.logits.append(out[:, -1]))]
        self.handles += [layer.register_forward_pre_hook(self._moe, with_kwargs=True) for layer in model.moe_layers()]

    def _moe(self, module, args, kwargs):
        scores = kwargs["modality_scores"]
        self.moe.append((scores[:, -1] if scores is not None else None, kwargs["modality_labels"][:, -1],
                         args[1][:, -1]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def run(model, batch, use_cache, max_new_tokens=7, eos_id=-1):
    # the attention score is carried at inference only for a caller that asks for the losses it feeds: asked
    # here, so that the cache's keys' scores are checked too
    with Recorder(model) as rec, RoutingCollector(model.moe_layers(), stats=False, losses=True):
        tokens = model.generate(*batch, max_new_tokens=max_new_tokens, eos_id=eos_id, use_cache=use_cache)
    return tokens, rec


def buffers(model):
    return {name: b.clone() for name, b in model.named_buffers()}


@pytest.mark.parametrize("dispatch", ["deepspeed", "rank_once"])
@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_cached_generation_equals_cache_free_generation(attn_impl, dispatch):
    model, batch = build(attn_impl, dispatch), prompts()
    before = buffers(model)
    free, free_rec = run(model, batch, use_cache=False)
    cached, cached_rec = run(model, batch, use_cache=True)
    assert cached == free
    assert len({tuple(r) for r in free}) > 1 and any(len(set(r)) > 2 for r in free), free   # not degenerate
    # exactly max_new_tokens forwards either way: one lm_head call and one call of every MoE layer per forward
    assert len(cached_rec.logits) == len(free_rec.logits) == 7
    assert len(cached_rec.moe) == len(free_rec.moe) == 7 * len(model.moe_layers())
    for got, ref in zip(cached_rec.logits, free_rec.logits):
        assert (got - ref).abs().max() < 1e-5
    for (scores, labels, used), (ref_scores, ref_labels, ref_used) in zip(cached_rec.moe, free_rec.moe):
        assert (scores - ref_scores).abs().max() < 1e-5
        assert torch.equal(labels, ref_labels) and torch.equal(used, ref_used)
    # decode steps route one new token per row: a valid text token
    decode = cached_rec.moe[len(model.moe_layers()):]
    assert all(s.shape == (4, 2) and (l == 0).all() and u.all() for s, l, u in decode)
    assert all(float(s[:, 1].max()) > 0 for s, _, _ in decode)   # the new text tokens attended to image patches
    # evaluation changes no statistics, bins or other buffer
    after = buffers(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("score_type", ["gaussian", "hard"])
def test_cache_with_the_other_scores(score_type):
    model, batch = build("sdpa", score_type=score_type, seed=1), prompts(seed=1)
    assert not model.tracks_attention_score()
    free, free_rec = run(model, batch, use_cache=False)
    cached, cached_rec = run(model, batch, use_cache=True)
    assert cached == free
    assert max(float((a - b).abs().max()) for a, b in zip(cached_rec.logits, free_rec.logits)) < 1e-5


def test_tokens_after_eos_are_dropped_and_image_token_never_generated():
    model, batch = build("eager"), prompts()
    raw, _ = run(model, batch, use_cache=True)
    eos = raw[0][2]                                # a token row 0 generates third
    cut, _ = run(model, batch, use_cache=True, eos_id=eos)
    assert cut == [r[:r.index(eos)] if eos in r else r for r in raw]
    assert cut == run(model, batch, use_cache=False, eos_id=eos)[0]
    assert all(IMAGE_ID not in r for r in raw)


def test_no_padding_and_a_single_row():
    for attn_impl in ("eager", "sdpa"):
        model = build(attn_impl, seed=2)
        for batch in (prompts((7, 7), (True, False), seed=2), prompts((9,), (True,), seed=3)):
            assert run(model, batch, use_cache=True)[0] == run(model, batch, use_cache=False)[0]


def test_position_limit_and_no_new_tokens():
    model, batch = build("sdpa"), prompts()         # longest prompt 11, max_len 40
    assert model.generate(*batch, max_new_tokens=0, eos_id=EOS) == [[]] * 4
    assert len(model.generate(*batch, max_new_tokens=30, eos_id=-1)[2]) == 30   # positions 0..39
    for use_cache in (True, False):
        with pytest.raises(ValueError, match="exceeds model.max_len=40"):
            model.generate(*batch, max_new_tokens=31, eos_id=-1, use_cache=use_cache)


def test_decode_step_makes_no_host_read_outside_the_moe_layers():
    from ds_smoes.testing.host_syncs import count_host_syncs

    model, batch = build("sdpa", "rank_once"), prompts()
    cache = KVCache.empty(len(model.blocks), batch[0].shape[1] + 2)
    cache.padded = True
    with torch.no_grad():
        token_B = model.forward(*batch, cache=cache).logits_BTV[:, -1].argmax(-1)
        with count_host_syncs() as syncs:
            model.decode_step(token_B, cache)
    assert all("/moe/" in where or "/parallel/" in where for _, where in syncs.where), syncs.report()


def test_attention_mask_for_queries_that_are_the_last_keys():
    valid_BU = torch.tensor([[False, True, True, True, True]])
    full = attention_mask(valid_BU, causal=True)
    assert torch.equal(attention_mask(valid_BU, True, 2), full[:, :, -2:])
    assert attention_mask(valid_BU, True, 1).tolist() == [[[[False, True, True, True, True]]]]


def test_layer_cache_appends_in_place():
    cache = LayerCache(capacity=4)
    k, v, s = cache.update(torch.ones(1, 2, 3, 5), torch.zeros(1, 2, 3, 5), torch.ones(1, 3, 2))
    assert k.shape == (1, 2, 3, 5) and s.shape == (1, 3, 2)
    k, v, s = cache.update(2 * torch.ones(1, 2, 1, 5), torch.ones(1, 2, 1, 5), torch.zeros(1, 1, 2))
    assert k[0, 0, :, 0].tolist() == [1, 1, 1, 2] and s[0, :, 0].tolist() == [1, 1, 1, 0]
    assert k.data_ptr() == cache.key_BAUd.data_ptr()          # a view of the preallocated buffer
    with pytest.raises(ValueError, match="cannot take 5"):
        cache.update(k[:, :, :1], v[:, :, :1], s[:, :1])


# -- the evaluation -----------------------------------------------------------------------------------------
def test_evaluation_decodes_through_the_cache_with_the_same_answers(digits_dir):
    from ds_smoes.app.evaluation import exact_match_accuracy
    from ds_smoes.data import LlavaDataset, WordTokenizer, collate_prompts, load_llava_json
    from ds_smoes.model import model_inputs

    train = load_llava_json(digits_dir / "train.json", digits_dir)
    test = load_llava_json(digits_dir / "test.json", digits_dir)[:24]
    tok = WordTokenizer.build(t for s in train for t in (s.prompt, s.answer))
    dataset = LlavaDataset(test, tok, image_size=8, patch_size=4)
    torch.manual_seed(0)
    smoes = SMoESConfig(num_experts=4, k=2, ep_size=1, num_bins=2, score_type="attention", dispatch="rank_once")
    model = TinyMoEVLM(ModelConfig(d_model=64, n_layers=4, n_heads=4, patch_size=4, vision_layers=2,
                                   attn_impl="eager"), tok.vocab_size, tok.image_id, smoes).eval()
    for start in range(0, len(dataset), 8):
        batch = collate_prompts([dataset[i] for i in range(start, min(start + 8, len(dataset)))])
        free = model.generate(*model_inputs(batch), max_new_tokens=6, eos_id=-1, use_cache=False)
        assert model.generate(*model_inputs(batch), max_new_tokens=6, eos_id=-1) == free

    steps = []
    model.decode_step = functools.partial(_counted, TinyMoEVLM.decode_step.__get__(model), steps)
    cached = exact_match_accuracy(model, dataset, batch_size=8, max_new_tokens=4, device=torch.device("cpu"))
    assert len(steps) == 3 * 3                                 # 3 batches of 3 decode steps: the cache was used
    del model.decode_step
    model.generate = functools.partial(TinyMoEVLM.generate.__get__(model), use_cache=False)
    assert exact_match_accuracy(model, dataset, batch_size=8, max_new_tokens=4, device=torch.device("cpu")) == cached


def _counted(step, calls, *args):
    calls.append(1)
    return step(*args)


# -- 2 expert-parallel ranks ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_cached_generation_on_two_ep_ranks_with_both_dispatches(two_rank_scenarios):
    reports = two_rank_scenarios.reports("generation_cache")
    for rep in reports:
        for dispatch in ("deepspeed", "rank_once"):
            case = rep[dispatch]
            assert case["cached"] == case["free"], (dispatch, case)
            assert case["max_logit_diff"] < 1e-5, (dispatch, case)
            assert case["moe_calls_cached"] == case["moe_calls_free"] == case["expected_moe_calls"]
            assert case["distinct_rows"] > 1
    # the ranks held different prompts of different lengths, and ran the same number of MoE forwards
    assert reports[0]["prompt_lengths"] != reports[1]["prompt_lengths"]
    for dispatch in ("deepspeed", "rank_once"):
        assert reports[0][dispatch]["moe_calls_cached"] == reports[1][dispatch]["moe_calls_cached"]
