"""SMoESHFModel: a converted Hugging Face VLM, called like the original, returning the SMoES losses.

    out = model(input_ids=..., attention_mask=..., pixel_values=..., labels=...)   # the HF model's inputs
    out.loss = out.lm_loss + out.aux_loss        # aux_loss: sum of the MoE layers' l_aux (alpha_bal, alpha_mi)
    model.moe_layers()                            # the MoE layers (SMoESMoE, or adopted AutoEP layers)
    model.hf_model                                # the (modified in place) transformers model

A forward pre-hook on the transformers model fills the `ModalityContext` from `input_ids` (image /
video placeholder ids) and `attention_mask`, so `hf_model.generate(...)` works too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ds_smoes.core.config import SMoESConfig
from ds_smoes.hf.adapters.base import ModelAdapter
from ds_smoes.hf.block import SMoESBlock
from ds_smoes.hf.context import ModalityContext
from ds_smoes.moe.autoep import SMoESAutoEPLayer
from ds_smoes.moe.layer import SMoESMoE


@dataclass
class SMoESOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None          # lm_loss + aux_loss (None without labels)
    lm_loss: torch.Tensor | None
    aux_loss: torch.Tensor
    hf_output: Any                     # what the transformers model returned


# the KV cache's keyword: transformers >= 5.24 passes `cache`, earlier 5.x `past_key_values`
_CACHE_KWARGS = ("cache", "past_key_values")


class SMoESHFModel(nn.Module):
    def __init__(self, hf_model: nn.Module, adapter: ModelAdapter, smoes: SMoESConfig, context: ModalityContext,
                 original_config, upcycled: bool, backend: str = "ds_smoes") -> None:
        super().__init__()
        self.backend = backend   # ds_smoes: its MoE layers (converted or upcycled blocks); autoep: AutoEP layers
        self.hf_model = hf_model
        self.adapter, self.smoes, self.context = adapter, smoes, context
        self.original_config = original_config     # the config before conversion (export writes it back)
        self.upcycled = upcycled                   # experts were copied from dense MLPs
        self.trackers: list = []
        self._hook = hf_model.register_forward_pre_hook(self._begin_forward, with_kwargs=True)

    def _begin_forward(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("the SMoES model needs input_ids (the image/video placeholder ids give the modality "
                             "labels); inputs_embeds alone is not supported")
        cached = any(hasattr(past, "get_seq_length") and int(past.get_seq_length()) > 0
                     for past in (kwargs.get(name) for name in _CACHE_KWARGS))
        # the attention score feeds the gates' losses only: an inference forward does not carry it
        track = self.context.track_scores and any(layer.computes_losses() for layer in self.moe_layers())
        self.context.begin(input_ids, kwargs.get("attention_mask"), cached, track)

    def forward(self, **inputs) -> SMoESOutput:
        out = self.hf_model(**inputs)
        aux = self.context.take_aux(out.logits)
        lm_loss = getattr(out, "loss", None)
        return SMoESOutput(out.logits, None if lm_loss is None else lm_loss + aux, lm_loss, aux, out)

    def blocks(self) -> dict[int, SMoESBlock]:
        return {i: layer.mlp for i, layer in enumerate(self.adapter.decoder_layers(self.hf_model))
                if isinstance(layer.mlp, SMoESBlock)}

    def moe_layers(self) -> list[SMoESMoE | SMoESAutoEPLayer]:
        """The MoE layers: the converted blocks' `SMoESMoE`, or the adopted AutoEP layers (hf.backend)."""
        if self.backend == "autoep":
            return [layer.mlp for layer in self.adapter.decoder_layers(self.hf_model)
                    if isinstance(layer.mlp, SMoESAutoEPLayer)]
        return [block.moe for block in self.blocks().values()]

    def generate(self, *args, **kwargs):
        return self.hf_model.generate(*args, **kwargs)
