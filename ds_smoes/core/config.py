"""Configuration of the SMoES gate, validated at the boundary.

One pydantic model per concept.  Every rule that a user can break (bin counts that do not fit
the expert-parallel layout, an unknown score type, ...) is rejected here with a message that
says what to change, so nothing deeper in the stack has to re-check it.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ds_smoes.core.errors import ConfigError

ScoreType = Literal["attention", "gaussian", "hard"]
BinningType = Literal["adaptive", "fixed"]
GateType = Literal["smoes", "topk", "hard", "hybrid", "ltdr", "smar"]
BinObjective = Literal["mi", "kl"]
DispatchType = Literal["deepspeed", "rank_once"]
PlacementType = Literal["bins", "none"]


class _Strict(BaseModel):
    """Base: unknown keys are errors (a typo in a YAML file must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SMoESConfig(_Strict):
    """Everything the SMoES gate and layer need (docs/method.md, sections 1-3).

    Defaults are the paper's values where it gives them; the choices that are ours (docs/method.md,
    "Choices that are ours") are options here.
    """

    gate: GateType = Field("smoes", description="routing method: smoes, or a baseline (topk, hard, hybrid, ltdr, "
                                                "smar); see docs/gates.md")
    num_experts: int = Field(8, ge=1, description="experts per MoE layer (N_e)")
    k: int = Field(2, ge=1, description="experts selected per token (top-k)")
    ep_size: int = Field(1, ge=1, description="expert-parallel group size")
    num_bins: int = Field(2, ge=1, description="expert bins (N_bins); a multiple of ep_size dividing num_experts")
    score_type: ScoreType = Field("attention", description="soft modality score: attention, gaussian or hard")
    binning: BinningType = Field("adaptive", description="adaptive (sort experts by text bias) or fixed")
    rebin_interval: int = Field(25, ge=1, description="adaptive binning: re-cut bins every N training steps (ours)")
    rebin_freeze_step: int = Field(200, ge=0, description="adaptive binning: no re-cut after this step (ours)")
    ema_beta: float = Field(0.99, gt=0.0, lt=1.0, description="EMA decay of Gaussian statistics and expert loads")
    gaussian_tau: float | None = Field(None, gt=0.0, description="softmax temperature; None means 0.5 * hidden size")
    gaussian_var_floor: float = Field(1e-4, gt=0.0, description="lower bound on Gaussian variances")
    alpha_bal: float = Field(1e-3, ge=0.0, description="weight of the bin-level balance loss")
    alpha_mi: float = Field(1e-4, ge=0.0, description="weight of the inter-bin mutual-information loss")
    bin_objective: BinObjective = Field("mi", description="smoes: inter-bin mutual information, or the KL ablation")
    text_experts: int | None = Field(None, ge=1, description="hard/hybrid: experts reserved for text tokens "
                                                              "(default: half of the non-shared experts)")
    shared_experts: int = Field(0, ge=0, description="hybrid: experts open to both modalities (the last ones)")
    ltdr_top_a: int = Field(4, ge=2, description="ltdr: experts a vision tail token selects (a > k)")
    kl_low: float = Field(0.2, ge=0.0, description="smar / smoes-kl: lower edge of the KL band (ours)")
    kl_high: float = Field(1.0, gt=0.0, description="smar / smoes-kl: upper edge of the KL band (ours)")
    alpha_kl: float = Field(1e-2, ge=0.0, description="smar / smoes-kl: weight of the KL band penalty")
    normalize_topk: bool = Field(True, description="renormalise the k selected gate values to sum to 1")
    drop_tokens: bool = Field(False, description="capacity-limited routing; False is dropless")
    capacity_factor: float = Field(1.0, gt=0.0, description="capacity factor when drop_tokens is true (training)")
    eval_capacity_factor: float = Field(1.0, gt=0.0, description="capacity factor when drop_tokens is true (eval)")
    min_capacity: int = Field(4, ge=0, description="minimum expert capacity when drop_tokens is true")
    dispatch: DispatchType = Field("deepspeed", description="expert-parallel dispatch: deepspeed (stock MOELayer, "
                                                            "capacity-padded all-to-all) or rank_once (dropless, "
                                                            "each token sent once per EP rank); see "
                                                            "ds_smoes/parallel/dispatch.py")
    expert_kernel: Literal["auto", "grouped", "segments", "modules"] = Field(
        "auto", description="rank_once: how a rank runs its local experts: grouped (one grouped matmul per "
                            "projection), segments (a matmul per expert on the stacked weights), modules (the expert "
                            "modules in a loop), or auto: the fastest, measured once per device, dtype and shape "
                            "(ds_smoes/parallel/expert_kernels.py)")
    placement: PlacementType = Field("bins", description="bins: when adaptive bins freeze, move each bin's experts "
                                                         "(weights and optimizer state) onto the bin's EP rank, "
                                                         "once; none: keep DeepSpeed's layout "
                                                         "(ds_smoes/core/placement.py)")
    max_bins_per_token: int | None = Field(None, ge=1, description="bin-limited routing (ours, beyond the paper): "
                                                                   "top-k inside the token's M bins with the most "
                                                                   "gate mass; None routes globally")
    validate_inputs: bool = Field(False, description="debug: check the values of the layer's inputs at every "
                                                     "forward (modality labels in {0, 1}, sample ids in [0, tokens), "
                                                     "finite hidden states and scores, at least one non-padding "
                                                     "token) and raise ValueError naming the argument; costs one "
                                                     "device-to-host sync per MoE layer call, so leave it off for "
                                                     "training (shapes are always checked, at no cost)")

    @model_validator(mode="after")
    def _check_layout(self) -> "SMoESConfig":
        e, b, ep = self.num_experts, self.num_bins, self.ep_size
        if self.k > e:
            raise ValueError(f"k={self.k} exceeds num_experts={e}: a token cannot select more experts than exist")
        if e % ep:
            raise ValueError(
                f"num_experts={e} is not divisible by ep_size={ep}: every expert-parallel rank must hold the "
                f"same number of experts; choose num_experts as a multiple of {ep}")
        if b % ep:
            raise ValueError(
                f"num_bins={b} is not a multiple of ep_size={ep}: bins are placed whole on expert-parallel "
                f"ranks, so each rank needs the same whole number of bins; try num_bins={ep * max(1, b // ep)}")
        if e % b:
            divisors = [d for d in range(ep, e + 1, ep) if e % d == 0]
            raise ValueError(
                f"num_bins={b} does not divide num_experts={e}: bins must hold equally many experts; "
                f"valid num_bins for ep_size={ep}: {divisors}")
        if self.kl_low > self.kl_high:
            raise ValueError(f"kl_low={self.kl_low} exceeds kl_high={self.kl_high}")
        if self.gate in ("hard", "hybrid"):
            self._check_modality_split()
        elif self.shared_experts:
            raise ValueError(f"shared_experts={self.shared_experts} only applies to gate 'hybrid'")
        if self.gate == "ltdr" and not self.k < self.ltdr_top_a <= e:
            raise ValueError(f"ltdr_top_a={self.ltdr_top_a} must satisfy k={self.k} < ltdr_top_a <= num_experts={e}")
        if self.max_bins_per_token is not None:
            self._check_bin_limit()
        return self

    def _check_bin_limit(self) -> None:
        m, per_bin = self.max_bins_per_token, self.experts_per_bin
        if self.gate not in ("smoes", "smar"):
            raise ValueError(f"max_bins_per_token applies to gates with plain top-k selection (smoes, smar); gate "
                             f"{self.gate!r} selects experts by its own rule: remove max_bins_per_token")
        if m > self.num_bins:
            raise ValueError(f"max_bins_per_token={m} exceeds num_bins={self.num_bins}")
        if m * per_bin < self.k:
            need = -(-self.k // per_bin)
            raise ValueError(f"max_bins_per_token={m} bins of {per_bin} experts leave {m * per_bin} experts for "
                             f"k={self.k}: set max_bins_per_token >= {need} or lower k")

    def _check_modality_split(self) -> None:
        e, shared = self.num_experts, self.shared_experts
        if self.gate == "hard" and shared:
            raise ValueError("gate 'hard' splits all experts between text and vision; use gate 'hybrid' for "
                             f"shared_experts={shared}")
        if self.gate == "hybrid" and not shared:
            raise ValueError("gate 'hybrid' needs shared_experts >= 1 (experts open to both modalities)")
        text, vision = self.modality_split
        if text < 1 or vision < 1:
            raise ValueError(f"text_experts={text}, shared_experts={shared} leave {vision} vision experts of "
                             f"{e}: each modality needs at least one expert of its own")
        if self.k > min(text, vision) + shared:
            raise ValueError(f"k={self.k} exceeds the experts a token may use ({min(text, vision)} of its modality "
                             f"+ {shared} shared); lower k or change text_experts")

    @property
    def modality_split(self) -> tuple[int, int]:
        """(text experts, vision experts) for hard/hybrid routing; shared experts come last."""
        own = self.num_experts - self.shared_experts
        text = self.text_experts if self.text_experts is not None else own // 2
        return text, own - text

    @property
    def uses_soft_scores(self) -> bool:
        """Whether the gate reads the soft modality score (`score_type`).  Only SMoES does (its MI or KL
        objective); the baselines route on hard labels or not by modality at all, so a model with one of
        them neither tracks the attention score nor fits Gaussian statistics: the score would cost time
        and change nothing."""
        return self.gate == "smoes"

    @property
    def effective_score_type(self) -> ScoreType:
        """The score the gate actually gets: `score_type` for SMoES, "hard" for a gate that does not read it
        (the model and the layer compute only this one)."""
        return self.score_type if self.uses_soft_scores else "hard"

    @property
    def experts_per_bin(self) -> int:
        return self.num_experts // self.num_bins

    @property
    def bins_per_rank(self) -> int:
        return self.num_bins // self.ep_size

    @property
    def adaptive_bins(self) -> bool:
        """Whether the bins follow the experts' modality load during training (only SMoES re-bins)."""
        return self.gate == "smoes" and self.binning == "adaptive"

    def moves_experts(self, total_steps: int) -> bool:
        """Whether a run of `total_steps` optimizer steps moves experts between EP ranks: adaptive bins that freeze
        within it, placed on their ranks (`placement: bins`), with more than one EP rank."""
        return (self.placement == "bins" and self.adaptive_bins and self.ep_size > 1
                and self.rebin_freeze_step <= total_steps)


def _fields_at(model: type[BaseModel] | None, loc: tuple) -> list[str]:
    """The field names of the (nested) pydantic model at `loc` of `model` ([] where there is none)."""
    for part in loc:
        field = model.model_fields.get(str(part)) if model is not None else None
        annotation = field.annotation if field is not None else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return list(model.model_fields) if model is not None else []


def format_validation_error(err: ValidationError, source: str = "config", model: type[BaseModel] | None = None,
                            overrides: Sequence[str] = (), origin: str = "--set") -> str:
    """Turn a pydantic error into lines a user can act on: `field.path: what is wrong`.

    With `model`, an unknown field gets the closest accepted names ("did you mean"); a line whose field
    came from an `overrides` entry (`--set section.field=value`; `origin` says where they came from) names
    that entry, not the file.  A value outside a fixed set of choices gets the closest choice too."""
    lines = [f"invalid {source}:"]
    set_keys = {o.split("=", 1)[0].strip(): o.strip() for o in overrides if "=" in o}
    for item in err.errors():
        loc = tuple(str(p) for p in item["loc"])
        where = ".".join(loc) or "(top level)"
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc[-1], _fields_at(model, loc[:-1]), n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else "check the spelling"
            msg = f"unknown field ({hint} docs/training.md lists the accepted fields)"
        elif item["type"] == "literal_error" and isinstance(item.get("input"), str):
            choices = re.findall(r"'([^']*)'", str(item.get("ctx", {}).get("expected", "")))
            close = difflib.get_close_matches(item["input"], choices, n=1, cutoff=0.6)
            if close:
                msg += f" (got {item['input']!r}; did you mean {close[0]!r}?)"
        # the --set entries that set this field, or (for a section-level check) a field of this section
        given = [o for key, o in set_keys.items() if key == where or (key.startswith(where + ".") and loc)]
        if given:
            msg += f"  [from {origin} {', '.join(given)}]"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def validate(model: type[BaseModel], data: dict, source: str = "config", overrides: Sequence[str] = (),
             origin: str = "--set"):
    """Validate `data` as `model`, raising ConfigError with a readable message on failure (`overrides`:
    the `--set` entries applied to `data`, which the message names where a failing field came from one)."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, model, overrides, origin)) from None
