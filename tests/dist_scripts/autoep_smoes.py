"""Run under `deepspeed --num_gpus 2`: the ds-smoes gate on DeepSpeed's AutoEP layers (`ds_smoes.moe.autoep`), on a
tiny random Qwen3-MoE (8 experts, top-2), autoep_size 2, the same batches on both ranks.

1. parity: with the losses off, the adopted layer (both dispatches) computes what AutoEP's own layer computed on the
   same input, and what each dispatch sends to the other rank;
2. training: 8 steps of SMoES (Gaussian scores, MI and bin balance, adaptive bins re-cut every 2 steps and frozen at
   step 4, then the experts placed on their bins' ranks with their Adam state) through the engine; per step the loss
   and the MI of the step's forward; and the same 8 steps without the MI loss (alpha_mi 0), a control;
3. checkpoint: DeepSpeed's checkpoint of the trained engine loaded into a fresh engine (AutoEP, adopted): the SMoES
   state, the experts and one more step compared bit for bit;
4. the same checkpoint loaded (module only) into an engine with autoep_size 1: its logits against the trained ones.

Each rank writes OUT/rank{r}.json."""
import deepspeed
import torch
import transformers
from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer
from rank_report import parse_args, write_report

from ds_smoes.core.config import SMoESConfig
from ds_smoes.core.placement import is_placed
from ds_smoes.hf.context import ModalityContext
from ds_smoes.moe.autoep import AUTOEP_DISPATCHERS, adopt_autoep_layers
from ds_smoes.moe.collector import RoutingCollector
from ds_smoes.moe.updates import register_step_updates
from ds_smoes.parallel import distributed
from ds_smoes.parallel.launch import init_distributed

VOCAB, VISION_IDS = 64, tuple(range(32))   # ids below 32 play the image tokens


def build_engine(autoep_size: int = 2):
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                      moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                                      max_position_embeddings=64)
    model = transformers.Qwen3MoeForCausalLM(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ds_config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 0},
                 "expert_parallel": {"enabled": True, "autoep_size": autoep_size, "preset_model": "qwen3_moe"}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def batch(step: int) -> torch.Tensor:
    """Half the rows image-like (ids < 32), half text-like: the same on both ranks."""
    g = torch.Generator().manual_seed(step)
    vision = torch.randint(0, 32, (2, 8), generator=g)
    text = torch.randint(32, VOCAB, (2, 8), generator=g)
    return torch.cat([vision, text], dim=1)


def smoes_state(layers) -> dict[str, torch.Tensor]:
    """Every buffer the adopted layers carry (bins, their loads, placement, Gaussian statistics) and the experts."""
    out = {}
    for i, layer in enumerate(layers):
        for name, t in layer.gate.named_buffers():
            out[f"{i}.gate.{name}"] = t.detach().clone()
        for name, t in layer.scorer.named_buffers():
            out[f"{i}.scorer.{name}"] = t.detach().clone()
        for name in ("w1", "w2", "w3"):
            out[f"{i}.experts.{name}"] = getattr(layer.experts, name).detach().clone()
    return out


def step(engine, layers, context, ids, collect: bool = False):
    context.begin(ids, None, cached=False)
    with RoutingCollector(layers) as collector:
        out = engine(input_ids=ids, labels=ids)
    loss = out.loss + context.take_aux(out.loss)
    engine.backward(loss)
    engine.step()
    calls = collector.take()
    mi = sum(float(c[0].stats.mi) for c in calls) / len(calls)
    return float(loss.detach()), mi


def train(engine, layers, context, steps: int = 8):
    """`steps` training steps with the rank_once dispatch, experts placed when the bins freeze; (losses, MI per
    step, the step after which the experts moved, how many moved)."""
    for layer in layers:
        layer.dispatcher = AUTOEP_DISPATCHERS["rank_once"]()
    engine.module.train()
    register_step_updates(engine.optimizer, engine.module)
    losses, mis, placed_at, moved = [], [], None, 0
    for s in range(steps):
        loss, mi = step(engine, layers, context, batch(s))
        losses.append(loss)
        mis.append(mi)
        if any(layer.placement_due() for layer in layers):
            moved = sum(layer.place_experts(engine.optimizer).experts_moved for layer in layers)
            placed_at = s
    return losses, mis, placed_at, moved


def main() -> None:
    args = parse_args()
    init_distributed()
    engine = build_engine()
    autoep = [m for m in engine.module.modules() if isinstance(m, AutoEPMoELayer)]

    # 1. parity with AutoEP's own layer (eval, no losses)
    engine.module.eval()
    h = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = autoep[0](h)
    context = ModalityContext(VISION_IDS, track_scores=False)
    context.begin(batch(0), None, cached=False)
    smoes = SMoESConfig(num_bins=2, score_type="gaussian", alpha_mi=0.5, alpha_bal=0.01, binning="adaptive",
                        rebin_interval=2, rebin_freeze_step=4, placement="bins", ema_beta=0.5,
                        gaussian_tau=1.0)
    layers = adopt_autoep_layers(engine.module, smoes, context)
    parity = {}
    for name in ("deepspeed", "rank_once"):
        layers[0].dispatcher = AUTOEP_DISPATCHERS[name]()
        with torch.no_grad(), RoutingCollector(layers[:1]) as collector:
            out = layers[0](h)
        call = collector.take()[0][0]
        comm = call.comm()
        parity[name] = {"max_abs_diff": float((out - ref).abs().max()), "remote_bytes": call.remote_bytes,
                        "dispatch": comm.dispatch, "ranks_per_token": comm.ranks_per_token}

    # 2. training through the engine, rank_once; the control: the same without the MI loss
    losses, mis, placed_at, moved = train(engine, layers, context)
    frozen = all(layer.gate.binning.frozen for layer in layers)
    placed = all(is_placed(layer.gate.binning.bin_E, layer.gate.physical_E, 2, 2) for layer in layers)
    physical = [layer.gate.physical_E.tolist() for layer in layers]
    control = build_engine()
    control_context = ModalityContext(VISION_IDS, track_scores=False)
    control_layers = adopt_autoep_layers(control.module, smoes.model_copy(update={"alpha_mi": 0.0}), control_context)
    mis_control = train(control, control_layers, control_context)[1]

    # 3. checkpoint round trip into a fresh engine
    ckpt = args.out / "ckpt"
    engine.save_checkpoint(str(ckpt), tag="t")
    saved = smoes_state(layers)
    fresh = build_engine()
    fresh_context = ModalityContext(VISION_IDS, track_scores=False)
    fresh_layers = adopt_autoep_layers(fresh.module, smoes, fresh_context)
    for layer in fresh_layers:
        layer.dispatcher = AUTOEP_DISPATCHERS["rank_once"]()
    fresh.load_checkpoint(str(ckpt), tag="t")
    register_step_updates(fresh.optimizer, fresh.module)
    restored = smoes_state(fresh_layers)
    mismatched = sorted(k for k in saved if not torch.equal(saved[k], restored[k]))
    # 4. the same checkpoint into autoep_size 1 (every rank all 8 experts; module only: Adam's moments are per EP rank):
    #    the trained model's logits, with its experts where placement put them
    ids = batch(9)
    engine.module.eval()
    context.begin(ids, None, cached=False)
    with torch.no_grad():
        logits = engine(input_ids=ids).logits
    engine.module.train()
    single = build_engine(autoep_size=1)
    single_context = ModalityContext(VISION_IDS, track_scores=False)
    single_layers = adopt_autoep_layers(single.module, smoes.model_copy(update={"ep_size": 1}), single_context)
    single.load_checkpoint(str(ckpt), tag="t", load_module_only=True, load_optimizer_states=False)
    single.module.eval()
    single_context.begin(ids, None, cached=False)
    with torch.no_grad():
        single_logits = single(input_ids=ids).logits
    resharded = {"max_abs_diff": float((single_logits - logits).abs().max()),
                 "physical_E": [layer.gate.physical_E.tolist() for layer in single_layers],
                 "bins_equal": all(torch.equal(a.gate.binning.bin_E, b.gate.binning.bin_E)
                                   for a, b in zip(layers, single_layers))}

    next_loss = step(engine, layers, context, batch(8))[0]
    next_loss_restored = step(fresh, fresh_layers, fresh_context, batch(8))[0]

    write_report(args.out, {
        "rank": distributed.rank(), "layers": sorted({type(m).__name__ for m in engine.module.modules()
                                                      if isinstance(m, AutoEPMoELayer)}),
        "parity": parity, "losses": losses, "mi": mis, "mi_control": mis_control, "placed_at": placed_at, "experts_moved": moved,
        "frozen": frozen, "placed": placed, "physical_E": physical, "state_keys": len(saved),
        "mismatched": mismatched, "next_loss": next_loss, "next_loss_restored": next_loss_restored,
        "resharded": resharded})


if __name__ == "__main__":
    main()
