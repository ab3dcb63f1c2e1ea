"""The vision encoder's fixed 2-D sine-cosine patch positions (model.vision_pos=sincos), by hand."""
import math

import pytest
import torch

from ds_smoes.model.config import ModelConfig
from ds_smoes.model.vision import PatchVisionEncoder, sincos_positions_2d


def test_sincos_positions_by_hand():
    # grid 2, width 4: one frequency (1), dims [sin row, cos row, sin col, cos col]
    s, c = math.sin(1.0), math.cos(1.0)
    expected = torch.tensor([[0, 1, 0, 1],      # row 0, col 0
                             [0, 1, s, c],      # row 0, col 1
                             [s, c, 0, 1],      # row 1, col 0
                             [s, c, s, c]])     # row 1, col 1
    torch.testing.assert_close(sincos_positions_2d(2, 4), expected.float())
    # width 8: frequencies 1 and 1/100 for each axis
    pos_TD = sincos_positions_2d(3, 8)
    assert pos_TD.shape == (9, 8)
    row, col = 2, 1                                # patch index 2 * 3 + 1
    torch.testing.assert_close(pos_TD[7], torch.tensor([math.sin(row), math.sin(row / 100), math.cos(row),
                                                        math.cos(row / 100), math.sin(col), math.sin(col / 100),
                                                        math.cos(col), math.cos(col / 100)]))
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_positions_2d(2, 6)


def test_positions_follow_patchify_order_and_are_not_trained_or_stored():
    enc = PatchVisionEncoder(image_size=8, patch_size=4, channels=1, dim=8, layers=0, n_heads=2, impl="eager",
                             pos="sincos")
    assert "pos_TD" not in dict(enc.named_parameters()) and "pos_TD" not in enc.state_dict()
    image_BCHW = torch.zeros(1, 1, 8, 8)
    image_BCHW[0, 0, 4, 1] = 1.0                   # a pixel of the patch in row 1, column 0
    patches_BTP = enc.patchify(image_BCHW)
    assert patches_BTP[0].abs().sum(dim=1).nonzero().flatten().tolist() == [2]    # row-major: 1 * 2 + 0
    torch.testing.assert_close(enc.pos_TD[2], sincos_positions_2d(2, 8)[2])
    assert enc.pos_TD[2, 0] == pytest.approx(math.sin(1.0)) and enc.pos_TD[2, 4] == 0.0   # row 1, column 0
    learned = PatchVisionEncoder(8, 4, 1, 8, 0, 2, "eager")
    assert learned.pos_TD.requires_grad and "pos_TD" in learned.state_dict()
    with pytest.raises(ValueError, match="'learned' or 'sincos'"):
        PatchVisionEncoder(8, 4, 1, 8, 0, 2, "eager", pos="rope")


def test_config_refuses_sincos_on_a_width_that_is_not_a_multiple_of_4():
    assert ModelConfig(vision_pos="sincos", vision_dim=64).vision_pos == "sincos"
    with pytest.raises(ValueError, match="vision_pos=sincos needs vision_dim a multiple of 4, got 10"):
        ModelConfig(vision_pos="sincos", vision_dim=10, n_heads=2, d_model=64)
