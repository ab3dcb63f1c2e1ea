"""The training job's configuration: one file (YAML or JSON) validated into `TrainConfig`.

Relative paths in the file are resolved against the directory of the file itself, so a
config works from any working directory.  `--set section.field=value` overrides any field.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ds_smoes.core.config import SMoESConfig, validate
from ds_smoes.core.errors import ConfigError
from ds_smoes.model.config import ModelConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    train_json: Path = Field(Path("data/digits/train.json"), description="LLaVA-format training conversations")
    val_json: Path | None = Field(Path("data/digits/val.json"), description="validation split (None: skip)")
    test_json: Path = Field(Path("data/digits/test.json"), description="held-out split for the final figures")
    image_folder: Path = Field(Path("data/digits"), description="root that the records' \"image\" paths are under")
    generate_digits: bool = Field(True, description="generate the digits dataset into image_folder when missing")
    digits_seed: int = Field(0, description="seed of the generated digits dataset")
    canvas_size: int | None = Field(None, description="generate the digits' canvas variant (each digit at a seeded "
                                    "place on an NxN noisy canvas, with 'where is the digit?' questions; 32 or 48); "
                                    "model.image_size must equal it.  None: the plain 8x8 digits")
    digits_language: Literal["words", "sums"] = Field(
        "words", description="the generated digits' language-only questions: words (one-digit arithmetic in number "
                             "words) or sums (two-digit sums and the larger of two numbers, digit by digit, test questions never in "
                             "training: language accuracy that measures a skill, not memory)")
    text_share: float | None = Field(
        None, gt=0, lt=1, description="cut the training split's language-only conversations to this share of it "
                                      "(a seeded choice by run.seed; e.g. 0.05 for a multimodal-heavy stage III); "
                                      "None: as the data has them")
    augment_max_shift: int = Field(0, ge=0, description="training images are shifted by up to N pixels per axis "
                                   "(seeded per step: a resumed run draws the shifts the uninterrupted one drew)")
    tasks: tuple[str, ...] | None = Field(
        None, min_length=1, description="train and evaluate on these tasks only (the records' \"task\"; "
                                        "digit_caption: one caption per image of the canvas digits, the recipe's "
                                        "stage I); None: every conversation.  The vocabulary is always the whole "
                                        "training split's, so the recipe's stages share it")

    @field_validator("canvas_size")
    @classmethod
    def _check_canvas_size(cls, value: int | None) -> int | None:
        from ds_smoes.data.digits import check_canvas_size

        check_canvas_size(value)
        return value


class OptimConfig(_Section):
    epochs: float = Field(6.0, gt=0, description="passes over the training split (fractions allowed)")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    micro_batch_size: int = Field(32, ge=1, description="sequences per rank per step")
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.05, ge=0, le=1, description="cosine decay floor, as a share of lr")
    warmup_steps: int = Field(30, ge=0)
    weight_decay: float = Field(0.01, ge=0)


class TrackingConfig(_Section):
    tracking_uri: str | None = Field(None, description="MLflow URI; None: sqlite store mlflow.db in the working dir")
    experiment: str = Field("ds-smoes", description="MLflow experiment name")
    run_name: str | None = Field(None, description="MLflow run name (default: gate-score-bins-seed)")
    enabled: bool = Field(True, description="log to MLflow at all")


class RunConfig(_Section):
    seed: int = 0
    output_dir: Path = Field(Path("runs/latest"), description="tokenizer, figures, checkpoint and metrics go here")
    deepspeed_config: Path = Field(Path("ds_configs/cpu_ep.json"), description="DeepSpeed JSON (ZeRO, clipping)")
    eval_batch_size: int = Field(64, ge=1)
    max_new_tokens: int = Field(4, ge=1, description="greedy decoding length for exact-match evaluation")
    log_every: int = Field(20, ge=1, description="print and log training metrics every N steps")
    eval_every_epoch: bool = Field(True, description="validation accuracy after every epoch")
    save_checkpoint: bool = Field(True, description="DeepSpeed checkpoint in output_dir/checkpoint at the end")
    checkpoint_every_epoch: bool = Field(
        False, description="also a DeepSpeed checkpoint after every epoch (output_dir/checkpoint, tag epochN; the "
                           "previous epoch's is removed), so an interrupted run continues with --resume-from "
                           "output_dir/checkpoint (the recipe's pipeline does)")
    checkpoint_every_minutes: float | None = Field(
        30.0, gt=0, description="also save the whole state (tag periodic in output_dir/checkpoint, replaced each "
                                "time) at the first logging step after this many minutes since the last one, not "
                                "at an epoch's last step: after a crash or a kill, the same command resumes from "
                                "it; null: never")


class TrainConfig(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    smoes: SMoESConfig = SMoESConfig()
    optim: OptimConfig = OptimConfig()
    tracking: TrackingConfig = TrackingConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _check_canvas(self) -> "TrainConfig":
        canvas = self.data.canvas_size
        if canvas is not None and canvas != self.model.image_size:
            raise ValueError(f"data.canvas_size={canvas} but model.image_size={self.model.image_size}: the model must "
                             f"see the whole canvas; set model.image_size: {canvas} (--set model.image_size={canvas})")
        return self


def _parse_value(text: str) -> Any:
    """`--set` values are YAML scalars: 4 -> int, 0.5 -> float, true -> bool, null -> None."""
    return yaml.safe_load(text)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, value = parse_override(item, "smoes.num_bins=4")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return data


def _resolve_paths(data: dict, base: Path) -> dict:
    """Make relative paths in the file relative to the file's directory."""
    for section, fields in (("data", ("train_json", "val_json", "test_json", "image_folder")),
                            ("model", ("vision_checkpoint", "start_from")),
                            ("run", ("output_dir", "deepspeed_config"))):
        sec = data.get(section) or {}
        for name in fields:
            value = sec.get(name)
            if isinstance(value, str) and not Path(value).is_absolute():
                sec[name] = str((base / value).resolve())
        if sec:
            data[section] = sec
    return data


def read_mapping_file(path: Path, what: str, expected: str) -> dict:
    """A YAML (or .json) file holding a mapping; one clear ConfigError for a missing file, bad
    syntax or another top-level type.  `what` names the file ("config file"), `expected` the mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} not found")
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        text = path.read_text()
        data = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: not valid {kind}: {err}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected {expected}")
    return data


def parse_override(item: str, example: str) -> tuple[str, Any]:
    """`section.field=value` -> (dotted key, YAML scalar value)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.field=value, e.g. --set {example}")
    key, value = item.split("=", 1)
    return key.strip(), _parse_value(value)


def load_train_config(path: Path | None, overrides: list[str] | None = None, origin: str = "--set",
                      source: str | None = None) -> TrainConfig:
    """The validated config of file `path` (None: the defaults) with `overrides` (`section.field=value`) applied.
    A ConfigError names `source` (default: the file) and, for a field an override set, `origin` and the entry."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        data = read_mapping_file(path, "config file",
                                 "a mapping of sections (data, model, smoes, optim, tracking, run)")
        data = _resolve_paths(data, path.parent)
    data = apply_overrides(data, overrides or [])
    return validate(TrainConfig, data, source=source or (str(path) if path else "config"), overrides=overrides or [],
                    origin=origin)
