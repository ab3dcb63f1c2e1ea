import torch

from ds_smoes.data.augment import random_shift


def test_shift_moves_content_by_at_most_max_shift_and_keeps_shape():
    img = torch.zeros(64, 1, 5, 5)
    img[:, 0, 2, 2] = 1.0
    out = random_shift(img, 1, torch.Generator().manual_seed(0))
    assert out.shape == img.shape and out.sum(dim=(1, 2, 3)).tolist() == [1.0] * 64
    rows, cols = out[:, 0].nonzero()[:, 1], out[:, 0].nonzero()[:, 2]
    assert set(rows.tolist()) == {1, 2, 3} and set(cols.tolist()) == {1, 2, 3}  # all 9 offsets occur


def test_zero_shift_is_identity():
    img = torch.rand(2, 1, 4, 4)
    assert random_shift(img, 0) is img
