"""In-LLM vision-token pruning in the built-in decoder (issue 19: LearnPruner's stage 2, the FastV-style baseline).

Removed means removed: a pruned batch (multimodal and language-only rows, prompts of different lengths) gives the
outputs of its samples run one by one (kept positions, their logits, the loss, generated tokens); the MoE layers
after the pruning point route exactly the removed count fewer tokens; a training row and its prompt alone keep
the same vision tokens; cached generation equals cache-free generation; method none is the model of before."""
import pytest
import torch

from ds_smoes.core.config import SMoESConfig
from ds_smoes.model import TinyMoEVLM
from ds_smoes.model.attention import attention_mask
from ds_smoes.compress import CompressConfig
from ds_smoes.model.config import ModelConfig
from ds_smoes.model.kv_cache import KVCache
from ds_smoes.compress.in_llm import pack
from ds_smoes.core.scores import hard_scores
from ds_smoes.moe.collector import RoutingCollector

VOCAB, IMAGE_ID, BOS, SEP, EOS = 16, 15, 1, 3, 2
PATCHES = 4                                  # 8x8 images, patch 4
# (prompt words, answer words, image): mixed modalities, prompts of different lengths
ROWS = ((5, 2, True), (2, 3, False), (3, 1, True), (7, 2, False), (1, 2, True))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread (on a loaded 2-core machine more threads only wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(method="learnpruner", attn_impl="eager", dispatch="rank_once", seed=0, **compress) -> TinyMoEVLM:
    """A small model with weights scaled up from the initialisation (peaked attention, spread routing)."""
    torch.manual_seed(seed)
    smoes = SMoESConfig(num_experts=4, k=2, ep_size=1, num_bins=2, score_type="attention", dispatch=dispatch)
    settings = {"keep_ratio": 0.5, **compress} if method != "none" else {}
    cfg = ModelConfig(d_model=32, n_layers=4, n_heads=4, patch_size=4, vision_dim=16, vision_layers=1, max_len=40,
                      moe_layers="every_other", attn_impl=attn_impl,
                      compress=CompressConfig(method=method, **settings))
    model = TinyMoEVLM(cfg, VOCAB, IMAGE_ID, smoes, expert_seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and "vision" not in name:
                p.mul_(3.0)
    return model.eval()


def sequences(rows=ROWS, image_tokens=PATCHES, seed=0):
    """Per row: (prompt ids, answer ids incl. <eos>, has_image) and the batch's images."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for words, answer, has_image in rows:
        prompt = [BOS] + [IMAGE_ID] * (image_tokens if has_image else 0) + \
            torch.randint(4, IMAGE_ID, (words,), generator=g).tolist() + [SEP]
        out.append((prompt, torch.randint(4, IMAGE_ID, (answer,), generator=g).tolist() + [EOS], has_image))
    return out, torch.rand(len(rows), 1, 8, 8, generator=g)


def training_batch(seqs, images):
    """Right-padded prompt + answer rows with the answers' labels (as `collate_train`)."""
    t = max(len(p) + len(a) for p, a, _ in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for row, (prompt, answer, _) in enumerate(seqs):
        ids[row, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        labels[row, len(prompt):len(prompt) + len(answer)] = torch.tensor(answer)
    valid = torch.arange(t)[None, :] < torch.tensor([len(p) + len(a) for p, a, _ in seqs])[:, None]
    has_image = torch.tensor([h for _, _, h in seqs])
    return (ids, valid, (ids == IMAGE_ID).long(), images, has_image), labels


def prompt_batch(seqs, images):
    """Left-padded prompts (as `collate_prompts`)."""
    t = max(len(p) for p, _, _ in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    valid = torch.zeros(len(seqs), t, dtype=torch.bool)
    for row, (prompt, _, _) in enumerate(seqs):
        ids[row, t - len(prompt):], valid[row, t - len(prompt):] = torch.tensor(prompt), True
    return ids, valid, (ids == IMAGE_ID).long(), images, torch.tensor([h for _, _, h in seqs])


def kept_positions(out, row):
    """The input positions of a row's kept tokens, in order."""
    return out.packing.source_BT[row][out.packing.valid_BT[row]].tolist()


def test_pack_by_hand():
    keep = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    right = pack(keep, left=False, length=4, padded=True)
    assert right.source_BT.tolist() == [[0, 2, 3, 0], [1, 0, 0, 0], [0, 1, 2, 3]]
    assert right.valid_BT.long().tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert not right.padded_before
    left = pack(keep, left=True, length=4, padded=True)
    assert left.source_BT.tolist() == [[0, 0, 2, 3], [0, 0, 0, 1], [0, 1, 2, 3]]
    assert left.valid_BT.long().tolist() == [[0, 1, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]]
    assert left.padded_before
    x = torch.arange(15.0).reshape(3, 5, 1)
    assert left.take(x, fill=-1).squeeze(-1).tolist() == [[-1, 0, 2, 3], [-1, -1, -1, 6], [10, 11, 12, 13]]


@pytest.mark.parametrize("method,attn_impl", [("learnpruner", "eager"), ("fastv", "sdpa"), ("learnpruner", "sdpa")])
def test_pruned_batch_equals_samples_one_by_one(method, attn_impl):
    model = build(method, attn_impl)
    seqs, images = sequences()
    inputs, labels = training_batch(seqs, images)
    with torch.no_grad():
        out = model(*inputs, labels_BT=labels)
    budget = model.cfg.compress.budget(PATCHES)
    assert budget == 2 and out.logits_BTV.shape[1] < inputs[0].shape[1]
    answers = 0
    weighted_loss = 0.0
    for row, (prompt, answer, has_image) in enumerate(seqs):
        n = len(prompt) + len(answer)
        alone_inputs, alone_labels = training_batch([seqs[row]], images[row:row + 1])
        with torch.no_grad():
            alone = model(*alone_inputs, labels_BT=alone_labels)
        kept = kept_positions(out, row)
        assert kept == kept_positions(alone, 0)
        vision = [p for p in kept if 1 <= p <= PATCHES] if has_image else []
        assert len(vision) == (budget if has_image else 0)
        assert len(kept) == n - (PATCHES - budget if has_image else 0)    # every text and answer token stays
        got = out.logits_BTV[row][out.packing.valid_BT[row]]
        assert (got - alone.logits_BTV[0]).abs().max() < 1e-5
        answers += len(answer)
        weighted_loss += float(alone.lm_loss) * len(answer)
    assert abs(float(out.lm_loss) - weighted_loss / answers) < 1e-5


def test_training_row_and_its_prompt_keep_the_same_vision_tokens():
    """Answers are never queries and causal attention hides them from the prompt's rows: the training forward and
    the generation prefill choose the same tokens."""
    for method in ("learnpruner", "fastv"):
        model = build(method, "sdpa", seed=1)
        seqs, images = sequences(seed=1)
        inputs, labels = training_batch(seqs, images)
        prompts = prompt_batch(seqs, images)
        with torch.no_grad():
            train, prefill = model(*inputs, labels_BT=labels), model(*prompts)
        for row, (prompt, _, _) in enumerate(seqs):
            offset = prompts[0].shape[1] - len(prompt)        # left padding of the prompt batch
            in_prompt = [p for p in kept_positions(train, row) if p < len(prompt)]
            assert in_prompt == [p - offset for p in kept_positions(prefill, row)]


def test_moe_layers_after_the_pruning_point_route_fewer_tokens():
    model = build("learnpruner", "sdpa", dispatch="rank_once")
    assert model.cfg.compress.in_llm_layer(4) == 2          # n_layers // 2: MoE block 1 before, block 3 after
    seqs, images = sequences()
    inputs, labels = training_batch(seqs, images)
    routed = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: routed.append((args[0].shape[1], int(args[1].sum()))))
             for layer in model.moe_layers()]
    with torch.no_grad(), RoutingCollector(model.moe_layers()) as collector:
        model(*inputs, labels_BT=labels)
    for h in hooks:
        h.remove()
    removed = sum(PATCHES - model.cfg.compress.budget(PATCHES) for _, _, has_image in seqs if has_image)
    (t_before, n_before), (t_after, n_after) = routed
    assert n_before == int(inputs[1].sum()) and n_after == n_before - removed == 6 + n_before - 12
    assert t_after < t_before
    # the dispatch's own count of the tokens it routed (its rate statistics count the valid tokens)
    assert [call.comm().num_tokens for call in collector.last()] == [n_before, n_after]


@pytest.mark.parametrize("method,attn_impl", [("learnpruner", "eager"), ("fastv", "sdpa"), ("learnpruner", "sdpa")])
def test_cached_generation_with_pruning_equals_cache_free_and_one_by_one(method, attn_impl):
    model = build(method, attn_impl, dispatch="deepspeed", seed=2)
    seqs, images = sequences(seed=2)
    prompts = prompt_batch(seqs, images)
    cached = model.generate(*prompts, max_new_tokens=6, eos_id=-1, use_cache=True)
    free = model.generate(*prompts, max_new_tokens=6, eos_id=-1, use_cache=False)
    assert cached == free
    assert len({tuple(r) for r in cached}) > 1 and any(len(set(r)) > 2 for r in cached), cached
    for row in range(len(seqs)):
        alone = prompt_batch([seqs[row]], images[row:row + 1])
        assert model.generate(*alone, max_new_tokens=6, eos_id=-1) == [cached[row]]
    # the prefill leaves blocks 0..L-1 with every prompt position, blocks L.. with the packed kept ones
    cache = KVCache.empty(len(model.blocks), prompts[0].shape[1] + 3)
    with torch.no_grad():
        out = model.forward(*prompts, cache=cache)
        model.decode_step(out.logits_BTV[:, -1].argmax(-1), cache)
    at = model.cfg.compress.in_llm_layer(4)
    assert cache.pruned_from == at
    lengths = [layer.length for layer in cache.layers]
    assert lengths == [prompts[0].shape[1] + 1] * at + [out.logits_BTV.shape[1] + 1] * (4 - at)
    assert cache.keys_of(at)[0].shape[1] == out.logits_BTV.shape[1] + 1


def test_method_none_is_the_unpruned_model():
    """No packing, and the forward is the loop over the blocks it always was, bit for bit."""
    model = build("none", "sdpa")
    seqs, images = sequences()
    inputs, labels = training_batch(seqs, images)
    with torch.no_grad():
        out = model(*inputs, labels_BT=labels)
        valid = inputs[1]
        x, _, _ = model.embed(inputs[0], valid, inputs[3], inputs[4])
        labels_mod = inputs[2] * valid
        scores = hard_scores(labels_mod)
        for block in model.blocks:
            x, _, scores = block(x, None, valid, labels_mod, scores)
        logits = model.lm_head(model.ln_f(x))
    assert out.packing is None
    assert torch.equal(out.logits_BTV, logits)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    assert torch.equal(out.lm_loss, ref)


def test_pruned_training_step_backpropagates():
    model = build("fastv", "sdpa", fastv_layer=1).train()
    seqs, images = sequences()
    inputs, labels = training_batch(seqs, images)
    out = model(*inputs, labels_BT=labels)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.tok_emb.weight.grad.abs().sum() > 0 and model.vision.parameters().__next__().grad is not None


# -- 2 expert-parallel ranks ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_pruning_on_two_ep_ranks(two_rank_scenarios):
    """Each rank prunes its own batch (packed lengths differ between ranks), routes exactly the removed count fewer
    tokens after the pruning point, and its cached generation equals the cache-free one, in EP lockstep."""
    reports = two_rank_scenarios.reports("token_pruning")
    for rep in reports:
        assert rep["removed"] > 0
        assert rep["routed"] == rep["comm_tokens"] == [rep["valid_tokens"], rep["valid_tokens"] - rep["removed"]]
        assert rep["packed_length"] < rep["input_length"]
        assert all(b > 0 for b in rep["remote_bytes"])
        assert rep["cached"] == rep["free"]
    assert reports[0]["packed_length"] != reports[1]["packed_length"]
