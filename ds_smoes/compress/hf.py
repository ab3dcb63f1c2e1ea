"""In-LLM vision-token pruning for converted LLaVA-style Hugging Face models (issue 19, item 6), through hooks.

    from ds_smoes.compress.hf import install_pruning
    pruner = install_pruning(model, CompressConfig(method="fastv", keep_ratio=0.25, fastv_layer=1))
    out = model(**batch, labels=labels)      # layers >= L see fewer tokens; out.logits: [B, T', V]
    pruner.last                               # PruneRecord: scores, kept positions, tokens before / after
    pruner.remove()                           # the model is as before (or: `with install_pruning(...):`)

Methods (`CompressConfig.method`): `learnpruner` (its stage 2 only: there is no learned stage 1 for Hugging Face
models, whose vision path we do not own), `fastv` and `random`.  Before decoder layer L, each sample keeps the
`compress.budget(n)` of its n image placeholders (one contiguous span per sample) that the prompt's text rows
attend most in layer L-1 (`fastv`: its last text row; `random`: a seeded draw).  The others are REMOVED: from the
hidden states and from what layers L.. read (the attention mask, rebuilt by transformers' own mask function for
the packed rows; position ids and the rotary (cos, sin), gathered, so kept tokens keep their original positions;
the SMoES context's modality labels, validity and attention scores).  Rows are re-packed as
`ds_smoes.compress.in_llm.pack` does (the built-in model's rule: left when every row's last column holds a
token, else right).  So the attention and MoE layers from L on route fewer tokens.

Choices that are ours (docs/compression.md, "Hugging Face models"):
- The score is layer L-1's attention, from the query rows only (`core.query_attention`, O(Q x U)): the post-RoPE
  q and k the layer's attention call received, caught by the `smoes_<impl>` wrapper (`ds_smoes.hf.attention`),
  so it works with `sdpa` and flash kernels, which return no probabilities.  With `eager`, whose call is not
  wrapped, the score reads the same query rows of the probabilities the layer returned (head mean, float32).
- Query rows: valid text tokens whose label is -100 (the prompt; every valid text token without labels), so a
  training row (prompt + answer) and its prompt alone at generation keep the same tokens.
- Loss: each position's next-token label is attached to it before pruning (`labels` is taken from the call) and
  travels with the packing; the model's own `loss_function` then gets these `shift_labels`.  The logits are the
  kept positions' only: `PruneRecord.source_BT` maps each packed slot to its original position.
- Generation (`DynamicCache` only): the prefill prunes once; layers < L cache every prompt position, layers >= L
  only the kept ones (transformers' `DynamicCache` keeps one length per layer).  Decode steps get, at layers
  >= L, a mask sized against layer L's cache (`create_causal_mask(..., layer_idx=L)`) and over the kept prompt
  plus the generated tokens; positions continue from the unpruned prompt length (the cache of layer 0).

Refused, with an error that says why: QMoP / pool / LearnPruner stage 1 (they need the built-in vision path),
non-LLaVA model types (Qwen3-VL's multimodal RoPE and deepstack injection index the full sequence), several image
spans in one sample, sliding-window attention, caches other than `DynamicCache`, `inputs_embeds` without ids.

Host reads: one per prefill, at the model's entry (the image spans, query counts and kept lengths per row: shapes).
Shapes: B batch, T tokens of the forward (T' after pruning), A heads, a key heads, Q query rows, U keys, d head dim.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ds_smoes.core.errors import ConfigError
from ds_smoes.compress.query_attention import keep_top_budget, query_attention_scores
from ds_smoes.hf.adapters import ModelAdapter, model_adapter_for
from ds_smoes.hf.attention import _SINK, PREFIX, capturing_implementation
from ds_smoes.hf.context import ModalityBatch, ModalityContext
from ds_smoes.compress.config import CompressConfig
from ds_smoes.compress.in_llm import Packing, pack, query_rows

METHODS = ("learnpruner", "fastv", "random")
IGNORE = -100                              # transformers' ignore index of the labels
_CACHE_KWARGS = ("cache", "past_key_values")


def _causal_mask(*, cache, **kwargs):
    """transformers' `create_causal_mask`, with the KV cache under the keyword this transformers names it
    (`cache` from 5.24, `past_key_values` before)."""
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(**kwargs, **{_mask_cache_keyword(): cache})


@functools.cache
def _mask_cache_keyword() -> str:
    """The keyword of `create_causal_mask`'s KV cache in the installed transformers (read once)."""
    import inspect

    from transformers.masking_utils import create_causal_mask

    return next(k for k in _CACHE_KWARGS if k in inspect.signature(create_causal_mask).parameters)


@dataclass(frozen=True)
class PruneRecord:
    """What one pruning did (the last prefill's).  `score_BT`: layer L-1's attention from the query rows (None for
    `random`); `keep_BT`: kept positions of the unpruned sequence; `source_BT` / `valid_BT`: the packed slots' original
    positions and which hold a token; `tokens_before` / `tokens_after`: valid tokens entering layers < L / >= L."""
    layer: int
    score_BT: torch.Tensor | None
    keep_BT: torch.Tensor
    source_BT: torch.Tensor
    valid_BT: torch.Tensor
    tokens_before: int
    tokens_after: int

    @property
    def removed(self) -> int:
        return self.tokens_before - self.tokens_after


@dataclass
class _Prefill:
    """One pruned forward's plan (host-known shapes) and what its hooks produce layer by layer."""
    length: int                          # T, the unpruned length
    valid_BT: torch.Tensor
    vision_BT: torch.Tensor
    query_BT: torch.Tensor
    budget_B: torch.Tensor
    num_queries: int
    packed_length: int
    left: bool
    padded: bool
    tokens_before: int
    tokens_after: int
    shift_labels_BT: torch.Tensor | None
    num_items_in_batch: object = None
    score_BT: torch.Tensor | None = None
    packing: Packing | None = None
    layer_kwargs: dict = field(default_factory=dict)   # the replacements for layers >= L


@dataclass
class _Prefix:
    """After a cached prefill: what decode steps need for layers >= L."""
    length: int                          # T of the prefill (unpruned)
    valid_BT: torch.Tensor               # the kept slots' validity, [B, T']


def pruning_layer(compress: CompressConfig, n_layers: int, layer: int | None = None) -> int:
    """The decoder layer before which tokens leave: `layer` if given, else `stage2_layer` (None: n_layers // 2) for
    learnpruner and random, `fastv_layer` for fastv.  1..n_layers-1 when layer L-1's attention scores (learnpruner,
    fastv); 0..n_layers-1 for random."""
    if layer is None:
        if compress.method == "fastv":
            layer = compress.fastv_layer
        else:
            layer = n_layers // 2 if compress.stage2_layer is None else compress.stage2_layer
    low = 0 if compress.method == "random" else 1
    if not low <= layer <= n_layers - 1:
        raise ConfigError(f"pruning layer {layer} must be in {low}..{n_layers - 1} for method {compress.method!r} on "
                          f"a decoder of {n_layers} layers: layers before it score the image tokens (random: none "
                          "needed), layers from it on run on the kept ones")
    return layer


def _check(compress: CompressConfig, adapter: ModelAdapter, text_config) -> None:
    if compress.method not in METHODS:
        why = ("nothing to prune" if compress.method == "none" else
               "it compresses the vision encoder's patches before the projector, which needs the built-in model's "
               "vision path (ds_smoes.compress)")
        raise ConfigError(f"compress.method={compress.method!r} is not available for Hugging Face models ({why}); "
                          f"use one of {METHODS} (in-LLM pruning through hooks)")
    if compress.method == "learnpruner" and compress.stage1_keep_ratio is not None:
        raise ConfigError("compress.stage1_keep_ratio is set, but Hugging Face models have no LearnPruner stage 1 (a "
                          "learned scorer after the vision encoder needs the built-in vision path): only stage 2 "
                          "runs, keeping keep_ratio of the image tokens; unset stage1_keep_ratio")
    if adapter.model_type != "llava":
        raise ConfigError(f"in-LLM pruning supports LLaVA-style models (model_type 'llava'), not "
                          f"{adapter.model_type!r}: Qwen3-VL's multimodal RoPE and deepstack feature injection index "
                          "the full sequence")
    layer_types = getattr(text_config, "layer_types", None) or []
    if getattr(text_config, "sliding_window", None) is not None or any(t != "full_attention" for t in layer_types):
        raise ConfigError("in-LLM pruning needs full causal attention in every decoder layer; this text model uses "
                          "sliding windows (the score and the rebuilt mask would not match its attention)")


class HFTokenPruner:
    """The hooks of one installed pruning; `remove()` (or leaving the `with` block) restores the model."""

    def __init__(self, model: nn.Module, compress: CompressConfig, layer: int | None = None) -> None:
        from ds_smoes.hf.model import SMoESHFModel

        self.hf_model = model.hf_model if isinstance(model, SMoESHFModel) else model
        self.context: ModalityContext | None = model.context if isinstance(model, SMoESHFModel) else None
        self.adapter = model_adapter_for(self.hf_model.config)
        self.text_config = self.adapter.text_config(self.hf_model.config)
        _check(compress, self.adapter, self.text_config)
        self.compress = compress
        self.layers = self.adapter.decoder_layers(self.hf_model)
        self.layer = pruning_layer(compress, len(self.layers), layer)
        self.image_id = int(self.adapter.placeholder_ids(self.hf_model.config)[0])
        self.generator = torch.Generator().manual_seed(compress.seed)   # random, training: a fresh draw per forward
        self.last: PruneRecord | None = None
        self._prefill: _Prefill | None = None
        self._prefix: _Prefix | None = None
        self._decode_kwargs: dict | None = None
        self._decode_full_mask: torch.Tensor | None = None   # a decode step's 2D attention_mask (unpruned columns)
        self._restore_impl: str | None = None
        self._sink_owner: nn.Module | None = None
        self._previous_sink = None
        self.handles = [self.hf_model.register_forward_pre_hook(self._begin, with_kwargs=True),
                        self.hf_model.register_forward_hook(self._end, with_kwargs=True)]
        if compress.method != "random":
            self._attach_scorer(self.layers[self.layer - 1].self_attn)
        for i in range(self.layer, len(self.layers)):   # before the SMoES score tracker's hook: it reads the pruned x
            self.handles.append(self.layers[i].register_forward_pre_hook(
                self._enter_pruned if i == self.layer else self._enter_after, with_kwargs=True, prepend=True))

    # -- install / remove ---------------------------------------------------------------------------------------
    def _attach_scorer(self, attention: nn.Module) -> None:
        """Layer L-1's scores: the `smoes_<impl>` wrapper hands its post-RoPE q, k to the module's sink (chained after
        the SMoES tracker's, if any); `eager` returns its probabilities, read by a forward hook."""
        impl = self.text_config._attn_implementation or "sdpa"
        if impl != "eager" and not impl.startswith(PREFIX):
            self.text_config._attn_implementation = capturing_implementation(impl)
            self._restore_impl = impl
        self._sink_owner, self._previous_sink = attention, getattr(attention, _SINK, None)
        setattr(attention, _SINK, self._sink)
        self.handles.append(attention.register_forward_hook(self._after_scoring_attention))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self._sink_owner is not None:
            if self._previous_sink is None:
                delattr(self._sink_owner, _SINK)
            else:
                setattr(self._sink_owner, _SINK, self._previous_sink)
            self._sink_owner = None
        if self._restore_impl is not None:
            self.text_config._attn_implementation = self._restore_impl
            self._restore_impl = None
        self._prefill = self._prefix = self._decode_kwargs = None

    def __enter__(self) -> "HFTokenPruner":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- the model's entry and exit -----------------------------------------------------------------------------
    def _begin(self, module, args, kwargs):
        self._prefill, self._decode_kwargs = None, None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("vision-token pruning finds the image span from input_ids (the image placeholder id); "
                             "inputs_embeds alone is not supported")
        cache = next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
        past = int(cache.get_seq_length()) if cache is not None else 0
        if cache is not None:
            from transformers import DynamicCache
            if type(cache) is not DynamicCache:
                raise ValueError(f"vision-token pruning supports transformers' DynamicCache only (its layers keep their "
                                 f"own lengths; layers >= {self.layer} hold only the kept tokens), not "
                                 f"{type(cache).__name__}; use the default cache (no cache_implementation)")
        if past > 0:
            if self._prefix is None:
                raise RuntimeError("a cached decode step, but the prefill that filled the cache was not pruned by "
                                   "these hooks (installed in between?): run generate again from the prompt")
            self._decode_full_mask = kwargs.get("attention_mask")
            return None
        self._prefix = None
        labels = kwargs.get("labels")
        mask = kwargs.get("attention_mask")
        valid_BT = (mask.bool() if mask is not None else torch.ones_like(input_ids, dtype=torch.bool))
        vision_BT = (input_ids == self.image_id) & valid_BT
        prompt_BT = (labels == IGNORE) if labels is not None else torch.ones_like(valid_BT)
        query_BT = query_rows(valid_BT, vision_BT.long(), prompt_BT, last_only=self.compress.method == "fastv")
        self._prefill = self._plan(valid_BT, vision_BT, query_BT, labels)
        if labels is not None:   # the loss is computed at the exit, over the kept positions' (position, next label)
            self._prefill.num_items_in_batch = kwargs.get("num_items_in_batch")
            kwargs = {k: v for k, v in kwargs.items() if k != "labels"}
            return args, kwargs
        return None

    def _plan(self, valid_BT, vision_BT, query_BT, labels_BT) -> _Prefill:
        """The one host read: each row's image span (first, last, count), valid tokens, query rows, last column."""
        b, t = valid_BT.shape
        position_BT = torch.arange(t, device=valid_BT.device).expand(b, t)
        first_B = torch.where(vision_BT, position_BT, t).min(1).values
        last_B = torch.where(vision_BT, position_BT, -1).max(1).values
        rows = torch.stack([first_B, last_B, vision_BT.sum(1), valid_BT.sum(1), query_BT.sum(1)], 1).tolist()
        left = bool(valid_BT[:, -1].all())
        budgets, kept = [], []
        for row, (first, last, count, valid, _) in enumerate(rows):
            if count and last - first + 1 != count:
                raise ValueError(f"row {row} has image placeholders at {count} positions between {first} and {last}, "
                                 "not one contiguous span: pruning supports one image per sample")
            budgets.append(self.compress.budget(count) if count else 0)
            kept.append(valid - count + budgets[-1])
        shift_BT = None
        if labels_BT is not None:
            shift_BT = F.pad(labels_BT[:, 1:], (0, 1), value=IGNORE)
        return _Prefill(
            length=t, valid_BT=valid_BT, vision_BT=vision_BT, query_BT=query_BT,
            budget_B=torch.tensor(budgets, device=valid_BT.device), num_queries=max(r[4] for r in rows),
            packed_length=max(kept), left=left, padded=min(kept) < max(kept),
            tokens_before=sum(r[3] for r in rows), tokens_after=sum(kept), shift_labels_BT=shift_BT)

    def _end(self, module, args, kwargs, output):
        plan = self._prefill
        if plan is None or plan.packing is None or plan.shift_labels_BT is None:
            return None
        logits = output.logits
        if logits.shape[1] != plan.packing.source_BT.shape[1]:
            raise ValueError(f"logits for {logits.shape[1]} positions, but {plan.packing.source_BT.shape[1]} kept: "
                             "do not combine labels with logits_to_keep under pruning")
        shift_BT = plan.packing.take(plan.shift_labels_BT, fill=IGNORE)
        output["loss"] = module.loss_function(logits=logits, labels=None, vocab_size=logits.shape[-1],
                                              shift_labels=shift_BT, num_items_in_batch=plan.num_items_in_batch)
        return output

    # -- layer L-1: the scores ----------------------------------------------------------------------------------
    def _scoring(self) -> _Prefill | None:
        plan = self._prefill
        return plan if plan is not None and plan.score_BT is None and plan.packing is None else None

    def _sink(self, query_BATd, key_BaUd, mask, scaling, causal) -> None:
        if self._previous_sink is not None:
            self._previous_sink(query_BATd, key_BaUd, mask, scaling, causal)
        plan = self._scoring()
        if plan is not None and query_BATd.shape[2] == plan.length:
            plan.score_BT = self.scores_from_qk(query_BATd, key_BaUd, plan.query_BT, plan.valid_BT, plan.num_queries,
                                                scaling)

    @staticmethod
    @torch.no_grad()
    def scores_from_qk(query_BATd, key_BaUd, query_BT, valid_BT, num_queries: int, scaling) -> torch.Tensor:
        """score_BT: `core.query_attention` over the `query_BT` rows of the post-RoPE q (keys shared by A / a query
        heads are repeated), causal over the positions with key padding `valid_BT`."""
        b, a, t, d = query_BATd.shape
        position_BQ = torch.sort((~query_BT).to(torch.uint8), dim=1, stable=True).indices[:, :num_queries]
        query_valid_BQ = torch.gather(query_BT, 1, position_BQ)
        q_BAQd = torch.gather(query_BATd, 2, position_BQ[:, None, :, None].expand(b, a, num_queries, d))
        k_BAUd = key_BaUd.repeat_interleave(a // key_BaUd.shape[1], dim=1)
        return query_attention_scores(q_BAQd, k_BAUd, position_BQ, query_valid_BQ, valid_BT, scaling)

    def _after_scoring_attention(self, module, args, output):
        """eager: the probabilities the layer returned, read at the query rows."""
        plan = self._scoring()
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if plan is None or weights is None or weights.shape[2] != plan.length:
            return
        with torch.no_grad():
            probs_BTU = weights.detach().float().mean(1)
            weight_BT = plan.query_BT.float()
            plan.score_BT = (probs_BTU * weight_BT[:, :, None]).sum(1) / weight_BT.sum(1, keepdim=True).clamp_min(1.0)

    # -- layers >= L: the packed sequence -----------------------------------------------------------------------
    def _keep(self, plan: _Prefill) -> torch.Tensor:
        if self.compress.method == "random":
            score_BT = self._random_scores(plan.vision_BT)
        elif plan.score_BT is None:
            raise RuntimeError(f"no attention scores from layer {self.layer - 1}: its attention neither ran through the "
                               "smoes_ wrapper nor returned probabilities (load the model with attn_implementation "
                               "'sdpa' or 'eager')")
        else:
            score_BT = plan.score_BT
        return (plan.valid_BT & ~plan.vision_BT) | keep_top_budget(score_BT, plan.vision_BT, plan.budget_B)

    def _random_scores(self, vision_BT: torch.Tensor) -> torch.Tensor:
        """Uniform scores per image token: in training a fresh draw per forward (the pruner's generator, seeded by
        `compress.seed`); in evaluation one draw from the seed, the same for every image (reproducible, and a
        sample's tokens do not depend on its batch)."""
        b, t = vision_BT.shape
        rank_BT = (vision_BT.long().cumsum(1) - 1).clamp_min(0)          # index of each token within its span
        if self.hf_model.training:
            draw_BT = torch.rand(b, t, generator=self.generator)
        else:
            draw_BT = torch.rand(1, t, generator=torch.Generator().manual_seed(self.compress.seed)).expand(b, t)
        return torch.gather(draw_BT.to(vision_BT.device), 1, rank_BT)

    def _enter_pruned(self, module, args, kwargs):
        if self._prefill is None:
            return self._enter_decode(module, args, kwargs)
        plan = self._prefill
        x_BTD = args[0] if args else kwargs["hidden_states"]
        if x_BTD.shape[1] != plan.length:
            raise RuntimeError(f"layer {self.layer} got {x_BTD.shape[1]} tokens, the forward's input_ids had "
                               f"{plan.length}")
        if plan.packing is None:
            keep_BT = self._keep(plan)
            plan.packing = pack(keep_BT, plan.left, plan.packed_length, plan.padded)
            plan.layer_kwargs = self._packed_kwargs(plan, kwargs, x_BTD)
            self._pack_context(plan.packing)
            self.last = PruneRecord(self.layer, plan.score_BT, keep_BT, plan.packing.source_BT, plan.packing.valid_BT,
                                    plan.tokens_before, plan.tokens_after)
            if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
                self._prefix = _Prefix(plan.length, plan.packing.valid_BT)
        x_BTD = plan.packing.take(x_BTD)
        kwargs = {**kwargs, **plan.layer_kwargs}
        return ((x_BTD, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x_BTD})

    def _enter_after(self, module, args, kwargs):
        if self._prefill is None:
            return self._enter_decode(module, args, kwargs)
        return args, {**kwargs, **self._prefill.layer_kwargs}

    def _packed_kwargs(self, plan: _Prefill, kwargs: dict, x_BTD: torch.Tensor) -> dict:
        """What layers >= L read instead: the mask of the packed rows (transformers' mask function, for the model's
        attention implementation), the kept tokens' position ids and rotary (cos, sin)."""
        packing, b = plan.packing, x_BTD.shape[0]
        out = {"attention_mask": _causal_mask(
            config=self.text_config, inputs_embeds=x_BTD[:, :packing.source_BT.shape[1]],
            attention_mask=packing.valid_BT.long(), cache=None, position_ids=None)}
        if kwargs.get("position_ids") is not None:
            position_ids = kwargs["position_ids"]
            if position_ids.dim() != 2:
                raise ValueError(f"position_ids of shape {tuple(position_ids.shape)}: pruning supports [B, T] "
                                 "positions (not multimodal RoPE)")
            out["position_ids"] = packing.take(position_ids.expand(b, -1))
        if kwargs.get("position_embeddings") is not None:
            out["position_embeddings"] = tuple(packing.take(e.expand(b, *e.shape[1:]))
                                               for e in kwargs["position_embeddings"])
        if isinstance(kwargs.get("cache_position"), torch.Tensor):
            if b != 1:
                raise ValueError("a per-batch cache_position cannot follow rows packed differently; pruning with "
                                 "cache_position supports batch size 1")
            out["cache_position"] = kwargs["cache_position"][packing.source_BT[0]]
        return out

    def _pack_context(self, packing: Packing) -> None:
        """The SMoES context follows the packing: modality labels, validity and attention scores of the kept tokens."""
        ctx = self.context
        if ctx is None or ctx.batch is None:
            return
        batch = ctx.batch
        ctx.batch = ModalityBatch(packing.take(batch.labels_BT), packing.take(batch.valid_BT, fill=False),
                                  None if batch.scores_BTM is None else packing.take(batch.scores_BTM))

    def _enter_decode(self, module, args, kwargs):
        """A cached decode step: layers >= L attend over the kept prompt and the generated tokens."""
        if self._prefix is None:
            return None
        if self._decode_kwargs is None:
            x_BTD = args[0] if args else kwargs["hidden_states"]
            cache = next(kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None)
            mask_BU = self._decode_mask_2d(x_BTD, cache)
            self._decode_kwargs = {"attention_mask": _causal_mask(
                config=self.text_config, inputs_embeds=x_BTD, attention_mask=mask_BU, cache=cache, position_ids=None,
                layer_idx=self.layer)}
        return args, {**kwargs, **self._decode_kwargs}

    def _decode_mask_2d(self, x_BTD: torch.Tensor, cache) -> torch.Tensor:
        prefix, b, t = self._prefix, x_BTD.shape[0], x_BTD.shape[1]
        full_BU = self._decode_full_mask
        generated = int(cache.get_seq_length(self.layer)) - prefix.valid_BT.shape[1]   # tokens after the prompt
        if full_BU is None:
            tail_BU = torch.ones(b, generated + t, dtype=torch.long, device=x_BTD.device)
        else:
            tail_BU = full_BU[:, prefix.length:].long()
            if tail_BU.shape[1] != generated + t:
                raise RuntimeError(f"attention_mask has {full_BU.shape[1]} columns, expected the prompt's "
                                   f"{prefix.length} plus {generated + t} generated")
        return torch.cat([prefix.valid_BT.long(), tail_BU], dim=1)


def install_pruning(model: nn.Module, compress: CompressConfig, layer: int | None = None) -> HFTokenPruner:
    """Install in-LLM vision-token pruning on a converted (`SMoESHFModel`) or plain transformers LLaVA-style model;
    `layer` overrides the config's pruning layer (`pruning_layer`).  Returns the pruner: `.last`, `.remove()`."""
    return HFTokenPruner(model, compress, layer)
