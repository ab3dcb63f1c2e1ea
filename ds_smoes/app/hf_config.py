"""The `--hf-model` training job's configuration: the usual sections plus `hf`.

Same file format and `--set` overrides as `ds_smoes.app.config` (relative paths resolve against
the file's folder); `--hf-model PATH` on the command line sets `hf.model` (relative to the working
directory).  There is no `model` section: the architecture comes from the Hugging Face model, and
`smoes.num_experts`, `smoes.k` and `smoes.normalize_topk` from its MoE blocks (conversion) or from
the `smoes` section (upcycling).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, field_validator, model_validator

from ds_smoes.core.config import SMoESConfig, validate
from ds_smoes.core.errors import ConfigError
from ds_smoes.app.config import (DataConfig, OptimConfig, RunConfig, TrackingConfig, _resolve_paths, _Section,
                                 apply_overrides)


class HFSection(_Section):
    model: str = Field(..., description="a save_pretrained directory, or a config JSON (random initialisation)")
    processor: Path | None = Field(None, description="folder with the tokenizer / image processor / chat template "
                                                     "(default: the model directory, or the config JSON's folder)")
    mode: Literal["auto", "convert", "upcycle"] = Field("auto", description="convert the MoE blocks, or upcycle a "
                                                                            "dense model; auto picks by the model")
    upcycle_layers: Literal["every_other", "all"] | list[int] = Field("every_other", description="MLPs to upcycle")
    backend: Literal["ds_smoes", "autoep"] = Field(
        "ds_smoes", description="the MoE layers: ds_smoes (the blocks converted to ds-smoes' layer on DeepSpeed's "
                                "MoE), or autoep (DeepSpeed's AutoEP layers, expert_parallel in the DeepSpeed config, "
                                "with the ds-smoes gate); docs/hf.md says which to pick")
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="attention kernel of the model")
    image_size: int | None = Field(None, ge=1, description="resize images to this square before the image processor")
    export: bool = Field(True, description="save_pretrained the trained model to run.output_dir/hf_export")
    resume_from: Path | None = Field(None, description="DeepSpeed checkpoint folder to continue training from")

    @model_validator(mode="after")
    def _autoep(self):
        if self.backend == "autoep" and self.mode == "upcycle":
            raise ValueError("hf.backend=autoep runs a sparse-MoE model's own blocks: upcycling a dense model needs "
                             "hf.backend=ds_smoes")
        if self.backend == "autoep" and self.export:
            raise ValueError("hf.backend=autoep: the Hugging Face export (hf.export) reads ds-smoes' own MoE layers; "
                             "set hf.export=false (the DeepSpeed checkpoint holds the trained model)")
        return self

    @field_validator("upcycle_layers")
    @classmethod
    def _layers(cls, v):
        if isinstance(v, list) and (not v or min(v) < 0):
            raise ValueError("upcycle_layers: give 'every_other', 'all' or a non-empty list of layer ids >= 0")
        return v


class HFTrainConfig(_Section):
    hf: HFSection
    data: DataConfig = DataConfig()
    smoes: SMoESConfig = SMoESConfig()
    optim: OptimConfig = OptimConfig()
    tracking: TrackingConfig = TrackingConfig()
    run: RunConfig = RunConfig()


def load_hf_train_config(path: Path | None, overrides: list[str] | None, hf_model: str) -> HFTrainConfig:
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        try:
            text = path.read_text()
            data = (json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)) or {}
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (hf, data, smoes, optim, tracking, run)")
        if "model" in data:
            raise ConfigError(f"{path}: a 'model' section describes the built-in toy model; with --hf-model the "
                              "architecture comes from the Hugging Face model: remove it (see docs/hf.md)")
        data = _resolve_paths(data, path.parent)
        hf = data.get("hf") or {}
        for key in ("processor", "resume_from"):
            if isinstance(hf.get(key), str) and not Path(hf[key]).is_absolute():
                hf[key] = str((path.parent / hf[key]).resolve())
        data["hf"] = hf
    data = apply_overrides(data, overrides or [])
    data.setdefault("hf", {})["model"] = str(hf_model)
    return validate(HFTrainConfig, data, source=str(path) if path else "config", overrides=overrides or [])
