"""What the converter needs to know about one architecture, and the registry of adapters.

Two kinds of adapter (like the presets of DeepSpeed's AutoEP):

- `BlockAdapter`, one per Hugging Face sparse-MoE block class (e.g. `OlmoeSparseMoeBlock`): reads the
  router and expert weights out of the block, names the modules kept beside the routed experts
  (shared experts) and writes the weights back under the block's own names for export.
- `ModelAdapter`, one per top-level `model_type` (e.g. `qwen3_vl_moe`, `llava`): where the decoder
  layers are, which token ids are image/video placeholders, and (for upcycling) which MoE
  architecture a dense one exports to.

Adding an architecture = one small module that builds these and calls `register_*` (docs/hf.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ds_smoes.core.errors import ConfigError


@dataclass(frozen=True)
class RouterSpec:
    """How a block routes: softmax over `num_experts`, top-`k`, optionally renormalised."""
    num_experts: int
    k: int
    normalize_topk: bool


@dataclass(frozen=True)
class ExpertWeights:
    """All experts of one block in transformers' fused layout."""
    router_ED: torch.Tensor        # router weight [E, D]
    gate_up_EFD: torch.Tensor      # [E, 2I, D], gate rows first
    down_EDI: torch.Tensor         # [E, D, I]
    act_fn: Callable


class BlockAdapter:
    """Reads and writes one sparse-MoE block class.  Subclass per layout."""

    block_class: str = ""
    shared: tuple[str, ...] = ()   # child modules kept as they are (shared experts and their gates)

    def router(self, block: nn.Module) -> RouterSpec:
        raise NotImplementedError

    def weights(self, block: nn.Module) -> ExpertWeights:
        raise NotImplementedError

    def shared_output(self, owner: nn.Module, x_BTD: torch.Tensor) -> torch.Tensor | None:
        """What the kept modules (attributes of `owner`, under their names in `shared`) add to the routed
        experts' output; None: nothing."""
        return None

    def hf_state(self, weights: ExpertWeights) -> dict[str, torch.Tensor]:
        """The router and routed experts under the block's own parameter names (relative to the block)."""
        raise NotImplementedError


@dataclass(frozen=True)
class UpcycleTarget:
    """The MoE architecture an upcycled dense model exports to."""
    config_fn: Callable      # (dense config, moe layer ids, num_experts, k, normalize_topk) -> MoE config
    model_class: str         # transformers class name, e.g. "Qwen3VLMoeForConditionalGeneration"


@dataclass(frozen=True)
class ModelAdapter:
    model_type: str
    decoder_layers: Callable[[nn.Module], nn.ModuleList]     # model -> the text decoder's layers
    text_config: Callable                                    # config -> the text decoder's config
    placeholder_ids: Callable                                # config -> token ids that stand for image/video
    image_tokens: Callable | None = None                     # (config, image_inputs, i) -> placeholders of image i
    extra_inputs: Callable | None = None                     # (config, input_ids_BT) -> more model inputs
    upcycle_target: Callable | None = None                   # config -> UpcycleTarget (dense models only)


_BLOCKS: dict[str, BlockAdapter] = {}
_MODELS: dict[str, ModelAdapter] = {}


def register_block(adapter: BlockAdapter) -> BlockAdapter:
    _BLOCKS[adapter.block_class] = adapter
    return adapter


def register_model(adapter: ModelAdapter) -> ModelAdapter:
    _MODELS[adapter.model_type] = adapter
    return adapter


def block_adapter_for(block: nn.Module) -> BlockAdapter | None:
    return _BLOCKS.get(type(block).__name__)


def model_adapter_for(config) -> ModelAdapter:
    model_type = getattr(config, "model_type", None)
    if model_type not in _MODELS:
        raise ConfigError(f"no SMoES adapter for model_type {model_type!r}; supported: {sorted(_MODELS)}. "
                          "Add one as described in docs/hf.md ('Adding an architecture')")
    return _MODELS[model_type]


def supported_blocks() -> list[str]:
    return sorted(_BLOCKS)
