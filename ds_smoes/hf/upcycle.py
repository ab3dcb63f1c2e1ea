"""Upcycling (the MoE-LLaVA recipe): a dense VLM's MLPs become N experts copied from them.

    model = upcycle_to_smoes(dense_vlm, SMoESConfig(num_experts=4, k=2, num_bins=2), layers="every_other")

Each chosen decoder MLP (gate/up/down projections) is copied into every expert of a new SMoES layer
with a freshly initialised router (normal, std = the model's `initializer_range`, seeded per layer so
every rank builds the same router).  With `normalize_topk=true` the upcycled model starts out
computing exactly what the dense one computes (identical experts, weights summing to 1).
"""
from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

from ds_smoes.core.config import SMoESConfig
from ds_smoes.core.errors import ConfigError
from ds_smoes.hf.adapters import ExpertWeights, model_adapter_for
from ds_smoes.hf.adapters.fused import FusedTopKBlock
from ds_smoes.hf.block import build_block
from ds_smoes.hf.convert import _disable_hf_router_loss, attach_modality_context, default_ep_rank
from ds_smoes.hf.experts import fuse_gate_up
from ds_smoes.hf.model import SMoESHFModel

LayerChoice = Literal["every_other", "all"] | list[int]
UPCYCLED = FusedTopKBlock("upcycled")   # how upcycled blocks are written on export: the fused-MoE names


def upcycle_layer_ids(num_layers: int, layers: LayerChoice) -> list[int]:
    """every_other: 1, 3, 5, ... (the second of each pair, like the demo model); all; or explicit ids."""
    if layers == "every_other":
        return list(range(1, num_layers, 2))
    if layers == "all":
        return list(range(num_layers))
    ids = sorted(set(int(i) for i in layers))
    if not ids or ids[0] < 0 or ids[-1] >= num_layers:
        raise ConfigError(f"upcycle layers {layers} must be ids in 0..{num_layers - 1}")
    return ids


def dense_mlp_weights(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor, object]:
    """(gate_up [2I, D], down [D, I], act_fn) of a gated dense MLP (gate_proj, up_proj, down_proj, act_fn)."""
    parts = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, nn.Linear) and p.bias is None for p in parts) or not hasattr(mlp, "act_fn"):
        raise ConfigError(f"{type(mlp).__name__} is not a gated MLP with bias-free gate_proj/up_proj/down_proj and "
                          "act_fn; upcycling copies that layout only")
    gate, up, down = (p.weight.detach() for p in parts)
    return fuse_gate_up(gate, up), down, mlp.act_fn


def fresh_router(num_experts: int, hidden: int, std: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_experts, hidden, generator=gen) * std


def upcycle_to_smoes(model: nn.Module, smoes: SMoESConfig, layers: LayerChoice = "every_other",
                     ep_rank: int | None = None, seed: int = 0) -> SMoESHFModel:
    adapter = model_adapter_for(model.config)
    decoder = adapter.decoder_layers(model)
    ids = upcycle_layer_ids(len(decoder), layers)
    rank = default_ep_rank(smoes.ep_size) if ep_rank is None else ep_rank
    text_config = adapter.text_config(model.config)
    std = float(getattr(text_config, "initializer_range", 0.02))
    original_config = copy.deepcopy(model.config)
    context, trackers = attach_modality_context(model, adapter, smoes)
    for i in ids:
        gate_up_FD, down_DI, act = dense_mlp_weights(decoder[i].mlp)
        e = smoes.num_experts
        weights = ExpertWeights(fresh_router(e, gate_up_FD.shape[1], std, seed * 1009 + i),
                                gate_up_FD.expand(e, -1, -1), down_DI.expand(e, -1, -1), act)
        decoder[i].mlp = build_block(weights, UPCYCLED, smoes, context, rank, source_class=type(decoder[i].mlp).__name__)
    _disable_hf_router_loss(model, adapter)
    wrapped = SMoESHFModel(model, adapter, smoes, context, original_config, upcycled=True)
    wrapped.trackers = trackers
    return wrapped
