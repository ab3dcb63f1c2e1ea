"""TinyMoEVLM: vision encoder -> projector -> decoder whose FFNs are SMoESMoE layers.

The image's patch embeddings are spliced into the token sequence at the `<image>` positions
(LLaVA style).  Hard modality labels are those positions; the attention score is carried
through the depth with `attention_score_mix_update` and handed to every MoE layer.

`generate` decodes through a KV cache (`ds_smoes.model.kv_cache`): one prefill of the prompts, then one token
per row and step; the cache keeps each block's keys, values and keys' scores, so a step's attention score is
the one the whole sequence's forward would give its last position.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ds_smoes.core.config import SMoESConfig
from ds_smoes.moe.layer import SMoESMoE
from ds_smoes.model.attention import SelfAttention, attention_mask, padding_before_tokens
from ds_smoes.compress.build import build_compressor
from ds_smoes.model.config import ModelConfig
from ds_smoes.model.kv_cache import KVCache, LayerCache
from ds_smoes.compress.in_llm import Packing, prune, query_rows
from ds_smoes.model.vision import PatchVisionEncoder, mlp
from ds_smoes.model.vision_checkpoint import load_encoder
from ds_smoes.core.scores import attention_score_mix_update, hard_scores


@dataclass
class VLMOutput:
    logits_BTV: torch.Tensor
    loss: torch.Tensor | None       # lm_loss + aux_loss
    lm_loss: torch.Tensor | None
    aux_loss: torch.Tensor          # sum of the MoE layers' l_aux and the pre-LLM compressor's aux loss
    # in-LLM pruning (compress learnpruner / fastv): the logits' rows are the packed kept tokens; `packing.source_BT`
    # is each row's position in the input (`packing.valid_BT` which rows are tokens).  None: the input's positions
    packing: Packing | None = None


class DecoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, smoes: SMoESConfig | None, use_moe: bool) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.attn_impl, causal=True)
        expert = mlp(cfg.d_model, cfg.ffn_mult * cfg.d_model, cfg.d_model)
        self.ffn = SMoESMoE(cfg.d_model, expert, smoes) if use_moe else expert
        self.drop = nn.Dropout(cfg.dropout)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, SMoESMoE)

    def forward(self, x_BTD, mask_B1TU, valid_BT, labels_BT, modality_BTM, cache: LayerCache | None = None,
                key_valid_BU: torch.Tensor | None = None):
        """(x after the block, l_aux, the tokens' scores after the block).  With a `cache` (generation), the
        attention reads the earlier positions from it and `key_valid_BU` says which of the U keys are tokens
        (`valid_BT`, this forward's tokens, is what the MoE layer routes)."""
        key_valid_BU = valid_BT if key_valid_BU is None else key_valid_BU
        with_cache = {} if cache is None else {"cache": cache}   # without one, the call of before the cache
        h_BTD, mixed_BTM = self.attn(self.ln1(x_BTD), mask_B1TU, key_valid_BU, modality_BTM, **with_cache)
        if modality_BTM is not None:
            modality_BTM = attention_score_mix_update(modality_BTM, mixed_BTM, h_BTD.detach().norm(dim=-1),
                                                      x_BTD.detach().norm(dim=-1))
        x_BTD = x_BTD + self.drop(h_BTD)
        if self.is_moe:
            out_BTD, l_aux, _ = self.ffn(self.ln2(x_BTD), valid_BT, modality_labels=labels_BT,
                                         modality_scores=modality_BTM)
        else:
            out_BTD, l_aux = self.ffn(self.ln2(x_BTD)), x_BTD.new_zeros(())
        return x_BTD + self.drop(out_BTD), l_aux, modality_BTM


def checkpoint_block(block: DecoderBlock, *args):
    """`block(*args)` under DeepSpeed's activation checkpointing (configured on first use when the DeepSpeed config
    did not): its activations are recomputed in the backward.  The RNG state is restored for the recomputation, so
    dropout draws the same masks; the MoE layer records its routing observations the first time only."""
    import deepspeed

    if not deepspeed.checkpointing.is_configured():
        deepspeed.checkpointing.configure(None, partition_activations=False, contiguous_checkpointing=False,
                                          checkpoint_in_cpu=False, synchronize=False, profile=False)
    return deepspeed.checkpointing.checkpoint(block, *args)


class TinyMoEVLM(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, image_token_id: int, smoes: SMoESConfig | None,
                 image_channels: int = 1, expert_seed: int = 0, ep_rank: int = 0) -> None:
        super().__init__()
        if cfg.moe_layers != "none" and smoes is None:
            raise ValueError(f"moe_layers={cfg.moe_layers!r} needs an SMoES config")
        self.cfg, self.smoes, self.image_token_id = cfg, smoes, image_token_id
        self.vision = PatchVisionEncoder(cfg.image_size, cfg.patch_size, image_channels, cfg.vision_dim,
                                         cfg.vision_layers, cfg.n_heads, cfg.attn_impl, cfg.vision_pos)
        if cfg.vision_checkpoint is not None:   # the recipe's stage 0 (ds_smoes.model.vision_checkpoint)
            load_encoder(self.vision, cfg, cfg.vision_checkpoint)
        if cfg.vision_frozen:   # no gradient, hence no optimizer state (ds_smoes.app.session.optimizer_groups)
            self.vision.requires_grad_(False)
        # pre-LLM visual token compression (cfg.compress, docs/compression.md): on the encoder's features, before the
        # projector, so the projector maps only the kept tokens; None keeps every patch
        self.compressor = build_compressor(cfg)
        self.projector = mlp(cfg.vision_dim, cfg.d_model, cfg.d_model)
        self.tok_emb = nn.Embedding(vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        self.blocks = nn.ModuleList(DecoderBlock(cfg, smoes, cfg.is_moe_block(i)) for i in range(cfg.n_layers))
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self._init_experts(expert_seed, ep_rank)
        if cfg.freeze_decoder:   # the recipe's stage I: the projector learns to speak a fixed language model
            for part in (self.tok_emb, self.pos_emb, self.blocks, self.ln_f, self.lm_head):
                part.requires_grad_(False)
        if cfg.freeze_projector:
            self.projector.requires_grad_(False)

    def _init_experts(self, seed: int, ep_rank: int) -> None:
        """DeepSpeed deep-copies one expert module; give every global expert its own init.

        Global expert g = ep_rank * local_experts + i is initialised from seed + g, so a model
        built on any expert-parallel layout starts from the same experts."""
        for layer_idx, layer in enumerate(self.moe_layers()):
            experts = layer.deepspeed_moe.experts.deepspeed_experts
            for i, expert in enumerate(experts):
                gen = torch.Generator().manual_seed(seed * 100_003 + layer_idx * 1009 + ep_rank * len(experts) + i)
                for p in expert.parameters():
                    if p.dim() > 1:
                        bound = 1.0 / p.shape[1] ** 0.5
                        p.data.copy_(torch.rand(p.shape, generator=gen) * 2 * bound - bound)
                    else:
                        p.data.zero_()

    def moe_layers(self) -> list[SMoESMoE]:
        return [b.ffn for b in self.blocks if b.is_moe]

    def embed(self, input_ids_BT, attention_mask_BT, image_BCHW, has_image_B,
              prompt_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, bool, torch.Tensor]:
        """(embeddings, whether a token follows padding: the sdpa path then needs a dense attention mask, the
        pre-LLM compressor's auxiliary loss: 0-dim, zero without one).

        With a compressor (`cfg.compress`), each image's encoder features become `compress.pre_llm_budget` tokens
        before the projector; the `<image>` placeholders (as many, made by the data layer) take them, so the kept
        tokens have consecutive positions after <bos>.  The text query QMoP's router reads is the mean embedding of
        the prompt's text tokens: valid, not `<image>`, and in `prompt_BT` (None: every valid text token)."""
        x_BTD = self.tok_emb(input_ids_BT)
        image_pos_BT = input_ids_BT == self.image_token_id
        aux = x_BTD.new_zeros(())
        if bool(has_image_B.any()):
            features_BTD = self.vision(image_BCHW[has_image_B])
            if self.compressor is not None:
                query_BD = self._text_query(x_BTD, attention_mask_BT, image_pos_BT, prompt_BT)[has_image_B]
                compressed = self.compressor(features_BTD, query_BD)
                features_BTD, aux = compressed.tokens_BQD, aux + compressed.aux_loss
            patches_BTD = self.projector(features_BTD)
            expected = int(has_image_B.sum()) * patches_BTD.shape[1]
            if int(image_pos_BT.sum()) != expected:
                raise ValueError(f"batch has {int(image_pos_BT.sum())} <image> positions but {expected} image "
                                 f"patch embeddings: each image needs exactly {patches_BTD.shape[1]} placeholders "
                                 f"(model.compress.pre_llm_budget of {self.cfg.num_patches} patches)")
            x_BTD = x_BTD.masked_scatter(image_pos_BT.unsqueeze(-1), patches_BTD.to(x_BTD.dtype))
        position_BT = (attention_mask_BT.long().cumsum(-1) - 1).clamp_min(0)
        # one host read for both: the position check needs it anyway, so the padding layout costs no sync
        longest, padded_before = torch.stack([position_BT.max(),
                                              padding_before_tokens(attention_mask_BT.bool()).long()]).tolist()
        if longest >= self.cfg.max_len:
            raise ValueError(f"sequence of {longest + 1} tokens exceeds model.max_len="
                             f"{self.cfg.max_len}; raise max_len in the config")
        return self.emb_drop(x_BTD + self.pos_emb(position_BT)), bool(padded_before), aux

    @staticmethod
    def _text_query(x_BTD, attention_mask_BT, image_pos_BT, prompt_BT) -> torch.Tensor:
        """query_BD: the mean token embedding of each row's prompt text (valid, not <image>, in `prompt_BT`)."""
        text_BT = attention_mask_BT.bool() & ~image_pos_BT
        if prompt_BT is not None:
            text_BT = text_BT & prompt_BT.bool()
        weights_BT = text_BT.to(x_BTD.dtype)
        return (weights_BT.unsqueeze(-1) * x_BTD).sum(1) / weights_BT.sum(1, keepdim=True).clamp_min(1)

    def tracks_attention_score(self) -> bool:
        """Whether the forward carries the attention score through the depth: score_type attention, MoE blocks, and
        losses to compute (the score feeds the gate's losses, not its routing: an inference forward skips it)."""
        if self.smoes is None or self.smoes.effective_score_type != "attention":
            return False
        return any(layer.computes_losses() for layer in self.moe_layers())

    def forward(self, input_ids_BT, attention_mask_BT, modality_BT, image_BCHW, has_image_B,
                labels_BT: torch.Tensor | None = None, cache: KVCache | None = None,
                prompt_BT: torch.Tensor | None = None) -> VLMOutput:
        """The whole sequence.  With an empty `cache` (generation's prefill) every block also writes its keys,
        values and keys' scores there, and the cache takes each row's next position id; `decode_step` goes on.

        In-LLM pruning (`cfg.compress.in_llm_layer`, `ds_smoes.compress.in_llm`): before that block the
        unkept vision tokens leave the sequence; the logits then cover the packed kept tokens (`packing`), the
        loss pairs each kept position with its own next token's label, and the cache of the later blocks holds
        the kept positions only.  `prompt_BT`: the positions that belong to the prompt, whose text tokens are the
        pruning's queries (default: those without a label; all of them without `labels_BT`)."""
        valid_BT = attention_mask_BT.bool()
        if prompt_BT is None and labels_BT is not None:
            prompt_BT = labels_BT == -100
        x_BTD, padded_before, aux = self.embed(input_ids_BT, valid_BT, image_BCHW, has_image_B, prompt_BT)
        # eager: the dense mask always (its softmax reads it).  sdpa: none unless a token follows padding (left
        # padding, as `generate`'s prompts): is_causal is then exact for every valid query (SelfAttention's doc)
        dense = self.cfg.attn_impl == "eager" or padded_before
        mask_B1TT = attention_mask(valid_BT, causal=True) if dense else None
        labels_mod_BT = modality_BT.long() * valid_BT
        modality_BTM = hard_scores(labels_mod_BT) if self.tracks_attention_score() else None  # layer 0: one-hot
        layers: list[LayerCache | None] = [None] * len(self.blocks)
        if cache is not None:
            if cache.length:
                raise ValueError(f"forward with a KV cache is the prefill: the cache holds {cache.length} positions "
                                 "already (feed further tokens with decode_step)")
            cache.extend(valid_BT)
            cache.position_B = valid_BT.long().sum(-1)
            layers = cache.layers
        prune_at = self.cfg.compress.in_llm_layer(len(self.blocks))
        # with pruning, each position's next-token label travels with it through the re-packing
        targets_BT = None if labels_BT is None or prune_at is None else F.pad(labels_BT[:, 1:], (0, 1), value=-100)
        packing = scored_BTD = None
        checkpointed = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, (block, layer) in enumerate(zip(self.blocks, layers)):
            if i == prune_at:
                if prompt_BT is None:                 # no labels: the whole sequence is the prompt
                    prompt_BT = torch.ones_like(valid_BT)
                packing = self._prune(self.blocks[i - 1], scored_BTD, valid_BT, labels_mod_BT, prompt_BT)
                x_BTD, valid_BT, labels_mod_BT = packing.take(x_BTD), packing.valid_BT, packing.take(labels_mod_BT)
                modality_BTM = packing.take(modality_BTM) if modality_BTM is not None else None
                targets_BT = packing.take(targets_BT, -100) if targets_BT is not None else None
                dense = self.cfg.attn_impl == "eager" or packing.padded_before
                mask_B1TT = attention_mask(valid_BT, causal=True) if dense else None
                if cache is not None:
                    cache.prune(i, valid_BT, packing.padded)
            scored_BTD = x_BTD        # block i's input: the pruning before block i + 1 reads block i's attention
            if checkpointed and layer is None:
                x_BTD, l_aux, modality_BTM = checkpoint_block(block, x_BTD, mask_B1TT, valid_BT, labels_mod_BT,
                                                              modality_BTM)
            else:
                x_BTD, l_aux, modality_BTM = block(x_BTD, mask_B1TT, valid_BT, labels_mod_BT, modality_BTM, layer)
            aux = aux + l_aux
        logits_BTV = self.lm_head(self.ln_f(x_BTD))
        lm_loss = loss = None
        if targets_BT is not None:
            lm_loss = F.cross_entropy(logits_BTV.float().reshape(-1, logits_BTV.shape[-1]), targets_BT.reshape(-1),
                                      ignore_index=-100)
            loss = lm_loss + aux
        elif labels_BT is not None:
            lm_loss = F.cross_entropy(logits_BTV[:, :-1].float().reshape(-1, logits_BTV.shape[-1]),
                                      labels_BT[:, 1:].reshape(-1), ignore_index=-100)
            loss = lm_loss + aux
        return VLMOutput(logits_BTV, loss, lm_loss, aux, packing)

    @torch.no_grad()
    def _prune(self, scorer: DecoderBlock, scored_BTD, valid_BT, labels_mod_BT, prompt_BT) -> Packing:
        """Which tokens go on past the pruning point: the budget of vision tokens per image that the prompt's text
        (its last token for fastv) attends most in `scorer`, the block before it, whose input was `scored_BTD`."""
        compress = self.cfg.compress
        query_BT = query_rows(valid_BT, labels_mod_BT, prompt_BT, last_only=compress.method == "fastv")
        return prune(scorer.attn, scorer.ln1(scored_BTD), valid_BT, labels_mod_BT == 1, query_BT,
                     compress.budget(self.cfg.num_patches))

    def decode_step(self, token_B: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """logits_BV of the next token after feeding one generated (text) token per row, through the cache.

        The token is valid, a text token (label 0, layer-0 score one-hot text) at its row's next position; its
        attention reads the cached keys, values and keys' scores of every block; the MoE layers route the B new
        tokens only.  No host read here (the MoE dispatch may make its own)."""
        token_B1 = token_B.unsqueeze(1)
        valid_B1 = torch.ones_like(token_B1, dtype=torch.bool)
        x_B1D = self.emb_drop(self.tok_emb(token_B1) + self.pos_emb(cache.position_B.unsqueeze(1)))
        cache.extend(valid_B1)
        labels_B1 = torch.zeros_like(token_B1)
        modality_B1M = hard_scores(labels_B1) if self.tracks_attention_score() else None
        masks = {}     # per set of cached key positions (all of them; the kept ones after in-LLM pruning)
        for i, (block, layer) in enumerate(zip(self.blocks, cache.layers)):
            key_valid_BU, padded = cache.keys_of(i)
            pruned = cache.pruned is not None and i >= cache.pruned_from
            if pruned not in masks:
                # the new token sees every valid key: the fused kernel takes no mask unless some key is padding
                dense = self.cfg.attn_impl == "eager" or padded
                masks[pruned] = attention_mask(key_valid_BU, causal=True, num_queries=1) if dense else None
            x_B1D, _, modality_B1M = block(x_B1D, masks[pruned], valid_B1, labels_B1, modality_B1M, layer,
                                           key_valid_BU)
        cache.position_B = cache.position_B + 1
        return self.lm_head(self.ln_f(x_B1D))[:, -1]

    def _greedy(self, logits_BV: torch.Tensor) -> torch.Tensor:
        """The next token: the <image> token is never generated (fed back, it would count as an image placeholder;
        an untrained model would otherwise fail)."""
        logits_BV = logits_BV.clone()
        logits_BV[:, self.image_token_id] = float("-inf")
        return logits_BV.argmax(-1)

    @torch.no_grad()
    def generate(self, input_ids_BT, attention_mask_BT, modality_BT, image_BCHW, has_image_B,
                 max_new_tokens: int, eos_id: int, use_cache: bool = True) -> list[list[int]]:
        """Greedy decoding from left-padded prompts; tokens from <eos> on are dropped.

        Always runs exactly `max_new_tokens` forward passes, so every expert-parallel rank takes part in the same
        number of MoE all-to-alls whatever its prompts and wherever its rows stop.  `use_cache` (default): one
        prefill of the prompts, then `max_new_tokens - 1` decode steps of one token per row through a KV cache
        (`ds_smoes.model.kv_cache`); False: every step re-runs the whole sequence (the reference the cache is
        tested against: the same greedy tokens)."""
        valid_BT = attention_mask_BT.bool()
        b, t = valid_BT.shape
        if max_new_tokens < 1:
            return [[] for _ in range(b)]
        if not use_cache:
            return self._generate_uncached(input_ids_BT, valid_BT, modality_BT, image_BCHW, has_image_B,
                                           max_new_tokens, eos_id)
        # one host read: the longest prompt (the last fed token must have a position embedding) and whether any
        # prompt position is padding (decode steps then need a key mask)
        longest, padded = torch.stack([valid_BT.long().sum(-1).max(), (~valid_BT).any().long()]).tolist()
        if longest + max_new_tokens - 1 > self.cfg.max_len:
            raise ValueError(f"sequence of {longest + max_new_tokens - 1} tokens exceeds model.max_len="
                             f"{self.cfg.max_len}; raise max_len in the config")
        cache = KVCache.empty(len(self.blocks), t + max_new_tokens - 1)   # the last new token is never fed
        cache.padded = bool(padded)
        logits_BV = self.forward(input_ids_BT, valid_BT, modality_BT, image_BCHW, has_image_B,
                                 cache=cache).logits_BTV[:, -1]
        new_BT = [self._greedy(logits_BV)]
        for _ in range(max_new_tokens - 1):
            new_BT.append(self._greedy(self.decode_step(new_BT[-1], cache)))
        return _until_eos(new_BT, eos_id)

    def _generate_uncached(self, ids, mask, mod, image_BCHW, has_image_B, max_new_tokens: int,
                           eos_id: int) -> list[list[int]]:
        new_BT = []
        prompt_BT = torch.ones_like(mask)     # the pruning's queries stay the prompt's tokens, as at a prefill
        for _ in range(max_new_tokens):
            nxt_B = self._greedy(self.forward(ids, mask, mod, image_BCHW, has_image_B,
                                              prompt_BT=prompt_BT).logits_BTV[:, -1])
            new_BT.append(nxt_B)
            ids = torch.cat([ids, nxt_B.unsqueeze(1)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            mod = torch.cat([mod, torch.zeros_like(mod[:, :1])], 1)
            prompt_BT = torch.cat([prompt_BT, torch.zeros_like(prompt_BT[:, :1])], 1)
        return _until_eos(new_BT, eos_id)


def _until_eos(new_BT: list[torch.Tensor], eos_id: int) -> list[list[int]]:
    """Each row's generated tokens before its first <eos> (one host read)."""
    return [row[:row.index(eos_id)] if eos_id in row else row for row in torch.stack(new_BT, 1).tolist()]


def model_inputs(batch) -> tuple:
    """The positional inputs of `TinyMoEVLM.forward` and `.generate` from a `ds_smoes.data.VLMBatch`."""
    return (batch.input_ids_BT, batch.attention_mask_BT, batch.modality_BT, batch.image_BCHW, batch.has_image_B)
