"""State saved under names from before the shape-letter glossary (0.1 checkpoints and exports) loads."""
import torch

from ds_smoes.core.binning import ExpertBinning
from ds_smoes.model.vision import PatchVisionEncoder


def test_expert_binning_loads_bin_id_E_as_bin_E():
    b = ExpertBinning(4, 2, adaptive=True)
    old = {("bin_id_E" if k == "bin_E" else k): v for k, v in b.state_dict().items()}
    old["bin_id_E"] = torch.tensor([1, 0, 1, 0])
    b.load_state_dict(old)
    assert b.bin_E.tolist() == [1, 0, 1, 0]


def test_vision_encoder_loads_pos_PD_as_pos_TD():
    enc = PatchVisionEncoder(8, 2, 1, 16, 1, 2, "eager")
    old = {("pos_PD" if k == "pos_TD" else k): v for k, v in enc.state_dict().items()}
    old["pos_PD"] = torch.full_like(old["pos_PD"], 0.5)
    enc.load_state_dict(old)
    assert torch.equal(enc.pos_TD, torch.full((16, 16), 0.5))
