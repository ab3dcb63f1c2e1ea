"""One rank of the inference benchmark (started by `python -m ds_smoes.bench infer` through the
DeepSpeed launcher, once per measured ep_size; not meant to be run by hand).

For every variant (`ds_smoes.bench.infer.variants`) it builds the model of the variant's recipe at
this ep_size with the variant's dispatch and loads the trained checkpoint's module weights
(DeepSpeed keys expert files by global expert id, so a checkpoint saved at ep_size 2 loads at
ep_size 1 as it is; the gate's `physical_E` travels with the weights), then, in eval mode:

1. a traffic pass: greedy generation with the KV cache (`TinyMoEVLM.generate`, the serving path) on
   fixed prompt batches, summing every MoE call's remote bytes (`MoECall.remote_bytes`, collected: what the
   rank sent to other EP ranks, dispatch + combine) separately for the prefill and the decode steps;
2. timing: `warmup + repeats` rounds; in each round every variant generates on the round's batch
   (round robin, the order rotating, a barrier before each), and a forward hook on the model marks
   where the prefill ends: prefill seconds and decode seconds per round, the slowest rank's;
3. exact-match accuracy on the test split (greedy decoding with the cache, `max_new_tokens` of the
   recipe), under the variant's routing at this ep_size.

Rank 0 writes the raw figures as JSON; `ds_smoes.bench.infer.command` turns them into the table.
"""
from __future__ import annotations

from functools import partial

import argparse
import sys
import time
from pathlib import Path

import torch

from ds_smoes.bench.infer.variants import INFER_VARIANTS, InferVariant
from ds_smoes.bench.runs import RECIPES
from ds_smoes.core.errors import ConfigError, SMoESError
from ds_smoes.parallel import distributed
from ds_smoes.parallel import console
from ds_smoes.moe.collector import RoutingCollector

log0 = partial(console.log0, tag="infer", elapsed=True)   # progress lines, rank 0 only







def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ds_smoes.bench.infer.worker")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--variants", nargs="+", required=True, choices=list(INFER_VARIANTS))
    p.add_argument("--checkpoint", dest="checkpoints", action="append", default=[], metavar="RECIPE=DIR",
                   help="the DeepSpeed checkpoint folder of a recipe's trained run (tag 'final')")
    p.add_argument("--batches", type=int, default=4, help="prompt batches per rank for traffic and timing")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per rank and batch")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per prompt for traffic and timing")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--eval-questions", type=int, default=0, help="0: every test question")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)
    return p.parse_args(argv)


# -- building -------------------------------------------------------------------------------------------------
def variant_train_config(config: Path, overrides: list[str], variant: InferVariant, ep_size: int):
    """The training config of the variant's recipe with the variant's inference fields (ep_size, dispatch)."""
    from ds_smoes.app.config import load_train_config

    return load_train_config(config, [*overrides, *RECIPES[variant.recipe].overrides, *variant.overrides(ep_size)])


def build_model(cfg, vocab_size: int, image_id: int, checkpoint: Path):
    """The trained model of `cfg` (its recipe) in eval mode: built as training builds it, module weights loaded."""
    import deepspeed

    from ds_smoes.app.session import seed_everything
    from ds_smoes.model import TinyMoEVLM

    seed_everything(cfg.run.seed)
    smoes = cfg.smoes if cfg.model.moe_layers != "none" else None
    model = TinyMoEVLM(cfg.model, vocab_size, image_id, smoes, expert_seed=cfg.run.seed,
                       ep_rank=distributed.rank() % cfg.smoes.ep_size)
    engine, *_ = deepspeed.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 0}, "steps_per_print": 10**9})
    path, _ = engine.load_checkpoint(str(checkpoint), tag="final", load_module_only=True,
                                     load_optimizer_states=False, load_lr_scheduler_states=False)
    if path is None:
        raise ConfigError(f"{checkpoint}: no DeepSpeed checkpoint with tag 'final' (train the model with "
                          "run.save_checkpoint=true)")
    model.eval()
    return engine, model


def active_parameters(model) -> dict:
    """Parameters in the model, and those one token runs through: every non-expert parameter plus k experts of
    each MoE layer (counted on the whole model: a rank holds num_experts / ep_size experts per layer)."""
    total = active = 0
    expert_ids = set()
    for layer in model.moe_layers():
        experts = layer.deepspeed_moe.experts.deepspeed_experts
        per_expert = sum(p.numel() for p in experts[0].parameters())
        total += per_expert * layer.config.num_experts
        active += per_expert * layer.config.k
        expert_ids |= {id(p) for p in experts.parameters()}
    rest = sum(p.numel() for p in model.parameters() if id(p) not in expert_ids)
    return {"total": total + rest, "active": active + rest}


def prompt_batches(dataset, batch_size: int, limit: int, device) -> list:
    """The first `limit` lockstep prompt batches of this rank's share of the test split (left-padded)."""
    from ds_smoes.app.evaluation import lockstep_batches
    from ds_smoes.data import collate_prompts

    plan = lockstep_batches(len(dataset), distributed.rank(), distributed.world_size(), batch_size)
    if len(plan) < limit:
        raise ConfigError(f"--batches {limit}: the test split gives {len(plan)} batches of {batch_size} prompts per "
                          f"rank; lower --batches or --batch-size")
    return [collate_prompts([dataset[i] for i in idx]).to(device) for idx, _ in plan[:limit]]


# -- measuring ------------------------------------------------------------------------------------------------
class TrafficMeter:
    """Remote bytes of every MoE call, split into the prefill and the decode steps (`arm()` before each
    `generate`; the first LM head call ends the prefill, as in `ds_smoes.app.evaluation.PrefillClock`)."""

    def __init__(self, model) -> None:
        self.bytes = {"prefill": 0, "decode": 0}
        self.calls = {"prefill": 0, "decode": 0}     # MoE layer calls per phase
        self._phase = "prefill"
        self._handles = [model.lm_head.register_forward_hook(lambda *_: self._set("decode"))]
        layers = model.moe_layers()
        self._handles += [layer.register_forward_hook(self._count) for layer in layers]
        # what each call sent, without statistics (an inference forward computes none)
        self._collector = RoutingCollector(layers, stats=False).__enter__()

    def arm(self) -> None:
        self._phase = "prefill"

    def _set(self, phase: str) -> None:
        self._phase = phase

    def _count(self, layer, *_) -> None:
        for calls in self._collector.take():
            # host ints from the dispatch's own split sizes
            self.bytes[self._phase] += sum(call.remote_bytes for call in calls)
        self.calls[self._phase] += 1

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._collector.__exit__(None, None, None)


def generate(model, batch, new_tokens: int, eos_id: int) -> list:
    from ds_smoes.model import model_inputs

    return model.generate(*model_inputs(batch), max_new_tokens=new_tokens, eos_id=eos_id, use_cache=True)


@torch.no_grad()
def traffic_pass(model, batches: list, new_tokens: int, eos_id: int) -> dict:
    """World-summed remote bytes and token counts of generating on `batches`."""
    meter = TrafficMeter(model)
    try:
        for batch in batches:
            meter.arm()
            generate(model, batch, new_tokens, eos_id)
    finally:
        meter.remove()
    rows = sum(int(b.input_ids_BT.shape[0]) for b in batches)
    prompt_tokens = sum(int(b.attention_mask_BT.sum()) for b in batches)
    tally = distributed.world_sum_(torch.tensor([meter.bytes["prefill"], meter.bytes["decode"], rows, prompt_tokens,
                                                 rows * (new_tokens - 1)], dtype=torch.float64)).tolist()
    return dict(zip(("prefill_bytes", "decode_bytes", "samples", "prompt_tokens", "decode_tokens"), tally))


@torch.no_grad()
def time_rounds(models: dict, batches: list, new_tokens: int, eos_id: int, warmup: int, repeats: int) -> dict:
    """Prefill and decode seconds of every model per timed round (the slowest rank's; the order rotates)."""
    from ds_smoes.app.evaluation import PrefillClock

    keys = list(models)
    clocks = {key: PrefillClock(m.lm_head, next(m.parameters()).device) for key, m in models.items()}
    seconds_QX2 = torch.zeros(repeats, len(keys), 2, dtype=torch.float64)   # Q rounds, X variants
    try:
        for r in range(warmup + repeats):
            batch = batches[r % len(batches)]
            for i in range(len(keys)):
                x = (r + i) % len(keys)
                clock = clocks[keys[x]]
                distributed.barrier()
                t0 = clock.start()
                generate(models[keys[x]], batch, new_tokens, eos_id)
                t2 = clock.now()                    # on a GPU, after the last decode step's kernels
                prefill = clock.seconds.pop()
                if r >= warmup:
                    seconds_QX2[r - warmup, x] = torch.tensor([prefill, t2 - t0 - prefill], dtype=torch.float64)
            if r == warmup - 1 or (r >= warmup and (r - warmup + 1) % 5 == 0):
                log0(f"  timing round {r + 1}/{warmup + repeats}")
    finally:
        for c in clocks.values():
            c.remove()
    distributed.world_max_(seconds_QX2)
    return {key: {"prefill_seconds": seconds_QX2[:, x, 0].tolist(), "decode_seconds": seconds_QX2[:, x, 1].tolist()}
            for x, key in enumerate(keys)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from ds_smoes.app.builtin import prepare_data
        from ds_smoes.app.evaluation import exact_match_accuracy
        from ds_smoes.bench.comm.worker import question_subset
        from ds_smoes.parallel.launch import init_distributed

        init_distributed()
        ep_size = distributed.world_size()
        checkpoints = dict(item.split("=", 1) for item in args.checkpoints)
        variants = [INFER_VARIANTS[k] for k in args.variants]
        cfgs = {v.key: variant_train_config(args.config, args.overrides, v, ep_size) for v in variants}
        data = prepare_data(next(iter(cfgs.values())), log0)
        tok = data.tokenizer
        t0 = time.time()
        built = {v.key: build_model(cfgs[v.key], tok.vocab_size, tok.image_id, Path(checkpoints[v.recipe]))
                 for v in variants}
        models = {key: model for key, (_, model) in built.items()}
        device = next(iter(built.values()))[0].device
        batches = prompt_batches(data.test, args.batch_size, args.batches, device)
        log0(f"ep_size {ep_size}: {len(variants)} models built in {time.time() - t0:.0f}s; {len(batches)} batches of "
             f"{args.batch_size} prompts per rank, {args.new_tokens} new tokens each")
        out = {"setup": {"ep_size": ep_size, "world_size": ep_size, "batches_per_rank": len(batches),
                         "batch_size": args.batch_size, "new_tokens": args.new_tokens, "warmup": args.warmup,
                         "repeats": args.repeats, "threads_per_rank": torch.get_num_threads(),
                         "eval_questions": args.eval_questions, "device": str(device),
                         "dtype": str(next(models[variants[0].key].parameters()).dtype)},
               "variants": {}}
        for v in variants:
            m = models[v.key]
            out["variants"][v.key] = {"params": active_parameters(m), "moe_layers": len(m.moe_layers()),
                                      **traffic_pass(m, batches, args.new_tokens, tok.eos_id)}
        log0(f"traffic pass done ({len(variants)} models)")
        times = time_rounds(models, batches, args.new_tokens, tok.eos_id, args.warmup, args.repeats)
        test = question_subset(data.test, args.eval_questions)
        for v in variants:
            cfg = cfgs[v.key]
            acc = exact_match_accuracy(models[v.key], test, cfg.run.eval_batch_size, cfg.run.max_new_tokens, device)
            out["variants"][v.key].update(times[v.key], **{k: acc[k] for k in (
                "acc_multimodal", "acc_language", "acc_overall", "num_multimodal", "num_language")})
            log0(f"{v.key}: accuracy multimodal {acc['acc_multimodal']:.4f}, language {acc['acc_language']:.4f}")
        from ds_smoes.bench.runs import write_raw

        write_raw(args.out, out)
    except SMoESError as err:
        from ds_smoes.parallel.console import report_error

        return report_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
