"""Export a trained SMoES model back to a transformers architecture, loadable with `from_pretrained`.

- a converted model goes back to its own architecture: the router and the experts are written under
  the original parameter names (`mlp.gate.weight`, `mlp.experts.gate_up_proj`, ...);
- an upcycled dense model goes to its MoE sibling (Qwen3-VL -> Qwen3-VL-MoE, LLaVA/Qwen3 -> LLaVA/Qwen3-MoE),
  the upcycled layers as sparse blocks, the others as dense MLPs.

With expert parallelism each rank holds only its experts: `export_state_dict` gathers them over the
EP group (a collective: every rank calls it), and rank 0 writes.  SMoES buffers (bins, Gaussian
statistics) are routing side-state, not part of the architecture, and are left out.  The exported
model routes with plain softmax top-k, i.e. exactly as the SMoES gate does (with no tokens dropped).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from ds_smoes.parallel import distributed
from ds_smoes.hf.adapters import ExpertWeights
from ds_smoes.hf.block import SMoESBlock
from ds_smoes.hf.model import SMoESHFModel


def _gather_experts(block: SMoESBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """All experts of a block in logical (router) order: (gate_up [E, 2I, D], down [E, D, I]).

    The weights live in physical order (EP rank r holds physical experts [r*L, (r+1)*L)); once the
    experts were placed on their bins' ranks, logical expert e sits at physical id `gate.physical_E[e]`."""
    moe = block.moe.deepspeed_moe
    local = moe.experts.deepspeed_experts
    gate_up_local_EFD = torch.stack([e.gate_up_proj.weight.detach() for e in local])
    down_local_EDI = torch.stack([e.down_proj.weight.detach() for e in local])
    if moe.ep_size == 1:
        gate_up_PFD, down_PDI = gate_up_local_EFD, down_local_EDI
    else:
        if moe.ep_group is None or not distributed.is_distributed():
            raise RuntimeError(f"ep_size={moe.ep_size}: the experts are spread over EP ranks but the layer has no EP "
                               "group; export from inside the DeepSpeed run (every rank calls export_state_dict)")
        out = []
        for t in (gate_up_local_EFD.contiguous(), down_local_EDI.contiguous()):
            parts = [torch.empty_like(t) for _ in range(moe.ep_size)]
            dist.all_gather(parts, t, group=moe.ep_group)
            out.append(torch.cat(parts))
        gate_up_PFD, down_PDI = out
    physical_E = block.moe.gate.physical_E.to(gate_up_PFD.device)
    return gate_up_PFD.index_select(0, physical_E), down_PDI.index_select(0, physical_E)


def export_state_dict(model: SMoESHFModel) -> dict[str, torch.Tensor]:
    """The weights under the target architecture's names (collective under expert parallelism)."""
    hf = model.hf_model
    state = {k: v.detach() for k, v in hf.state_dict().items()}
    blocks = model.blocks()
    layer_prefix = _layer_prefixes(model)
    for i, block in blocks.items():
        prefix = f"{layer_prefix[i]}.mlp."
        for key in [k for k in state if k.startswith(prefix + "moe.")]:
            del state[key]
        gate_up_EFD, down_EDI = _gather_experts(block)
        router_ED = block.moe.gate.wg.weight.detach().to(gate_up_EFD.dtype)
        for name, tensor in block.adapter.hf_state(ExpertWeights(router_ED, gate_up_EFD, down_EDI, None)).items():
            state[prefix + name] = tensor.contiguous()
    return state


def _layer_prefixes(model: SMoESHFModel) -> dict[int, str]:
    layers = model.adapter.decoder_layers(model.hf_model)
    names = {id(m): n for n, m in model.hf_model.named_modules()}
    return {i: names[id(layer)] for i, layer in enumerate(layers)}


def target_config_and_class(model: SMoESHFModel):
    import transformers

    cfg = model.original_config
    if not model.upcycled:
        return cfg, type(model.hf_model)
    target = model.adapter.upcycle_target(cfg)
    blocks = model.blocks()
    s = model.smoes
    return target.config_fn(cfg, sorted(blocks), s.num_experts, s.k, s.normalize_topk), \
        getattr(transformers, target.model_class)


def export_pretrained(model: SMoESHFModel, out_dir: Path, processor=None) -> Path | None:
    """Gather (every rank) and `save_pretrained` (rank 0) into `out_dir`; returns it on rank 0, else None.

    The target model is built from its config and loaded with `strict=True`: every weight of the
    original architecture must come from the trained model, under the same name."""
    state = export_state_dict(model)
    if distributed.rank() != 0:
        return None
    config, cls = target_config_and_class(model)
    with torch.device("meta"):
        target = cls(config)
    missing, unexpected = target.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"export to {cls.__name__}: weights missing {missing[:8]}, unexpected {unexpected[:8]}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target.save_pretrained(out_dir)
    if processor is not None:
        processor.save_pretrained(out_dir)
    return out_dir
