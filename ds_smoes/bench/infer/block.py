"""One decoder block at a published shape, served five ways, for `python -m ds_smoes.bench infer --shapes`.

`build_block_model` makes a LLaVA whose language decoder has `num_layers` decoder layers of the shape's text
architecture (`ds_smoes.bench.infer.shapes`; a tiny vision tower that the benchmark never calls: its image
tokens are placeholders, as after the projector), converted to ds-smoes (`ds_smoes.hf.convert_to_smoes`) on
`ep_size` EP ranks.  The variants of one block share its weights (`BlockVariants`):

    dense        the MoE layer replaced by one SwiGLU MLP of the same active parameters ((k + shared) * I)
    topk         top-k routes of a balanced router without modality preference, DeepSpeed's stock dispatch
    hard         hard modality routing (every route in the token's modality's experts), rank_once
    smoes        SMoES, rank_once
    smoes-bin1   SMoES trained with one bin per token (its k experts on one rank), rank_once

The routed variants route with the SMoES gate (its probabilities, combine weights and statistics) whose
experts are handed in per forward (`GivenRoutesGate`), drawn from a router's statistics
(`ds_smoes.bench.scale.synthetic_routes`): k distinct uniform experts (topk: what a load-balanced top-k
router does when it ignores the modality), the trained SMoES router's own-route histogram (smoes), the hard
rule (hard), one bin per token (smoes-bin1).  Not DeepSpeed's TopKGate on the block's random router: with
untrained weights every token's router input shares one large component (the attention's mean value), and
that router sends most tokens to the same experts (a stock capacity of 5x the mean load here), which no
trained, load-balanced router does; `bench scale` times DeepSpeed's own gate.  In evaluation no variant
computes the attention modality score: it feeds the gates' training losses only.

Workloads: `prefill_inputs` (image placeholders then text, batch B per rank: attention data-parallel, the
MoE expert-parallel) and `decode_cache` (a KV cache of L positions, filled directly: decoding cost depends
on its length, not on its content).

Shapes: B sequences, T positions, L cached positions, S = B * T tokens, K routes per token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ds_smoes.bench.infer.shapes import BlockShape
from ds_smoes.bench.scale.synthetic_routes import (OwnRouteModel, draw_one_bin_routes, draw_profile_routes,
                                                   draw_uniform_routes, hard_routing_model)
from ds_smoes.bench.scale.worker import GivenRoutesGate, companion_gate, install_gate

IMAGE_ID = 120            # the image placeholder id of the block's vocabulary
VOCAB = 128
TEXT_IDS = (5, 100)       # text tokens are drawn from this id range
TEXT_TOKENS = 64          # text positions after the image in a prefill
VARIANTS = ("dense", "topk", "hard", "smoes", "smoes-bin1")
REFERENCE = "topk"
ROUTED = ("topk", "hard", "smoes", "smoes-bin1")
DISPATCH = {"topk": "deepspeed", "hard": "rank_once", "smoes": "rank_once", "smoes-bin1": "rank_once"}
VARIANT_LABELS = {"dense": "dense block (same active parameters)",
                  "topk": "top-k (balanced, no modality preference), DeepSpeed's stock dispatch",
                  "hard": "hard modality routing, rank_once", "smoes": "SMoES, rank_once",
                  "smoes-bin1": "SMoES, one bin per token, rank_once"}
_TINY_VISION = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                    num_attention_heads=2, image_size=16, patch_size=4, num_channels=3)


def hf_config(shape: BlockShape, num_layers: int = 1):
    from transformers import LlavaConfig

    return LlavaConfig(text_config=shape.text_config(num_layers, VOCAB), vision_config=_TINY_VISION,
                       image_token_id=IMAGE_ID, vision_feature_layer=-1, vision_feature_select_strategy="default",
                       tie_word_embeddings=False)


def build_block_model(shape: BlockShape, ep_size: int, ep_rank: int, dtype: torch.dtype, seed: int = 0,
                      num_layers: int = 1, device: torch.device | str = "cpu"):
    """The converted model (`ds_smoes.hf.SMoESHFModel`) of `num_layers` decoder layers at `shape`, in eval mode on
    `device` (the collectives' device: a GPU under NCCL): weights drawn by transformers' own init from `seed` (the
    same on every rank: replicated weights agree and each EP rank keeps its slice of the experts)."""
    from transformers import AutoModelForImageTextToText

    from ds_smoes.core.config import SMoESConfig
    from ds_smoes.hf import convert_to_smoes

    torch.manual_seed(seed)
    hf = AutoModelForImageTextToText.from_config(hf_config(shape, num_layers))
    smoes = SMoESConfig(ep_size=ep_size, num_bins=ep_size, gate="smoes", dispatch="rank_once",
                        score_type="attention", binning="adaptive")
    model = convert_to_smoes(hf, smoes, ep_rank)
    if ep_size > 1:
        for moe in model.moe_layers():
            moe.set_deepspeed_parallelism()
    return model.to(device=device, dtype=dtype).eval()


@dataclass
class Routes:
    """Per routed variant other than top-k, how its routes are drawn from a token's modality label.  `bins`: the
    groups of experts the modalities own (the EP ranks; at least 2, so that one rank still splits its experts)."""
    smoes: OwnRouteModel
    k: int
    num_experts: int
    bins: int

    def draw(self, variant: str, labels_S: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        bins = max(self.bins, 2)
        if variant == "topk":
            return draw_uniform_routes(labels_S.shape[0], self.k, self.num_experts, generator)
        if variant == "smoes":
            return draw_profile_routes(self.smoes, labels_S, self.k, self.num_experts, bins, generator)
        if variant == "hard":
            return draw_profile_routes(hard_routing_model(self.smoes.vision_share, self.k), labels_S, self.k,
                                       self.num_experts, bins, generator)
        if variant == "smoes-bin1":
            return draw_one_bin_routes(self.smoes, labels_S, self.k, self.num_experts, bins, generator)
        raise ValueError(f"{variant} has no routes")


class BlockVariants:
    """The variants of one converted block model, installed one at a time on its (first) MoE decoder layer."""

    def __init__(self, model, shape: BlockShape, seed: int = 0) -> None:
        from ds_smoes.hf.experts import GatedExpert

        self.model = model
        self.layer = model.adapter.decoder_layers(model.hf_model)[0]
        self.block = self.layer.mlp                         # the SMoESBlock (router, experts, shared experts)
        self.moe = self.block.moe
        self.own_gate = self.moe.gate
        self.given_gate = companion_gate(self.moe, "smoes", GivenRoutesGate)
        m = shape.moe
        weight = self.own_gate.wg.weight
        generator = torch.Generator().manual_seed(seed + 17)
        self.dense = GatedExpert(m.hidden, (m.k + m.shared_experts) * m.expert_ffn, F.silu)
        with torch.no_grad():
            for p in self.dense.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5)
        self.dense.to(weight).eval()   # the block's device and dtype

    def install(self, variant: str) -> None:
        if variant == "dense":
            self.layer.mlp = self.dense
            return
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}: one of {VARIANTS}")
        self.layer.mlp = self.block
        install_gate(self.moe, self.given_gate, DISPATCH[variant])

    def give(self, indices_SK: torch.Tensor | None) -> None:
        """The experts of the next forward's tokens."""
        self.given_gate.given_SK = indices_SK

    def moe_layers(self) -> list:
        return [self.moe]


def prefill_inputs(batch: int, image_tokens: int, generator: torch.Generator,
                   text_tokens: int = TEXT_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids_BT, labels_S): per sequence `image_tokens` placeholders then `text_tokens` text ids."""
    text_BT = torch.randint(*TEXT_IDS, (batch, text_tokens), generator=generator)
    ids_BT = torch.cat([torch.full((batch, image_tokens), IMAGE_ID), text_BT], dim=1)
    return ids_BT, (ids_BT == IMAGE_ID).long().reshape(-1)


class ImageFeatures:
    """What a vision tower and projector would hand the decoder: each image placeholder's embedding replaced by its
    own feature vector (a forward pre-hook on the language model, where LLaVA passes `inputs_embeds`).  Without
    it every placeholder has the same embedding, and a router sends all image tokens to the same experts.
    `features_BTD` (drawn at the scale of the token embeddings) is set per forward; None leaves the input."""

    def __init__(self, model) -> None:
        self.features_BTD: torch.Tensor | None = None
        self.mask_BT1: torch.Tensor | None = None
        language_model = model.hf_model.model.language_model
        self._hook = language_model.register_forward_pre_hook(self._replace, with_kwargs=True)

    def set(self, ids_BT: torch.Tensor | None, features_BTD: torch.Tensor | None) -> None:
        self.mask_BT1 = None if ids_BT is None else (ids_BT == IMAGE_ID).unsqueeze(-1)
        self.features_BTD = features_BTD

    def _replace(self, module, args, kwargs):
        embeds_BTD = kwargs.get("inputs_embeds")
        if self.features_BTD is None or embeds_BTD is None or embeds_BTD.shape != self.features_BTD.shape:
            return None
        kwargs["inputs_embeds"] = torch.where(self.mask_BT1, self.features_BTD, embeds_BTD)
        return args, kwargs

    @staticmethod
    def draw(model, ids_BT: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """features_BTD: N(0, std of the token embeddings), one vector per position."""
        weight = model.hf_model.get_input_embeddings().weight
        features = torch.randn(*ids_BT.shape, weight.shape[1], generator=generator) * float(weight.float().std())
        return features.to(weight)   # the embeddings' device and dtype


def decode_cache_kv(shape: BlockShape, batch: int, length: int, dtype: torch.dtype,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [B, kv heads, L, head dim] of a filled cache (drawn at the scale of normalised
    activations); `fresh_cache` makes a cache of them for each measurement."""
    size = (batch, shape.kv_heads, length, shape.head_dim)
    return torch.randn(size, generator=generator).to(dtype), torch.randn(size, generator=generator).to(dtype)


def fresh_cache(kv: tuple[torch.Tensor, torch.Tensor]):
    """A transformers DynamicCache holding `kv` in its first layer (decoding appends to its own copies: `kv` is
    left as it is for the next measurement)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.update(kv[0], kv[1], 0)
    return cache


def decode_inputs(batch: int, steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Per decoding step, input_ids_B1 of text tokens (their labels are 0)."""
    return [torch.randint(*TEXT_IDS, (batch, 1), generator=generator) for _ in range(steps)]
