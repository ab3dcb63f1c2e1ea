"""One expert-parallel rank of the communication benchmark (started by `python -m ds_smoes.bench comm`
through the DeepSpeed launcher; not meant to be run by hand).

For each model source ("trained": the checkpoints given; "init": freshly initialised weights,
same seed) it builds one model per variant, each with its own SMoESConfig (gate, dispatch,
max_bins_per_token; none of them changes a parameter, so one checkpoint loads into all of a
gate's variants), then, on the same fixed test batches for every variant:

1. a routing pass: one fwd+bwd per batch and variant, tallying the CommVolume of every MoE
   layer and recording the routes (`ds_smoes.bench.comm.routes`), from which the expert rows each rank
   runs in each call follow (`expert_rows_sent`);
2. timing: `warmup + repeats` rounds; in each round every variant runs one fwd+bwd on the round's
   batch (round robin, so load from other processes hits all variants alike); a step's time is
   the slowest rank's;
3. exact-match accuracy on the test split (greedy decoding) under the variant's own routing.

Models run in eval mode (no dropout, no top-2 sampling, no bin or statistics updates) with
autograd on; fwd+bwd is the model's loss and its backward, no optimizer step and no
data-parallel gradient all-reduce (the same for every variant).  Rank 0 writes the raw figures
as JSON; `ds_smoes.bench.comm.report` turns them into the table.
"""
from __future__ import annotations

from functools import partial

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from ds_smoes.parallel import distributed
from ds_smoes.parallel import console
from ds_smoes.bench.comm.routes import (RouteRecorder, bins_by_physical, expected_rank_once_dispatch_bytes,
                                   expected_stock_bytes, expert_rows_sent, expert_work, modality_load, own_bins,
                                   own_route_counts, remote_pairs)
from ds_smoes.bench.comm.variants import VARIANTS, Variant
from ds_smoes.core.config import SMoESConfig, validate
from ds_smoes.core.errors import ConfigError, SMoESError

log0 = partial(console.log0, tag="bench")   # progress lines, rank 0 only

# per MoE layer: dispatch, combine, metadata bytes, tokens, cross-rank tokens, ranks x tokens,
# expected bytes from the routes, remote (token, rank) pairs
_TALLY = ("dispatch_bytes", "combine_bytes", "metadata_bytes", "tokens", "cross_rank_tokens", "rank_token_sum",
          "expected_bytes", "remote_pairs")





def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ds_smoes.bench.comm.worker")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--topk-checkpoint", type=Path, default=None)
    p.add_argument("--smoes-checkpoint", type=Path, default=None)
    p.add_argument("--sources", nargs="+", default=["trained", "init"], choices=["trained", "init"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--batches", type=int, default=0, help="test batches per rank (0: the whole test split)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--eval-questions", type=int, default=0, help="0: every test question")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)
    return p.parse_args(argv)


# -- building ---------------------------------------------------------------------------------------
def variant_config(base: SMoESConfig, variant: Variant) -> SMoESConfig:
    return validate(SMoESConfig, {**base.model_dump(), **variant.smoes_fields()},
                    source=f"smoes config of variant ({variant.key})")


def build_model(cfg, variant: Variant, vocab_size: int, image_id: int, checkpoint: Path | None):
    """The model of `variant`: freshly initialised from cfg.run.seed, then the checkpoint if one is given."""
    import deepspeed

    from ds_smoes.model import TinyMoEVLM
    from ds_smoes.app.session import seed_everything

    seed_everything(cfg.run.seed)
    smoes = variant_config(cfg.smoes, variant)
    model = TinyMoEVLM(cfg.model, vocab_size, image_id, smoes, expert_seed=cfg.run.seed,
                       ep_rank=distributed.rank() % smoes.ep_size)
    engine, *_ = deepspeed.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 0}, "steps_per_print": 10**9})
    if checkpoint is not None:
        path, _ = engine.load_checkpoint(str(checkpoint), tag="final", load_module_only=True,
                                         load_optimizer_states=False, load_lr_scheduler_states=False)
        if path is None:
            raise ConfigError(f"{checkpoint}: no DeepSpeed checkpoint with tag 'final' (train the model with "
                              "run.save_checkpoint=true)")
    model.eval()
    return engine, model


def fixed_batches(dataset, batch_size: int, limit: int) -> list:
    """This rank's share of the test split as lockstep batches (padding repeats fully masked)."""
    from ds_smoes.data import collate_train
    from ds_smoes.app.evaluation import lockstep_batches

    out = []
    plan = lockstep_batches(len(dataset), distributed.rank(), distributed.world_size(), batch_size)
    for idx, counted in plan[:limit] if limit else plan:
        batch = collate_train([dataset[i] for i in idx])
        keep_B = torch.tensor(counted)
        batch.attention_mask_BT &= keep_B.unsqueeze(1)
        batch.labels_BT[~keep_B] = -100
        out.append(batch)
    return out


def question_subset(dataset, count: int):
    """`count` test questions spread evenly over the split (all of them for 0)."""
    from ds_smoes.data import LlavaDataset

    if not count or count >= len(dataset):
        return dataset
    picks = [round(i * (len(dataset) - 1) / max(1, count - 1)) for i in range(count)]
    return LlavaDataset([dataset.samples[i] for i in picks], dataset.tokenizer, dataset.image_size,
                        dataset.patch_size, dataset.image_tokens)


# -- measuring ----------------------------------------------------------------------------------------
def fwd_bwd(model, batch) -> None:
    from ds_smoes.model import model_inputs

    out = model(*model_inputs(batch), labels_BT=batch.labels_BT)
    out.loss.backward()


def routing_pass(model, batches: list, smoes: SMoESConfig) -> dict:
    """One fwd+bwd per batch: per-layer tallies (summed over ranks) and router statistics."""
    layers = model.moe_layers()
    recorder = RouteRecorder(layers)
    tally_LX = torch.zeros(len(layers), len(_TALLY), dtype=torch.float64)
    home, ep = distributed.rank() % smoes.ep_size, smoes.ep_size
    per_rank = smoes.num_experts // ep
    d = model.cfg.d_model
    elt = None
    for batch in batches:
        with recorder:
            fwd_bwd(model, batch)
        model.zero_grad(set_to_none=True)
        elt = next(model.parameters()).element_size()
        for l, layer in enumerate(layers):
            comm = recorder.moe_calls[l][-1].comm()
            call = recorder.calls[l][-1]
            # summed over the ranks, what rank_once combines back equals what it dispatched
            expected = (2 * expected_rank_once_dispatch_bytes([call], home, per_rank, d, elt)
                        if layer.dispatcher.has_stock_counterfactual
                        else expected_stock_bytes([call], smoes.num_experts, ep, d, elt))
            tally_LX[l] += torch.tensor([comm.dispatch_bytes, comm.combine_bytes, comm.metadata_bytes,
                                         comm.num_tokens, comm.cross_rank_rate * comm.num_tokens,
                                         comm.ranks_per_token * comm.num_tokens, expected,
                                         remote_pairs(call, home, per_rank)], dtype=torch.float64)
    distributed.world_sum_(tally_LX)
    # expert rows of every rank per call (Q = recorded calls of the layer): what each rank's tokens put in front of
    # each rank, summed over the ranks
    rows_LQR = torch.stack([torch.stack([expert_rows_sent(call, layers[l].dispatcher.capacity_padded,
                                                          smoes.num_experts, ep)
                                         for call in recorder.calls[l]]) for l in range(len(layers))])
    distributed.world_sum_(rows_LQR)
    layers_out = []
    for l, layer in enumerate(layers):
        busiest, mean = expert_work(rows_LQR[l])
        # the recorded routes name physical experts (where the weights live, ds_smoes.core.placement); bins are
        # kept per logical expert: bin_P is the bin of each physical expert
        bin_E = layer.gate.binning.bin_E.detach().cpu().long()
        physical_E = layer.gate.physical_E.detach().cpu().long()
        bin_P = bins_by_physical(bin_E, physical_E)
        load_MP = distributed.world_sum_(modality_load(recorder.calls[l], smoes.num_experts))
        own_MG = own_bins(load_MP, bin_P, smoes.num_bins)
        counts_MJ = distributed.world_sum_(own_route_counts(recorder.calls[l], bin_P, own_MG, smoes.k))
        layers_out.append({**dict(zip(_TALLY, tally_LX[l].tolist())), "bins": bin_E.tolist(),
                           "physical": physical_E.tolist(), "bins_placed_on_ranks": _placed(bin_P, smoes),
                           "load_MP": load_MP.tolist(), "own_bins_MG": own_MG.tolist(),
                           "own_route_counts_MJ": counts_MJ.tolist(),
                           "expert_rows_busiest": busiest, "expert_rows_mean": mean})
    return {"layers": layers_out, "element_size": elt, "hidden": d}


def _placed(bin_P: torch.Tensor, smoes: SMoESConfig) -> bool:
    """Every physical expert sits on its bin's EP rank (bin b on rank b * ep_size // num_bins)."""
    per_rank = smoes.num_experts // smoes.ep_size
    rank_P = torch.arange(smoes.num_experts) // per_rank
    return bool(torch.equal(rank_P, bin_P * smoes.ep_size // smoes.num_bins))


def time_round_robin(models: dict, batches: list, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per fwd+bwd of each model, per timed round (the slowest rank's).

    The order of the variants rotates from round to round, so no variant always runs first after
    the barrier (or right after a given other variant)."""
    import torch.distributed as dist

    keys = list(models)
    times_QX = torch.zeros(repeats, len(keys), dtype=torch.float64)   # Q = timed rounds, X = variants
    for r in range(warmup + repeats):
        batch = batches[r % len(batches)]
        for i in range(len(keys)):
            v = (r + i) % len(keys)
            key = keys[v]
            if distributed.is_distributed():
                dist.barrier()
            t0 = time.perf_counter()
            fwd_bwd(models[key], batch)
            elapsed = time.perf_counter() - t0
            models[key].zero_grad(set_to_none=True)
            if r >= warmup:
                times_QX[r - warmup, v] = elapsed
        if r == warmup - 1 or (r >= warmup and (r - warmup + 1) % 10 == 0):
            log0(f"    timing round {r + 1}/{warmup + repeats}")
    distributed.world_max_(times_QX)   # the slowest rank's time (on the collective device, as NCCL needs)
    return {key: times_QX[:, v].tolist() for v, key in enumerate(keys)}


def run_source(source: str, cfg, data, variants: list[Variant], checkpoints: dict, batches: list,
               args) -> dict:
    from ds_smoes.app.evaluation import exact_match_accuracy

    t0 = time.time()
    log0(f"{source}: building {len(variants)} models ({', '.join(v.key for v in variants)})"
         + (" from the checkpoints" if source == "trained" else " at initialisation (seed "
            f"{cfg.run.seed})"))
    built = {v.key: build_model(cfg, v, data.tokenizer.vocab_size, data.tokenizer.image_id,
                                checkpoints.get(v.gate) if source == "trained" else None) for v in variants}
    models = {key: model for key, (_, model) in built.items()}
    results: dict = {}
    for v in variants:
        smoes = variant_config(cfg.smoes, v)
        results[v.key] = routing_pass(models[v.key], batches, smoes)
    log0(f"{source}: routing pass done ({len(batches)} batches per rank x {len(variants)} variants)")
    times = time_round_robin(models, batches, args.warmup, args.repeats)
    test = question_subset(data.test, args.eval_questions)
    for v in variants:
        acc = exact_match_accuracy(models[v.key], test, cfg.run.eval_batch_size, cfg.run.max_new_tokens,
                                   torch.device("cpu"))
        results[v.key].update(step_seconds=times[v.key], ms_per_step=1000 * statistics.median(times[v.key]),
                              **{k: acc[k] for k in ("acc_multimodal", "acc_language", "acc_overall",
                                                     "num_multimodal", "num_language")})
        log0(f"{source} ({v.key}): {1000 * statistics.median(times[v.key]):.1f} ms/step, accuracy "
             f"{acc['acc_overall']:.3f} overall")
    log0(f"{source}: done in {time.time() - t0:.0f}s")
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from ds_smoes.app.builtin import prepare_data
        from ds_smoes.parallel.launch import init_distributed
        from ds_smoes.app.config import load_train_config

        cfg = load_train_config(args.config, args.overrides)
        init_distributed()
        world = distributed.world_size()
        if cfg.smoes.ep_size != world:
            raise ConfigError(f"the benchmark runs one EP group: smoes.ep_size={cfg.smoes.ep_size} but "
                              f"{world} ranks were started")
        data = prepare_data(cfg, log0)
        batches = fixed_batches(data.test, args.batch_size, args.batches)
        tokens = distributed.world_sum_(torch.tensor([float(sum(int(b.attention_mask_BT.sum()) for b in batches))],
                                                     dtype=torch.float64))
        log0(f"{len(batches)} test batches of {args.batch_size} sequences per rank, {int(tokens)} tokens in all")
        variants = [VARIANTS[k] for k in args.variants]
        checkpoints = {"topk": args.topk_checkpoint, "smoes": args.smoes_checkpoint}
        out = {"setup": {"world_size": world, "ep_size": cfg.smoes.ep_size, "num_experts": cfg.smoes.num_experts,
                         "k": cfg.smoes.k, "num_bins": cfg.smoes.num_bins, "d_model": cfg.model.d_model,
                         "moe_layers": None, "batches_per_rank": len(batches), "batch_size": args.batch_size,
                         "tokens": int(tokens), "warmup": args.warmup, "repeats": args.repeats,
                         "threads_per_rank": torch.get_num_threads(), "eval_questions": args.eval_questions,
                         "seed": cfg.run.seed},
               "sources": {}}
        for source in args.sources:
            out["sources"][source] = run_source(source, cfg, data, variants, checkpoints, batches, args)
        first = next(iter(out["sources"].values()))
        measured = next(iter(first.values()))
        out["setup"].update(moe_layers=len(measured["layers"]), element_size=measured["element_size"])
        from ds_smoes.bench.runs import write_raw

        write_raw(args.out, out)
    except SMoESError as err:
        from ds_smoes.parallel.console import report_error

        return report_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
