"""Pre-LLM visual token compression (issue 19): the modules' shapes, budgets and gradients on hand-made inputs,
QMoP's routing and branch balance, and the compressors inside TinyMoEVLM (method none unchanged, removed tokens
leave the sequence, a batch equals its samples one by one)."""
from pathlib import Path

import pytest
import torch

from ds_smoes.core.config import SMoESConfig
from ds_smoes.data import LlavaDataset, WordTokenizer, collate_train
from ds_smoes.data.llava import Sample
from ds_smoes.model import TinyMoEVLM
from ds_smoes.compress import CompressConfig
from ds_smoes.compress.baselines import PoolCompressor, RandomPruner
from ds_smoes.compress.build import build_compressor
from ds_smoes.compress.learnpruner import LearnedPruner
from ds_smoes.compress.qmop import QMoP, branch_balance_loss
from ds_smoes.model.config import ModelConfig

SIDE, DIM, QDIM = 4, 8, 6          # a 4 x 4 patch grid (T = 16), vision width 8, text query width 6


def patches(b=3, seed=0):
    return torch.randn(b, SIDE * SIDE, DIM, generator=torch.Generator().manual_seed(seed))


def modules(budget):
    torch.manual_seed(0)
    return {"learnpruner": LearnedPruner(DIM, SIDE * SIDE, budget),
            "gumbel": LearnedPruner(DIM, SIDE * SIDE, budget, relaxation="gumbel", tau=0.5),
            "random": RandomPruner(SIDE * SIDE, budget, seed=3),
            "pool": PoolCompressor(SIDE, budget),
            "qmop": QMoP(DIM, QDIM, SIDE, budget, n_heads=2),
            "qmop_top1": QMoP(DIM, QDIM, SIDE, budget, n_heads=2, top1=True)}


@pytest.mark.parametrize("budget", [1, 4, 7, 16])
@pytest.mark.parametrize("train", [True, False])
def test_shapes_budget_and_indices(budget, train):
    x = patches()
    for name, module in modules(budget).items():
        module.train(train)
        out = module(x, torch.randn(3, QDIM))
        assert out.tokens_BQD.shape == (3, budget, DIM), name
        assert out.aux_loss.dim() == 0 and torch.isfinite(out.aux_loss), name
        if out.index_BQ is None:
            assert name in ("pool", "qmop", "qmop_top1")
            continue
        index = out.index_BQ
        assert index.shape == (3, budget) and index.min() >= 0 and index.max() < SIDE * SIDE, name
        assert (index[:, 1:] > index[:, :-1]).all(), name                    # sorted, distinct: original order
        assert torch.equal(out.tokens_BQD, x.gather(1, index.unsqueeze(-1).expand(-1, -1, DIM))), name  # values kept


def test_learned_pruner_keeps_the_best_scores_and_its_scorer_gets_a_gradient():
    pruner = LearnedPruner(DIM, SIDE * SIDE, 4)
    x = patches()
    with torch.no_grad():        # the scorer: the patch's first feature
        pruner.scorer[0].weight.zero_(), pruner.scorer[0].bias.fill_(1.0)
        pruner.scorer[2].weight.zero_(), pruner.scorer[2].bias.zero_()
        pruner.scorer[0].weight[0, 0], pruner.scorer[2].weight[0, 0] = 1.0, 1.0
    x[:, :, 0] = torch.arange(16.).flip(0)            # the first patches score highest (GELU is increasing here)
    out = pruner(x)
    assert out.index_BQ.tolist() == [[0, 1, 2, 3]] * 3
    out.tokens_BQD.pow(2).sum().backward()
    assert pruner.scorer[2].weight.grad.abs().sum() > 0       # straight-through: the gradient reaches the scorer


def test_random_pruner_fresh_in_training_fixed_in_evaluation():
    pruner = RandomPruner(16, 5, seed=1)
    x = patches(4)
    a, b = pruner(x).index_BQ, pruner(x).index_BQ
    assert not torch.equal(a, b)                                   # a fresh draw per step
    assert torch.equal(RandomPruner(16, 5, seed=1)(x).index_BQ, a)  # the same seed, the same draws
    pruner.eval()
    fixed = pruner(x).index_BQ
    assert torch.equal(fixed, fixed[:1].expand(4, -1)) and torch.equal(pruner(x[:1]).index_BQ, fixed[:1])


def test_pool_by_hand():
    x = torch.arange(16.).reshape(1, 16, 1).expand(1, 16, DIM)      # patch t holds t
    out = PoolCompressor(SIDE, 4)(x)
    # 2 x 2 cells of the 4 x 4 grid: (0+1+4+5)/4 = 2.5, then 4.5, 10.5, 12.5
    assert out.tokens_BQD[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5] and out.index_BQ is None


def test_branch_balance_loss_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    # mean probability P = (0.3, 0.45, 0.25); fusion: f = P -> 3 * (0.09 + 0.2025 + 0.0625) = 1.065
    assert branch_balance_loss(probs, probs).item() == pytest.approx(1.065)
    # top-1: branches 0 and 1 each get one image, f = (0.5, 0.5, 0) -> 3 * (0.15 + 0.225) = 1.125
    assert branch_balance_loss(probs, torch.tensor([[1., 0, 0], [0, 1., 0]])).item() == pytest.approx(1.125)
    uniform = torch.full((4, 3), 1 / 3)
    assert branch_balance_loss(uniform, uniform).item() == pytest.approx(1.0)   # the minimum


def test_qmop_fused_is_the_weighted_sum_top1_is_one_branch():
    torch.manual_seed(0)
    fused, top1 = QMoP(DIM, QDIM, SIDE, 4, 2), QMoP(DIM, QDIM, SIDE, 4, 2, top1=True, alpha_balance=0.5)
    top1.load_state_dict(fused.state_dict())
    x, q = patches(), torch.randn(3, QDIM)
    outputs, _ = fused.branch_outputs(x)
    probs = fused.router_probs(x, q)
    assert torch.allclose(probs.sum(-1), torch.ones(3))
    expected = sum(probs[:, e, None, None] * outputs[e] for e in range(3))
    out = fused(x, q)
    assert torch.allclose(out.tokens_BQD, expected, atol=1e-6)
    assert out.aux_loss.item() == pytest.approx(0.01 * branch_balance_loss(probs, probs).item())
    best = probs.argmax(-1)
    out1 = top1(x, q)
    for b in range(3):
        assert torch.equal(out1.tokens_BQD[b], outputs[best[b]][b])          # the chosen branch, exactly
    out1.tokens_BQD.sum().backward()
    assert top1.router[2].weight.grad.abs().sum() > 0                       # straight-through to the router
    # the query steers the router
    assert not torch.allclose(fused.router_probs(x, q), fused.router_probs(x, -q))


def test_compress_config_budgets():
    c = CompressConfig(method="learnpruner", keep_ratio=0.125)
    assert c.budget(64) == 8 and c.pre_llm_budget(64) == 16 and c.in_llm_layer(4) == 2
    assert CompressConfig(method="qmop", keep_ratio=0.2).pre_llm_budget(64) == 13
    assert CompressConfig(method="fastv", keep_ratio=0.25).pre_llm_budget(64) == 64
    assert CompressConfig(method="pool", keep_ratio=0.01).budget(16) == 1
    with pytest.raises(ValueError, match="stage2_layer=4 must be in 1..3"):
        ModelConfig(compress=CompressConfig(method="learnpruner", keep_ratio=0.5, stage2_layer=4))
    with pytest.raises(ValueError, match="stage1_keep_ratio=0.25 is below keep_ratio=0.5"):
        CompressConfig(method="learnpruner", keep_ratio=0.5, stage1_keep_ratio=0.25)


# -- in the model -------------------------------------------------------------------------------------------
def model_config(method="none", keep_ratio=1.0, **compress):
    return ModelConfig(d_model=16, n_layers=2, n_heads=2, image_size=8, patch_size=2, vision_dim=16,
                       vision_layers=1, max_len=40, compress=CompressConfig(method=method, keep_ratio=keep_ratio,
                                                                            **compress))


def data(cfg: ModelConfig):
    """Four conversations (three with an image) through the data layer, with its placeholders for `cfg`."""
    questions = [("what digit is it", "seven", "a.png"), ("where is the digit", "top left", "b.png"),
                 ("is there text", "no", None), ("what digit is here", "two", "c.png")]
    samples = [Sample(str(i), q, a, None if path is None else Path(path), None)
               for i, (q, a, path) in enumerate(questions)]
    tok = WordTokenizer.build(t for s in samples for t in (s.prompt, s.answer))
    ds = LlavaDataset(samples, tok, cfg.image_size, cfg.patch_size, cfg.compress.pre_llm_budget(cfg.num_patches))
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ds.image = lambda i: images[i] if ds.is_multimodal(i) else torch.zeros(1, 8, 8)     # no files
    return ds, tok


def build(cfg, tok, seed=0):
    torch.manual_seed(seed)
    smoes = SMoESConfig(num_experts=4, k=2, num_bins=2)
    return TinyMoEVLM(cfg, tok.vocab_size, tok.image_id, smoes, expert_seed=seed)


def run(model, batch):
    return model(batch.input_ids_BT, batch.attention_mask_BT, batch.modality_BT, batch.image_BCHW,
                 batch.has_image_B, labels_BT=batch.labels_BT)


def test_method_none_is_todays_model_bit_for_bit():
    """No compressor and no new parameter; the embeddings are those of the code before
    issue 19 (written out below) bit for bit, with a zero auxiliary loss; the data layer's items are unchanged."""
    cfg = model_config()
    ds, tok = data(cfg)
    plain = LlavaDataset(ds.samples, tok, 8, 2)
    plain.image = ds.image
    for i in range(4):
        a, b = ds[i], plain[i]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if k == "image_CHW" else a[k] == b[k] for k in a)
    model = build(cfg, tok)
    assert model.compressor is None and not any("compressor" in n for n in model.state_dict())
    batch = collate_train([ds[i] for i in range(4)])
    valid = batch.attention_mask_BT
    x, _, aux = model.embed(batch.input_ids_BT, valid, batch.image_BCHW, batch.has_image_B, batch.labels_BT == -100)
    # the embedding of before issue 19
    ref = model.tok_emb(batch.input_ids_BT)
    patches = model.projector(model.vision(batch.image_BCHW[batch.has_image_B]))
    ref = ref.masked_scatter((batch.input_ids_BT == tok.image_id).unsqueeze(-1), patches)
    ref = ref + model.pos_emb((valid.long().cumsum(-1) - 1).clamp_min(0))
    assert torch.equal(x, ref) and aux.item() == 0.0


@pytest.mark.parametrize("method", ["qmop", "learnpruner", "random", "pool"])
def test_pre_llm_method_trains_and_shortens_the_sequence(method):
    full_ds, tok = data(model_config())
    cfg = model_config(method, 0.25)
    ds, _ = data(cfg)
    kept = cfg.compress.pre_llm_budget(16)
    assert kept == (8 if method == "learnpruner" else 4)
    full, short = collate_train([full_ds[i] for i in range(4)]), collate_train([ds[i] for i in range(4)])
    assert short.seq_len == full.seq_len - (16 - kept)
    assert short.attention_mask_BT.sum() == full.attention_mask_BT.sum() - 3 * (16 - kept)   # three images
    assert (short.modality_BT.sum(1) == torch.tensor([kept, kept, 0, kept])).all()
    model = build(cfg, tok).train()
    out = run(model, short)
    if getattr(out, "packing", None) is None:      # in-LLM pruning (learnpruner's stage 2) re-packs the rows
        assert out.logits_BTV.shape[:2] == short.input_ids_BT.shape
    out.loss.backward()
    assert model.vision.embed.weight.grad.abs().sum() > 0
    learned = [p for n, p in model.named_parameters() if n.startswith("compressor.")]
    assert (len(learned) > 0) == (method in ("qmop", "learnpruner"))
    assert all(p.grad is not None for p in learned)


@pytest.mark.parametrize("method", ["qmop", "learnpruner", "random", "pool"])
def test_a_compressed_batch_equals_its_samples_one_by_one(method):
    cfg = model_config(method, 0.25, stage2_layer=1) if method == "learnpruner" else model_config(method, 0.25)
    ds, tok = data(cfg)
    model = build(cfg, tok).eval()
    batch = collate_train([ds[i] for i in range(4)])
    with torch.no_grad():
        together = run(model, batch)
        for i in range(4):
            alone = run(model, collate_train([ds[i]]))
            n = alone.logits_BTV.shape[1]
            if getattr(together, "packing", None) is None:
                assert torch.allclose(together.logits_BTV[i, :n], alone.logits_BTV[0], atol=1e-5), (method, i)
            else:     # in-LLM pruning (learnpruner's stage 2): compare the kept rows
                rows = together.packing.valid_BT[i]
                assert torch.allclose(together.logits_BTV[i][rows], alone.logits_BTV[0][alone.packing.valid_BT[0]],
                                      atol=1e-5), (method, i)


def test_build_compressor_by_method():
    assert build_compressor(model_config()) is None
    assert build_compressor(model_config("fastv", 0.5, fastv_layer=1)) is None
    assert isinstance(build_compressor(model_config("qmop", 0.5)), QMoP)
    assert build_compressor(model_config("learnpruner", 0.25)).budget == 8
    assert isinstance(build_compressor(model_config("learnpruner", 0.25, stage1_relaxation="gumbel")), LearnedPruner)
