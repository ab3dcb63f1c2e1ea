"""In-LLM vision-token pruning on a converted LLaVA-style Hugging Face model (issue 19 item 6, ds_smoes.compress.hf):
layers >= L see exactly the removed count fewer tokens (hidden states, MoE routing, modality labels, positions);
the scores equal the query rows of the eager attention probabilities at layer L-1; keep_ratio 1.0 gives the
unhooked model's outputs; removing the hooks restores the model; a pruned batch equals its rows one by one;
cached generation prunes the prefill once and equals the cache-free loop; what is refused says why."""
import copy

import pytest
import torch

import hf_tiny
from ds_smoes.core.config import SMoESConfig
from ds_smoes.core.errors import ConfigError
from ds_smoes.hf import convert_to_smoes
from ds_smoes.hf.attention import _SINK
from ds_smoes.compress.hf import install_pruning
from ds_smoes.compress.config import CompressConfig
from ds_smoes.moe.collector import RoutingCollector

LOSSES_OFF = dict(num_bins=2, alpha_mi=0.0, alpha_bal=0.0)
N_IMAGE = 16            # placeholders per image of the tiny LLaVA (16 patches)
PROMPT = 20             # labels: the first 20 positions (bos, image, prompt words) are the prompt


def _config():
    config = hf_tiny.llava_config("qwen3_moe")
    config.text_config.num_hidden_layers = 3          # a layer to score with, the pruned one, and one after
    return config


@pytest.fixture(scope="module")
def models():
    """(the converted model, an eager copy of the original weights, a batch with labels)."""
    torch.manual_seed(0)
    hf = hf_tiny.build(_config())
    eager = copy.deepcopy(hf)
    eager.set_attn_implementation("eager")
    model = convert_to_smoes(hf, SMoESConfig(**LOSSES_OFF)).eval()       # score_type attention: smoes_sdpa
    batch = hf_tiny.batch_for("llava")                                  # row 0 with an image, row 1 text, padded
    labels = batch["input_ids"].clone()
    labels[:, :PROMPT] = -100
    labels[batch["attention_mask"] == 0] = -100
    return model, eager, {**batch, "labels": labels}


def _record_layers(model):
    """Per decoder layer: the hidden states' token count and position ids; per MoE layer: its modality labels."""
    seen, handles = {}, []
    for i, layer in enumerate(model.adapter.decoder_layers(model.hf_model)):
        handles.append(layer.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: seen.__setitem__(i, (args[0].shape[1], kwargs["position_ids"])),
            with_kwargs=True))
    for i, moe in enumerate(model.moe_layers()):
        handles.append(moe.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: seen.__setitem__(("labels", i), kwargs["modality_labels"].clone()),
            with_kwargs=True))
    return seen, handles


@pytest.mark.parametrize("method", ["learnpruner", "fastv", "random"])
def test_layers_from_L_see_exactly_the_removed_count_fewer_tokens(models, method):
    model, _, batch = models
    valid = batch["attention_mask"].bool()
    budget = 4                                                          # round(0.25 * 16)
    seen, handles = _record_layers(model)
    moes = model.moe_layers()
    with (torch.no_grad(), install_pruning(model, CompressConfig(method=method, keep_ratio=0.25), layer=1) as pruner,
          RoutingCollector(moes) as collector):
        out = model(**batch)
    for h in handles:
        h.remove()
    record = pruner.last
    removed = N_IMAGE - budget
    assert record.tokens_before == int(valid.sum()) and record.removed == removed
    # row 0: 28 - 12 = 16 tokens; row 1: 23 valid (right padding, so the rows are packed right)
    assert record.source_BT.shape == (2, 23) and out.logits.shape[:2] == (2, 23)
    assert seen[0][0] == 28 and seen[1][0] == seen[2][0] == 23
    stats = [call.stats for call in collector.last()]
    assert int(stats[0].num_tokens) == int(valid.sum())
    assert int(stats[1].num_tokens) == int(stats[2].num_tokens) == int(valid.sum()) - removed
    # the SMoES modality labels follow: row 0 keeps `budget` vision tokens after L
    assert int(seen[("labels", 0)][0].sum()) == N_IMAGE and int(seen[("labels", 1)][0].sum()) == budget
    # kept tokens keep their original positions (the model's positions are 0..T-1); the image span is pruned,
    # every text token stays, the kept image tokens are in order
    kept0 = record.source_BT[0][record.valid_BT[0]]
    assert torch.equal(seen[1][1][0][record.valid_BT[0]], kept0)
    image = kept0[(kept0 >= 2) & (kept0 < 2 + N_IMAGE)]
    assert image.numel() == budget and torch.all(image[1:] > image[:-1])
    assert torch.equal(record.keep_BT[1], valid[1])                      # the text-only row loses nothing
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("method", ["learnpruner", "fastv"])
def test_scores_equal_the_eager_attention_rows_at_layer_L_minus_1(models, method):
    model, eager, batch = models
    batch = {k: v for k, v in batch.items() if k != "labels"}
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        with install_pruning(model, CompressConfig(method=method, keep_ratio=0.25), layer=2) as pruner:
            model(**batch)                                               # sdpa: scores from q, k of the rows
        with install_pruning(eager, CompressConfig(method=method, keep_ratio=0.25), layer=2) as eager_pruner:
            eager(**batch)                                               # eager: the returned probabilities
        probs_BTU = eager(**batch, output_attentions=True).attentions[1].float().mean(1)
    query = valid & (batch["input_ids"] != hf_tiny.IMAGE_ID)             # no labels: every valid text token
    if method == "fastv":
        last = torch.where(query, torch.arange(query.shape[1]), -1).max(1).values
        query = torch.zeros_like(query).scatter_(1, last[:, None], True)
    reference = (probs_BTU * query[:, :, None]).sum(1) / query.sum(1, keepdim=True)
    score = pruner.last.score_BT
    assert (score - reference).abs().max() < 1e-6
    assert (eager_pruner.last.score_BT - reference).abs().max() < 1e-6
    assert torch.allclose(score.sum(1), torch.ones(2))                  # each averaged row is a distribution
    # the kept image tokens are the 4 best-scored
    image = batch["input_ids"][0] == hf_tiny.IMAGE_ID
    best = torch.topk(reference[0].masked_fill(~image, -1), 4).indices.sort().values
    assert torch.equal(pruner.last.keep_BT[0].nonzero().flatten()[image[pruner.last.keep_BT[0]]], best)


def test_keep_ratio_one_gives_the_unhooked_outputs_and_remove_restores(models):
    model, _, batch = models
    attention = model.adapter.decoder_layers(model.hf_model)[0].self_attn
    sink, impl = getattr(attention, _SINK), model.hf_model.config.text_config._attn_implementation
    with torch.no_grad():
        ref = model(**batch)
        for method in ("learnpruner", "fastv", "random"):
            with install_pruning(model, CompressConfig(method=method, keep_ratio=1.0), layer=1) as pruner:
                out = model(**batch)
            assert pruner.last.removed == 0
            valid = batch["attention_mask"].bool()
            assert (out.logits - ref.logits)[valid].abs().max() < 1e-6
            assert abs(out.loss.item() - ref.loss.item()) < 1e-6
        pruner = install_pruning(model, CompressConfig(method="fastv", keep_ratio=0.25), layer=1)
        assert model(**batch).logits.shape[1] < ref.logits.shape[1]
        pruner.remove()
        again = model(**batch)
    assert torch.equal(again.logits, ref.logits) and torch.equal(again.loss, ref.loss)
    assert getattr(attention, _SINK) == sink and model.hf_model.config.text_config._attn_implementation == impl


def test_a_pruned_batch_equals_its_rows_one_by_one(models):
    model, _, batch = models
    with torch.no_grad(), install_pruning(model, CompressConfig(method="learnpruner", keep_ratio=0.25),
                                          layer=1) as pruner:
        out = model(**batch)
        record = pruner.last
        for row in range(2):
            keep = batch["attention_mask"][row].bool()
            single = {k: v[row:row + 1, keep] for k, v in batch.items() if k != "pixel_values"}
            if row == 0:                                                 # row 1 has no image
                single["pixel_values"] = batch["pixel_values"]
            alone = model(**single)
            kept = record.valid_BT[row]
            assert torch.equal(pruner.last.source_BT[0], record.source_BT[row][kept])
            assert (out.logits[row][kept] - alone.logits[0]).abs().max() < 1e-5


def test_generate_prunes_the_prefill_once_and_equals_the_cache_free_loop(models):
    model, _, batch = models
    single = {"input_ids": batch["input_ids"][:1], "attention_mask": batch["attention_mask"][:1],
              "pixel_values": batch["pixel_values"]}
    prompt = single["input_ids"].shape[1]
    with torch.no_grad(), install_pruning(model, CompressConfig(method="fastv", keep_ratio=0.25), layer=1) as pruner:
        out = model.hf_model.generate(**single, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        # layer 0 cached every prompt position, layers 1 and 2 only the kept ones (and the generated tokens)
        assert cache.get_seq_length(0) == prompt + 2
        assert cache.get_seq_length(1) == cache.get_seq_length(2) == prompt - 12 + 2
        ids = single["input_ids"]
        for _ in range(3):       # cache-free: the generated tokens are labelled, so the prompt alone is the query
            labels = torch.full_like(ids, -100)
            labels[:, prompt:] = ids[:, prompt:]
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=single["pixel_values"],
                           labels=labels, use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, ids)


def test_what_is_refused_says_why(models):
    model, _, batch = models
    for method in ("qmop", "pool"):
        with pytest.raises(ConfigError, match="built-in model's vision path"):
            install_pruning(model, CompressConfig(method=method, keep_ratio=0.5))
    with pytest.raises(ConfigError, match="nothing to prune"):
        install_pruning(model, CompressConfig())
    with pytest.raises(ConfigError, match="no LearnPruner stage 1"):
        install_pruning(model, CompressConfig(method="learnpruner", keep_ratio=0.25, stage1_keep_ratio=0.5))
    with pytest.raises(ConfigError, match=r"must be in 1\.\.2"):
        install_pruning(model, CompressConfig(method="fastv", keep_ratio=0.25), layer=0)
    with pytest.raises(ConfigError, match="LLaVA-style"):
        install_pruning(hf_tiny.build(hf_tiny.qwen3_vl_moe_config()), CompressConfig(method="fastv", keep_ratio=0.5))
    two_images = {k: v[:1] for k, v in batch.items() if k != "labels"}
    two_images["input_ids"] = two_images["input_ids"].clone()
    two_images["input_ids"][0, 10] = 7                                  # splits the span in two
    with torch.no_grad(), install_pruning(model, CompressConfig(method="random", keep_ratio=0.25)):
        with pytest.raises(ValueError, match="one contiguous span"):
            model(**two_images)
    assert model(**{k: v for k, v in batch.items() if k != "labels"}).logits.shape[1] == 28   # hooks are gone


def test_a_left_padded_generation_batch_equals_its_rows_one_by_one(models):
    """Rows of different prompt lengths keep different counts: packed left, the decode steps' masks for layers >= L
    cover the kept prompt of each row and the generated tokens."""
    model, _, batch = models
    ids = batch["input_ids"][:1].repeat(2, 1)
    ids[1, 4:] = ids[0, :-4].clone()
    ids[1, :2], ids[1, 2:4] = 0, 7                                      # 2 padding, 2 more text tokens, shifted
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    pixels = torch.cat([batch["pixel_values"], batch["pixel_values"].flip(-1)])
    with torch.no_grad(), install_pruning(model, CompressConfig(method="fastv", keep_ratio=0.25), layer=1) as pruner:
        both = model.hf_model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3,
                                       do_sample=False)
        assert pruner.last.valid_BT.sum(1).tolist() == [16, 14] and not pruner.last.valid_BT[1, :2].any()
        for row in range(2):
            keep = mask[row].bool()
            alone = model.hf_model.generate(input_ids=ids[row:row + 1, keep], attention_mask=mask[row:row + 1, keep],
                                            pixel_values=pixels[row:row + 1], max_new_tokens=3, do_sample=False)
            assert torch.equal(both[row, -3:], alone[0, -3:])
