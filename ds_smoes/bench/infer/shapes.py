"""Decoder-block shapes of published MoE-VLMs, for `python -m ds_smoes.bench infer --shapes` (docs/bench.md).

A block is one decoder layer of the model's language decoder: RMSNorm, self-attention with its KV cache
(rotary positions, the model's query and key/value heads), RMSNorm, the MoE layer (routed experts, plus the
shared experts where the model has them).  It is built as a Hugging Face transformers decoder layer of the
text architecture named here and converted to ds-smoes like any `--hf-model` (`ds_smoes.hf.convert_to_smoes`),
so its attention and cache are transformers' own.

Figures from each model's released config (Hugging Face `config.json`); the MoE figures are the ones
`bench scale` uses (`ds_smoes.bench.scale.shapes`).  Where the architecture differs from the transformers
class used, `stand_in` says how.
"""
from __future__ import annotations

from dataclasses import dataclass

from ds_smoes.bench.scale.shapes import SHAPES, MoEShape


@dataclass(frozen=True)
class BlockShape:
    moe: MoEShape
    hf_text: str          # the transformers text model_type whose decoder layer is built
    layers: int           # decoder layers of the whole model
    moe_layers: int       # of which MoE (the others have a dense MLP of dense_ffn)
    heads: int            # query heads
    kv_heads: int         # key / value heads (grouped-query attention when fewer)
    head_dim: int
    dense_ffn: int        # the dense layers' MLP intermediate size (0: none)
    stand_in: str = ""

    @property
    def key(self) -> str:
        return self.moe.key

    @property
    def label(self) -> str:
        return self.moe.label

    def text_config(self, num_layers: int = 1, vocab_size: int = 128) -> dict:
        """A transformers text config of `num_layers` MoE decoder layers at this shape (rotary positions)."""
        m = self.moe
        out = dict(model_type=self.hf_text, vocab_size=vocab_size, hidden_size=m.hidden, num_hidden_layers=num_layers,
                   num_attention_heads=self.heads, num_key_value_heads=self.kv_heads, head_dim=self.head_dim,
                   max_position_embeddings=16384, tie_word_embeddings=False, pad_token_id=0, bos_token_id=None,
                   eos_token_id=None, num_experts=m.num_experts, num_experts_per_tok=m.k,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        if self.hf_text == "olmoe":
            out.update(intermediate_size=m.expert_ffn, norm_topk_prob=False)
        elif self.hf_text == "qwen3_moe":
            out.update(moe_intermediate_size=m.expert_ffn, intermediate_size=self.dense_ffn or m.expert_ffn,
                       norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
        elif self.hf_text == "qwen2_moe":
            out.update(moe_intermediate_size=m.expert_ffn, intermediate_size=self.dense_ffn or m.expert_ffn,
                       shared_expert_intermediate_size=m.shared_experts * m.expert_ffn, norm_topk_prob=False,
                       decoder_sparse_step=1, mlp_only_layers=[])
        else:
            raise ValueError(f"no text config for {self.hf_text!r}")
        return out

    def active_params(self) -> dict[str, int]:
        """Per MoE decoder layer: attention, and the MoE's active (k routed + shared) expert parameters."""
        m = self.moe
        attention = m.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return {"attention": attention, "moe_active": (m.k + m.shared_experts) * m.expert_params(),
                "moe_total": (m.num_experts + m.shared_experts) * m.expert_params()}


BLOCK_SHAPES: dict[str, BlockShape] = {s.key: s for s in (
    BlockShape(SHAPES["olmoe"], "olmoe", 16, 16, 16, 16, 128, 0),
    BlockShape(SHAPES["qwen3-vl"], "qwen3_moe", 48, 48, 32, 4, 128, 0,
               "the text decoder: Qwen3-VL-MoE's decoder layer is Qwen3-MoE's with interleaved multimodal rotary "
               "positions (MRoPE), here plain rotary positions (same cost)"),
    BlockShape(SHAPES["deepseek-vl2-tiny"], "qwen2_moe", 12, 11, 10, 10, 128, 6848,
               "DeepSeek-VL2-Tiny's decoder (DeepSeekMoE, multi-head attention, no MLA) as Qwen2-MoE's layer at its "
               "shape: the 2 shared experts as one shared MLP of 2 x 896 (Qwen2-MoE adds a sigmoid gate to it: one "
               "1280 -> 1 projection); the first layer is dense (MLP 6848)"),
    BlockShape(SHAPES["toy"], "qwen2_moe", 2, 2, 4, 2, 16, 0, "not a model: the tests' seconds-long shape"),
)}
