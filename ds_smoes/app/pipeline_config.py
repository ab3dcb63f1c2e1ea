"""The recipe pipeline's configuration (`python -m ds_smoes.pipeline`, docs/recipe.md): one YAML file naming the
training config every stage starts from, and the length and learning rate of each stage.

Relative paths are resolved against the file's own directory; `--set stage.field=value` overrides a field
(`--set moe.epochs=8`, `--set 'dense.set=["optim.micro_batch_size=16"]'`).
"""
from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from ds_smoes.app.config import _Section, apply_overrides, read_mapping_file
from ds_smoes.core.errors import ConfigError

STAGES = ("vision", "language", "align", "dense", "moe")
"""In order: stage 0 (the encoder), the language model, stage I (projector alignment), stage II (dense tuning),
stage III (the upcycled MoE)."""


class VisionStage(_Section):
    epochs: int = Field(30, ge=1, description="stage 0: passes over the training digits, each re-placed anew")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)


class TrainStage(_Section):
    epochs: float = Field(gt=0, description="passes over the stage's training conversations")
    lr: float | None = Field(None, gt=0, description="peak learning rate (None: the training config's optim.lr)")
    set: tuple[str, ...] = Field((), description="more SECTION.FIELD=VALUE overrides of this stage's training run")


class PipelineConfig(_Section):
    train_config: Path = Field(description="the training config (YAML or JSON) every training stage starts from")
    out_dir: Path = Field(Path("runs/recipe"), description="stages go to OUT_DIR/seedS/<stage> (the MoE stage to "
                                                          "OUT_DIR/seedS/moe-<variant>)")
    seed: int = Field(0, description="seed of every stage (stage 0's initialisation and canvas stream too)")
    variant: str = Field("smoes", description="a gate variant of python -m ds_smoes.compare (smoes, topk, hard, "
                                              "hybrid, ltdr, smar, smoes-kl, ...): the MoE stage's gate; or a visual "
                                              "token compression setting (none, qmop-0.25, learnpruner-0.125, "
                                              "random-0.25, pool-0.125, fastv-0.25, ...): on from stage I, SMoES gate")
    freeze_vision: bool = Field(True, description="keep the stage-0 encoder frozen in stages II-III (stage I and "
                                                  "the language stage always keep it frozen)")
    ranks: int = Field(2, ge=1, description="processes per training stage (deepspeed --num_gpus)")
    vision: VisionStage = VisionStage()
    language: TrainStage = TrainStage(epochs=20)
    align: TrainStage = TrainStage(epochs=10, lr=0.01)
    dense: TrainStage = TrainStage(epochs=10)
    moe: TrainStage = TrainStage(epochs=10)

    @field_validator("variant")
    @classmethod
    def _known_variant(cls, value: str) -> str:
        variant_settings(value)
        return value


def variant_settings(variant: str) -> tuple[str, list[str]]:
    """(the first stage the variant changes, its --set items).  A gate changes stage III only, so every gate of a
    seed shares stages 0-II; a compression setting changes what the LLM sees from stage I on (QMoP's and
    LearnPruner's modules train with the projector there), so compression settings share stage 0 and the
    language stage.  ValueError for an unknown name."""
    from ds_smoes.app.gate_variants import VARIANTS
    from ds_smoes.app.compare_compression import VARIANTS as COMPRESSION

    if variant in VARIANTS:
        return "moe", list(VARIANTS[variant])
    if variant == "none":   # no compression: the recipe as the gates run it (stage III alone is its own)
        return "moe", []
    if variant in COMPRESSION:
        return "align", list(COMPRESSION[variant])
    raise ValueError(f"unknown variant {variant!r}; choose a gate ({', '.join(VARIANTS)}) or a compression "
                     f"setting ({', '.join(COMPRESSION)})")


def load_pipeline_config(path: Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read, override and validate a pipeline file; ConfigError (naming the file) when it is not valid."""
    from pydantic import ValidationError

    path = Path(path)
    data = read_mapping_file(path, "pipeline config", "a mapping with train_config and stages")
    for key in ("train_config", "out_dir"):   # the file's paths: relative to the file; --set's: to the cwd
        if isinstance(data.get(key), str) and not Path(data[key]).is_absolute():
            data[key] = str((path.parent / data[key]).resolve())
    data = apply_overrides(data, overrides or [])
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as err:
        lines = [f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"{path}: " + "; ".join(lines)) from None
    if not cfg.train_config.is_file():
        raise ConfigError(f"{path}: train_config {cfg.train_config} does not exist")
    return cfg
