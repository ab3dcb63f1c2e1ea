"""DeepSpeed's AutoEP layer in `python -m ds_smoes.bench scale --autoep` (one EP rank's part; docs/bench.md).

At a shape, a Hugging Face Qwen3-MoE sparse block (router, SwiGLU experts) is built and turned into two AutoEP
layers as `deepspeed.initialize` does (AutoEP's own parser and `AutoEPMoELayer`, this rank's experts, the same
weights as the legacy layer's where they overlap: the router and this rank's experts are copied from it):

    autoep/stock               AutoEP as DeepSpeed ships it: its router (TokenChoiceTopKRouter, the shape's random
                               router: near-uniform routes) and its dispatch (one row per (token, expert) pair)
    autoep-profile/stock       the ds-smoes layer on AutoEP (`ds_smoes.moe.autoep`), SMoES-profile routes drawn as
                               for the legacy variants, AutoEP's pair dispatch
    autoep-profile/rank_once   the same routes, the once-per-rank dispatch
    autoep-smoes/rank_once     the SMoES gate's own routing (scores, bins, MI and balance losses), once per rank

Remote bytes: the ds-smoes variants report what their dispatch sent (`MoECall.remote_bytes`); for AutoEP's own layer
they are counted from its router's routes: one row per (token, expert on another rank) sent and one returned.

Shapes: S tokens on this rank, B sequences, T positions, D hidden, K routes, E experts.
"""
from __future__ import annotations

import torch
from torch import nn

from ds_smoes.bench.scale.shapes import MoEShape
from ds_smoes.core.config import SMoESConfig
from ds_smoes.moe.autoep import AUTOEP_DISPATCHERS, SMoESAutoEPLayer
from ds_smoes.moe.collector import RoutingCollector

VARIANTS = ("autoep/stock", "autoep-profile/stock", "autoep-profile/rank_once", "autoep-smoes/rank_once")
# a variant's dispatch part -> the config's dispatch name on AutoEP (`ds_smoes.moe.autoep.AUTOEP_DISPATCHERS`)
VARIANT_DISPATCH = {"stock": "deepspeed", "rank_once": "rank_once"}


class GivenBatch:
    """The modality context of the bench's batches (labels, no padding, the drawn soft scores) for the adopted
    layer: what the Hugging Face model's `ModalityContext` gives it in training."""

    def __init__(self) -> None:
        self.batch = None
        self.aux_losses: list = []

    def set(self, labels_BT: torch.Tensor, scores_BTM: torch.Tensor) -> None:
        from ds_smoes.hf.context import ModalityBatch

        self.batch = ModalityBatch(labels_BT, torch.ones_like(labels_BT, dtype=torch.bool), scores_BTM)
        self.aux_losses = []

    def require(self, leading_shape):
        return self.batch


def _autoep_layers(shape: MoEShape, ep_size: int, ep_rank: int, router_ED: torch.Tensor,
                   local_gate_up_nFD: torch.Tensor, local_down_nDI: torch.Tensor):
    """Two AutoEP layers (one to stay stock, one to adopt) from a Qwen3-MoE block at `shape` whose router and this
    rank's experts are the given weights."""
    import transformers
    from deepspeed.module_inject.auto_ep import AutoEP
    from deepspeed.module_inject.auto_ep_config import parse_autoep_config
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    cfg = transformers.Qwen3MoeConfig(vocab_size=8, hidden_size=shape.hidden, intermediate_size=8,
                                      moe_intermediate_size=shape.expert_ffn, num_hidden_layers=1,
                                      num_attention_heads=1, num_key_value_heads=1, head_dim=8,
                                      num_experts=shape.num_experts, num_experts_per_tok=shape.k,
                                      norm_topk_prob=True)
    block = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(cfg)
    n = shape.num_experts // ep_size
    with torch.no_grad():
        block.gate.weight.copy_(router_ED)
        rows = slice(ep_rank * n, ep_rank * n + n)
        block.experts.gate_up_proj[rows].copy_(local_gate_up_nFD)
        block.experts.down_proj[rows].copy_(local_down_nDI)

    class Holder(nn.Module):   # the module path and config AutoEP's qwen3_moe preset looks for
        def __init__(self) -> None:
            super().__init__()
            self.config = cfg
            self.model = nn.Module()
            self.model.layers = nn.ModuleList([nn.Module()])
            self.model.layers[0].mlp = block

    holder = Holder()
    config = parse_autoep_config({"enabled": True, "autoep_size": ep_size, "preset_model": "qwen3_moe"})
    [spec] = AutoEP(holder, config).ep_parser()
    layers = [AutoEPMoELayer(spec, block, ep_size, ep_rank, config) for _ in range(2)]
    for layer in layers:
        layer.set_deepspeed_parallelism()
    return layers


class AutoEPBench:
    """The AutoEP variants of one (shape, dtype): their layers, and one fwd+bwd of a variant."""

    def __init__(self, legacy_layer, shape: MoEShape, ep_size: int, ep_rank: int, dtype: torch.dtype,
                 given_gate_cls) -> None:
        experts = legacy_layer.deepspeed_moe.experts.deepspeed_experts
        gate_up = torch.stack([e.gate_up_proj.weight.detach().float() for e in experts])   # [n, 2I, D]
        down = torch.stack([e.down_proj.weight.detach().float() for e in experts])          # [n, D, I]
        self.stock, adopted = _autoep_layers(shape, ep_size, ep_rank, legacy_layer.gate.wg.weight.detach().float(),
                                             gate_up, down)
        self.context = GivenBatch()
        smoes = SMoESConfig(num_bins=ep_size, score_type="attention", binning="adaptive", dispatch="rank_once")
        self.layer = SMoESAutoEPLayer.adopt(adopted, smoes, self.context)
        self.smoes_gate = self.layer.smoes_gate
        self.given_gate = given_gate_cls(shape.hidden, self.layer.config)
        del self.given_gate.wg.weight
        self.given_gate.wg.weight = self.layer.router.gate.weight
        self.given_gate.slotless = True
        self.given_gate._set_ep_group(self.layer.ep_group_or_none())
        for m in (self.stock, self.layer, self.given_gate):
            m.to(dtype)
            m.train()
        self.ep_size, self.ep_rank, self.hidden = ep_size, ep_rank, shape.hidden

    def parameters(self) -> list[torch.Tensor]:
        return [*self.stock.parameters(), *self.layer.parameters()]

    def _stock_remote_bytes(self, x_SD: torch.Tensor) -> int:
        with torch.no_grad():
            selected_SK = self.stock.router(x_SD, self.stock.expert_bias)[1]
        remote = int((selected_SK // self.stock.num_local_experts != self.ep_rank).sum())
        return 2 * remote * self.hidden * x_SD.element_size()   # each remote pair: a row there and a row back

    def fwd_bwd(self, variant: str, batch: dict, given_SK: torch.Tensor | None, shared) -> int:
        """One fwd+bwd of `variant` on `batch`; the remote bytes its dispatch sent (this rank)."""
        x_BTD = batch["x_BTD"].detach().requires_grad_(True)
        if variant == "autoep/stock":
            out_BTD = self.stock(x_BTD)
            sent = None
            l_aux = out_BTD.new_zeros(())
        else:
            router, dispatch = variant.split("/")
            self.layer.smoes_gate = self.smoes_gate if router == "autoep-smoes" else self.given_gate
            self.given_gate.given_SK = given_SK
            self.layer.dispatcher = AUTOEP_DISPATCHERS[VARIANT_DISPATCH[dispatch]]()
            self.context.set(batch["labels_BT"], batch["scores_BTM"])
            with RoutingCollector([self.layer], stats=False) as collector:
                out_BTD = self.layer(x_BTD)
            l_aux = sum(self.context.aux_losses, out_BTD.new_zeros(()))
            [[call]] = collector.take()
            sent = call.remote_bytes
        if shared is not None:
            out_BTD = out_BTD + shared(x_BTD)
        ((out_BTD.float() * batch["probe_BTD"].float()).sum() + l_aux).backward()
        if sent is None:
            sent = self._stock_remote_bytes(x_BTD.detach().reshape(-1, self.hidden))
        return sent
