"""The pretrained vision encoder's file (stage 0 of the recipe, `python -m ds_smoes.pretrain_vision`): the patch
encoder's weights with the shape fields they were trained with, so that a later stage can refuse an encoder that
does not fit its `model` section instead of failing inside `load_state_dict`."""
from __future__ import annotations

from pathlib import Path

import torch

from ds_smoes.core.errors import ConfigError
from ds_smoes.model.config import ModelConfig
from ds_smoes.model.vision import PatchVisionEncoder

FORMAT = "ds-smoes-vision-encoder/1"
SHAPE_FIELDS = ("image_size", "patch_size", "vision_dim", "vision_layers", "n_heads", "vision_pos")


def save_encoder(path: Path, encoder: PatchVisionEncoder, cfg: ModelConfig, extra: dict) -> None:
    """Write `encoder`'s weights (built from `cfg`) with the shape fields and `extra` (e.g. how it was trained)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # written once, after stage 0, never on the training path
    state = {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}  # host read: the file, once
    torch.save({"format": FORMAT, "shape": {f: getattr(cfg, f) for f in SHAPE_FIELDS}, "state_dict": state,
                **extra}, path)


def read_encoder(path: Path) -> dict:
    """The file's contents; a ConfigError names the file when it is missing or not an encoder file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model.vision_checkpoint {str(path)!r} not found: train the encoder first "
                          "(python -m ds_smoes.pretrain_vision --config CONFIG)")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a vision encoder written by python -m ds_smoes.pretrain_vision")
    return blob


def load_encoder(encoder: PatchVisionEncoder, cfg: ModelConfig, path: Path) -> dict:
    """Load the pretrained weights at `path` into `encoder` (built from `cfg`); returns the file's contents."""
    blob = read_encoder(path)
    differ = {f: (blob["shape"].get(f), getattr(cfg, f)) for f in SHAPE_FIELDS
              if blob["shape"].get(f) != getattr(cfg, f)}
    if differ:
        listed = ", ".join(f"model.{f}: encoder {a!r}, config {b!r}" for f, (a, b) in differ.items())
        raise ConfigError(f"{path} was trained with another encoder shape ({listed}): set the config's fields to the "
                          "encoder's, or pretrain one for this shape")
    encoder.load_state_dict(blob["state_dict"])
    return blob
