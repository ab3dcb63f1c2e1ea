"""Sparse upcycling of the built-in model (the recipe's stage III, MoE-LLaVA's): a dense model's weights into a
MoE model of the same shape, every expert of a MoE block a copy of that block's dense FFN.

Everything but the MoE blocks' FFNs is copied by name.  Each expert starts as the dense FFN, optionally with
relative noise (`noise`: each weight matrix plus noise * its own std * N(0, 1), seeded per layer and GLOBAL expert,
so every expert-parallel layout starts from the same experts).  The router keeps its random initialisation, as
MoE-LLaVA's does: with exact copies whatever it picks computes the dense FFN, and the kept gate weights sum to 1
(`smoes.normalize_topk`), so the upcycled model computes the dense model's function at the first step; the
experts differ as soon as the router sends them different tokens.
"""
from __future__ import annotations

import torch

from ds_smoes.core.errors import ConfigError

EXPERTS = "deepspeed_moe.experts.deepspeed_experts"


def upcycle_from_dense(moe_model, dense_state: dict[str, torch.Tensor], noise: float = 0.0, seed: int = 0,
                       ep_rank: int = 0) -> dict[str, int]:
    """Load `dense_state` (a dense TinyMoEVLM's state dict) into `moe_model` (a TinyMoEVLM whose MoE blocks hold
    this EP rank's local experts); returns how many tensors were copied and how many expert tensors were filled.
    ConfigError when the two models differ in anything but the MoE blocks' FFNs."""
    target = moe_model.state_dict()
    moe_blocks = [i for i, block in enumerate(moe_model.blocks) if block.is_moe]
    filled, copied = {}, 0
    for name, value in dense_state.items():
        block = _block_of(name)
        if block in moe_blocks and name.startswith(f"blocks.{block}.ffn."):
            continue
        if name not in target:
            raise ConfigError(f"the dense model has {name}, the MoE model does not: upcycle from a dense run of "
                              "the same model section (moe_layers: none)")
        if target[name].shape != value.shape:
            raise ConfigError(f"{name}: dense {tuple(value.shape)}, MoE model {tuple(target[name].shape)}: the "
                              "model sections differ")
        filled[name] = value
        copied += 1
    experts = 0
    for layer_idx, block in enumerate(moe_blocks):
        local = moe_model.blocks[block].ffn.deepspeed_moe.experts.deepspeed_experts
        ffn = f"blocks.{block}.ffn."
        for j in range(len(local)):
            global_expert = ep_rank * len(local) + j
            gen = torch.Generator().manual_seed(seed * 100_003 + layer_idx * 1009 + global_expert)
            for name in local[j].state_dict():
                source = dense_state.get(ffn + name)
                if source is None:
                    raise ConfigError(f"the dense model has no {ffn + name}: upcycle from a dense run (moe_layers: "
                                      "none) of the same model section")
                value = source.clone()
                if noise > 0 and value.dim() > 1:
                    value += noise * source.float().std() * torch.randn(value.shape, generator=gen).to(value.dtype)
                filled[f"{ffn}{EXPERTS}.{j}.{name}"] = value
                experts += 1
    # the router and SMoES state start fresh; so does a visual token compressor the dense model did not have
    # (the recipe's compression variants add theirs at stage I, after a language stage without one)
    missing = [n for n in target if n not in filled and ".gate." not in n and ".scorer." not in n
               and ".binning." not in n and "physical_E" not in n and not n.startswith("compressor.")]
    if missing:
        raise ConfigError(f"the dense model lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}: upcycle from a "
                          "dense run of the same model section")
    moe_model.load_state_dict(filled, strict=False)
    return {"copied": copied, "expert_tensors": experts}


def _block_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blocks" and parts[1].isdigit() else None
