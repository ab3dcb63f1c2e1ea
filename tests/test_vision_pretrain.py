"""The recipe's stage 0 (a pretrained vision encoder of our own): the seeded canvas stream it trains on, the
held-out split kept out of it, the encoder file later stages load, and a frozen encoder that gets no update and
no optimizer state."""
from __future__ import annotations

import json

import pytest
import torch
from sklearn.datasets import load_digits

from ds_smoes.core.errors import ConfigError
from ds_smoes.data.canvas_stream import CanvasStream, place_on_canvas
from ds_smoes.data.digits import CANVAS_NOISE_MAX, LOCATIONS, image_relpath, split_image_indices
from ds_smoes.model.config import ModelConfig
from ds_smoes.model.vision import PatchVisionEncoder
from ds_smoes.model.vision_checkpoint import load_encoder, save_encoder
from ds_smoes.model.vision_heads import DigitWhereHeads
from launch import ROOT


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return d.images, d.target


def test_place_on_canvas_by_hand():
    digit_NHW = torch.zeros(1, 8, 8)
    digit_NHW[0, 0, 0], digit_NHW[0, 7, 7] = 200.0, 5.0
    noise_NSS = torch.full((1, 16, 16), 10.0)
    canvas = place_on_canvas(digit_NHW, torch.tensor([4]), torch.tensor([8]), noise_NSS)[0]
    assert canvas[4, 8] == 200.0 and canvas[11, 15] == 10.0        # the brighter of digit and noise
    assert canvas.sum() == 16 * 16 * 10.0 + 190.0 and noise_NSS.sum() == 16 * 16 * 10.0   # input untouched


def test_the_stream_is_a_pure_function_of_seed_and_epoch(digits):
    a, b = CanvasStream(32, seed=3, digits=digits), CanvasStream(32, seed=3, digits=digits)
    e2 = a.epoch(2)
    a.epoch(0)                                                  # what was drawn before does not matter
    again = b.epoch(2)
    for field in ("image_NCHW", "digit_N", "quadrant_N", "source_N"):
        assert torch.equal(getattr(e2, field), getattr(again, field)), field
    assert not torch.equal(a.epoch(1).image_NCHW, e2.image_NCHW)                 # a new epoch, new places and noise
    assert not torch.equal(CanvasStream(32, seed=4, digits=digits).epoch(2).quadrant_N, e2.quadrant_N)


@pytest.mark.parametrize("size", [32, 48])
def test_each_training_digit_is_re_placed_whole_inside_its_quadrant(digits, size):
    images, labels = digits
    stream = CanvasStream(size, seed=0, digits=digits)
    batch = stream.epoch(0)
    train = split_image_indices(len(labels), 0)["train"]
    assert batch.source_N.tolist() == train and torch.equal(batch.digit_N, torch.as_tensor(labels[train]))
    assert batch.image_NCHW.shape == (len(train), 1, size, size)
    assert 0.0 <= float(batch.image_NCHW.min()) and float(batch.image_NCHW.max()) <= 1.0
    half = size // 2
    counts = torch.bincount(batch.quadrant_N, minlength=4)
    assert counts.min() > len(train) / 4 * 0.8                  # every quadrant drawn, about evenly
    for i in range(0, len(train), 37):
        pixels_SS = batch.image_NCHW[i, 0] * 255.0
        rows, cols = torch.nonzero(pixels_SS > CANVAS_NOISE_MAX + 0.5, as_tuple=True)   # the digit's strokes
        q = int(batch.quadrant_N[i])
        assert ((rows // half) == q // 2).all() and ((cols // half) == q % 2).all(), (i, LOCATIONS[q])


@pytest.mark.parametrize("size", [32, 48])
def test_held_out_images_never_occur_in_training(digits, size, tmp_path):
    """Neither the stream (stage 0) nor the training split on disk (stages I-III) holds a test or validation
    digit: not its file, not its source image, not its pixels."""
    from ds_smoes.data import generate_digits_dataset

    images, labels = digits
    generate_digits_dataset(tmp_path, seed=0, canvas_size=size)
    split = {s: json.loads((tmp_path / f"{s}.json").read_text()) for s in ("train", "val", "test")}
    files = {s: {r["image"] for r in recs if "image" in r} for s, recs in split.items()}
    assert files["train"] and files["test"] and not files["train"] & (files["test"] | files["val"])
    indices = split_image_indices(len(labels), 0)
    assert files["test"] == {image_relpath(i) for i in indices["test"]}
    stream = CanvasStream(size, seed=0, digits=digits)
    assert not set(stream.source_N.tolist()) & (set(indices["test"]) | set(indices["val"]))
    train_pixels = {images[i].tobytes() for i in stream.source_N.tolist()}
    assert not any(images[i].tobytes() in train_pixels for i in indices["test"] + indices["val"])


def _cfg(**fields) -> ModelConfig:
    base = dict(image_size=8, patch_size=4, vision_dim=16, vision_layers=1, n_heads=2, vision_pos="sincos",
                d_model=16, max_len=40, moe_layers="none")
    return ModelConfig(**{**base, **fields})


def _encoder(cfg: ModelConfig, seed: int) -> PatchVisionEncoder:
    torch.manual_seed(seed)
    return PatchVisionEncoder(cfg.image_size, cfg.patch_size, 1, cfg.vision_dim, cfg.vision_layers, cfg.n_heads,
                              "sdpa", cfg.vision_pos)


def test_encoder_file_round_trip_and_shape_check(tmp_path):
    cfg = _cfg()
    trained = _encoder(cfg, 1)
    save_encoder(tmp_path / "encoder.pt", trained, cfg, {"metrics": {"acc_digit": 0.9}})
    fresh = _encoder(cfg, 2)
    blob = load_encoder(fresh, cfg, tmp_path / "encoder.pt")
    assert blob["metrics"] == {"acc_digit": 0.9}
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), fresh.state_dict().values()))
    with pytest.raises(ConfigError, match=r"model.vision_dim: encoder 16, config 32"):
        load_encoder(_encoder(_cfg(vision_dim=32), 0), _cfg(vision_dim=32), tmp_path / "encoder.pt")
    with pytest.raises(ConfigError, match=r"not found: train the encoder first"):
        load_encoder(fresh, cfg, tmp_path / "missing.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match=r"is not a vision encoder"):
        load_encoder(fresh, cfg, tmp_path / "other.pt")


def test_a_pretrained_encoder_is_frozen_by_default_and_gets_no_update_nor_optimizer_state(tmp_path):
    from ds_smoes.app.session import optimizer_groups
    from ds_smoes.model import TinyMoEVLM

    cfg = _cfg()
    save_encoder(tmp_path / "encoder.pt", _encoder(cfg, 1), cfg, {})
    pretrained = _cfg(vision_checkpoint=str(tmp_path / "encoder.pt"))
    assert pretrained.vision_frozen and not cfg.vision_frozen
    assert not _cfg(vision_checkpoint=str(tmp_path / "encoder.pt"), freeze_vision=False).vision_frozen
    model = TinyMoEVLM(pretrained, vocab_size=12, image_token_id=11, smoes=None)
    loaded = {k: v.clone() for k, v in model.vision.state_dict().items()}
    assert all(torch.equal(loaded[k], v) for k, v in _encoder(cfg, 1).state_dict().items())
    groups = optimizer_groups(model, 0.01)
    in_optimizer = {id(p) for g in groups for p in g["params"]}
    assert not {id(p) for p in model.vision.parameters()} & in_optimizer
    assert {id(p) for p in model.projector.parameters()} <= in_optimizer
    opt = torch.optim.AdamW(groups, lr=0.1)
    ids = torch.tensor([[1, 11, 11, 11, 11, 3, 4]])
    image = torch.rand(1, 1, 8, 8)
    valid = torch.ones_like(ids, dtype=torch.bool)
    for _ in range(2):
        out = model(ids, valid, (ids == 11).long(), image, torch.tensor([True]), labels_BT=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert all(p.grad is None for p in model.vision.parameters())
    assert all(torch.equal(loaded[k], v) for k, v in model.vision.state_dict().items())
    assert not any(p in opt.state for p in model.vision.parameters())
    assert any(p in opt.state for p in model.projector.parameters())


def test_the_heads_pool_over_patches():
    heads = DigitWhereHeads(8)
    features = torch.randn(3, 5, 8)
    digit, where = heads(features)
    assert digit.shape == (3, 10) and where.shape == (3, 4)
    # at initialisation the pooling is the mean over patches: a permutation of the patches changes nothing
    assert torch.allclose(heads(features[:, torch.randperm(5)])[0], digit, atol=1e-6)


def test_stage_0_learns_the_digit_and_its_place(tmp_path, capsys):
    """A short stage 0 on the 32x32 canvas (8 epochs, about 6 s; 30 epochs reach digit 0.91, quadrant 1.00): the
    command's own held-out figures beat chance by far (digits 0.10, quadrants 0.25) and the encoder file loads
    into the config's encoder."""
    from ds_smoes.app.pretrain_vision import main

    data = tmp_path / "canvas32"
    out = tmp_path / "stage0"
    argv = ["--config", str(ROOT / "configs" / "canvas.yaml"), "--set", f"data.image_folder={data}",
            "--set", f"data.train_json={data / 'train.json'}", "--set", f"data.val_json={data / 'val.json'}",
            "--set", f"data.test_json={data / 'test.json'}", "--epochs", "8", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "[stage 0 epoch 8/8]" in printed and "held-out digit" in printed
    m = json.loads((out / "metrics.json").read_text())
    split = split_image_indices(1797, 0)
    assert m["train_digits"] == len(split["train"]) and m["test_canvases"] == len(split["test"])
    assert m["acc_quadrant"] > 0.9 and m["acc_digit"] > 0.3, m
    from ds_smoes.app.config import load_train_config

    model_cfg = load_train_config(ROOT / "configs" / "canvas.yaml").model
    assert load_encoder(_encoder(model_cfg, 5), model_cfg, out / "encoder.pt")["metrics"] == m
    assert main(argv[:-2] + ["--epochs", "0"]) == 2
    assert "--epochs must be >= 1" in capsys.readouterr().err
