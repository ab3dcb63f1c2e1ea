"""What a model family brings to a training session (`ds_smoes.app.session`), and nothing more.

A family builds its data and model, moves a batch to the device and runs the forward, and
evaluates on a held-out split.  Everything else a run does (engine, resumable loop, expert
placement when the bins freeze, checkpoints, tracking, summary) is the session's, shared by
every family:

- `BuiltinFamily` (`ds_smoes.app.builtin`): the small MoE-LLaVA of `ds_smoes.model`;
- `HFFamily` (`ds_smoes.app.hf_family`): a Hugging Face MoE-VLM converted to SMoES (`--hf-model`).
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable

import torch

from ds_smoes.app.evaluation import RoutingMeasurement
from ds_smoes.core.errors import ConfigError, DatasetError
from ds_smoes.parallel import distributed


def ensure_digits(d, log: Callable) -> None:
    """Generate the digits dataset of data config `d` when it asks for it and it is missing (rank 0
    writes, every rank waits)."""
    from ds_smoes.data import generate_digits_dataset

    if d.generate_digits and not Path(d.train_json).exists():
        if distributed.rank() == 0:
            variant = f", {d.canvas_size}x{d.canvas_size} canvas" if d.canvas_size else ""
            variant += f", {d.digits_language} language questions" if d.digits_language != "words" else ""
            log(f"generating the digits dataset (seed {d.digits_seed}{variant}) into {d.image_folder} ...")
            generate_digits_dataset(Path(d.image_folder), seed=d.digits_seed, canvas_size=d.canvas_size,
                                    language=d.digits_language)
        distributed.barrier()


def check_digits_variant(d, image_size: int) -> None:
    """ConfigError when `d.image_folder` holds digits of another variant than `d.canvas_size` asks for, or canvas
    digits whose canvas is not the model's `image_size` (images would be resized, the digit blurred and moved).
    Folders without a digits manifest (other datasets) pass."""
    from ds_smoes.data.digits import GENERATOR_NAME

    try:
        manifest = json.loads((Path(d.image_folder) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(manifest, dict) or manifest.get("generator") != GENERATOR_NAME:
        return
    canvas = manifest.get("canvas_size")
    language = manifest.get("language", "words")
    if language != d.digits_language:
        raise ConfigError(f"data.digits_language={d.digits_language} but {d.image_folder} holds the {language} "
                          "language questions: point data.* at another folder or regenerate it with python -m "
                          f"ds_smoes.data.digits --out {d.image_folder} --language {d.digits_language} --force")
    if d.canvas_size is not None and canvas != d.canvas_size:
        found = f"the {canvas}x{canvas} canvas variant" if canvas else "the plain 8x8 digits"
        raise ConfigError(f"data.canvas_size={d.canvas_size} but {d.image_folder} holds {found}: point data.* at "
                          f"another folder (e.g. data/digits_canvas{d.canvas_size}) or regenerate it with python -m "
                          f"ds_smoes.data.digits --out {d.image_folder} --canvas-size {d.canvas_size} --force")
    if canvas is not None and canvas != image_size:
        raise ConfigError(f"{d.image_folder} holds digits on a {canvas}x{canvas} canvas but model.image_size="
                          f"{image_size}: set model.image_size: {canvas} and data.canvas_size: {canvas} "
                          f"(--set model.image_size={canvas} --set data.canvas_size={canvas})")


def check_images(splits: dict[str, list], image_size: int) -> None:
    """Every image the splits reference decodes, or DatasetError on every rank with the first problem any rank
    found (the ranks share the files; rank 0 prints the one message)."""
    from ds_smoes.data.llava import unreadable_image
    from ds_smoes.parallel import distributed

    rank, world = distributed.rank(), distributed.world_size()
    found = None
    for split, samples in splits.items():
        found = found or unreadable_image(samples, image_size, split, rank, world)
    message = distributed.first_message(found)
    if message is not None:
        raise DatasetError(message)


class ModelFamily(ABC):
    """The model-specific half of a run.  `build` sets `model`, `train_set`, `val_set` (or None),
    `test_set` and `collate`; the session calls the rest."""

    model: torch.nn.Module
    train_set: torch.utils.data.Dataset
    val_set: torch.utils.data.Dataset | None
    test_set: torch.utils.data.Dataset
    collate: Callable

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    @abstractmethod
    def build(self, rank: int, log: Callable) -> None:
        """Data and model for this rank (its EP rank's experts only)."""

    @property
    def smoes(self):
        """The SMoES settings the model was built with (after `build`)."""
        return self.cfg.smoes

    @abstractmethod
    def describe(self) -> str:
        """One log line: the model, the data and the SMoES settings."""

    @abstractmethod
    def run_name(self) -> str:
        """The MLflow run name when tracking.run_name does not give one."""

    def tags(self) -> dict[str, str]:
        s = self.smoes
        return {"gate": s.gate, "score_type": s.score_type, "num_bins": str(s.num_bins),
                "seed": str(self.cfg.run.seed), "binning": s.binning}

    def resolved_config(self) -> dict:
        """The config as logged (params, config.json) and written beside the run."""
        return json.loads(self.cfg.model_dump_json())

    def deepspeed_config(self, ds_config: dict) -> dict:
        """The DeepSpeed config the engine is built with, from the run's (`run.deepspeed_config`): where a family
        completes what its model decides."""
        return ds_config

    def engine_built(self, engine) -> None:
        """Called once `deepspeed.initialize` has built the engine, before any forward or checkpoint load."""

    def begin_step(self, step: int) -> None:
        """Called before the forward of optimizer step `step` (0-based, counted over the whole run, resumed or
        not): where a family seeds what it draws per step."""

    @abstractmethod
    def forward(self, engine, batch, device: torch.device):
        """One training forward of `batch` (still on the host): an output with .loss, .lm_loss, .aux_loss."""

    @abstractmethod
    def num_tokens(self, batch) -> int:
        """Non-padding tokens of `batch` (for tokens/s)."""

    def train_loss(self, out) -> torch.Tensor:
        """What `engine.backward` receives."""
        return out.loss

    @abstractmethod
    def evaluate(self, module, dataset, device: torch.device,
                 with_routing: bool) -> tuple[dict, RoutingMeasurement | None]:
        """Exact-match accuracy per question kind (acc_multimodal, acc_language, acc_overall, num_multimodal,
        num_language) and, with `with_routing`, the routing measured over a teacher-forced pass (its .loss the
        test loss).  A collective: every rank calls it."""

    def final_figures(self) -> dict:
        """Family-specific entries of metrics.json."""
        return {}

    def export(self, out_dir: Path, log: Callable) -> dict:
        """Write what the family exports at the end of training (every rank calls it); entries for metrics.json."""
        return {}

    def save_artifacts(self, out_dir: Path, final: dict, tracker) -> None:
        """Rank 0, after training: files beside metrics.json (and in MLflow)."""
