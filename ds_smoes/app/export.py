"""Deployment export: one file whose experts are ordered by their final bins.

    python -m ds_smoes.export --run runs/demo                 # -> runs/demo/export/
    python -m ds_smoes.train --init-from runs/demo/export --eval-only            # 1 process
    deepspeed --num_gpus 2 --module ds_smoes.train --init-from runs/demo/export --eval-only

Reads a training run's DeepSpeed checkpoint (any expert-parallel degree), loads it in one
process and writes `model.pt` whose physical expert order is **bin order**: bin b's experts
take physical ids [b * N_B, (b + 1) * N_B).  DeepSpeed gives EP rank r the physical experts
[r * E/ep, (r + 1) * E/ep), so with that order every bin lands on its rank (b * ep // N_bins,
docs/method.md, "Expert bins") for every ep_size that divides num_bins; the router keeps its logical ids
and the gate's `physical_E` buffer records the permutation.  The training entry point loads the
export (`--init-from`) at any such ep_size, each rank taking its own slice of experts, and
computes the same outputs as the checkpoint it came from.

Written next to `model.pt`: `train_config.json` (the run's config), `tokenizer.json`, and
`placement.json` (per MoE layer: bins, logical -> physical ids, and each expert's EP rank for
the ep_sizes the export supports).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch

from ds_smoes.core.errors import ConfigError, SMoESError

FORMAT = "ds-smoes-export/1"
_EXPERT_KEY = re.compile(r"^(.*\.deepspeed_experts\.)(\d+)(\..*)$")


# -- pure helpers -------------------------------------------------------------------------------------
def supported_ep_sizes(num_experts: int, num_bins: int) -> list[int]:
    """ep_sizes at which a bin-ordered export keeps every bin whole on one rank."""
    return [ep for ep in range(1, num_bins + 1) if num_bins % ep == 0 and num_experts % ep == 0]


def slice_experts(state: dict, num_experts: int, ep_size: int, ep_rank: int) -> dict:
    """The state dict of EP rank `ep_rank`: physical experts [rank * L, (rank + 1) * L) renumbered 0..L-1."""
    per_rank = num_experts // ep_size
    out = {}
    for key, value in state.items():
        m = _EXPERT_KEY.match(key)
        if m is None:
            out[key] = value
            continue
        physical = int(m.group(2))
        if physical // per_rank == ep_rank:
            out[f"{m.group(1)}{physical - ep_rank * per_rank}{m.group(3)}"] = value
    return out


def placement_report(model, ep_sizes: list[int]) -> dict:
    layers = []
    for i, layer in enumerate(model.moe_layers()):
        gate, cfg = layer.gate, layer.config
        physical_E = gate.physical_E.cpu()
        layers.append({
            "moe_layer": i,
            "bin_of_expert": gate.binning.bin_E.tolist(),
            "physical_of_expert": physical_E.tolist(),
            "rank_of_expert": {str(ep): (physical_E // (cfg.num_experts // ep)).tolist() for ep in ep_sizes},
        })
    return {"format": FORMAT, "supported_ep_sizes": ep_sizes, "layers": layers}


# -- export --------------------------------------------------------------------------------------------
def order_experts_by_bin(model) -> int:
    """Permute every MoE layer's experts (all local: one process) into bin order; returns experts moved."""
    from ds_smoes.core.placement import bin_ordered_physical
    from ds_smoes.parallel.migration import migrate_experts

    moved = 0
    for layer in model.moe_layers():
        gate = layer.gate
        if layer.deepspeed_moe.ep_size != 1:
            raise ValueError("order_experts_by_bin works on a model that holds every expert (ep_size 1)")
        new_physical_E = bin_ordered_physical(gate.binning.bin_E)
        moved += int((new_physical_E != gate.physical_E.cpu()).sum())
        migrate_experts(layer.deepspeed_moe.experts.deepspeed_experts, gate.physical_E, new_physical_E)
        gate.physical_E.copy_(new_physical_E)
    return moved


def _load_run(run_dir: Path, checkpoint: Path | None, tag: str | None, log):
    """A one-process model (ep_size 1) with the run's DeepSpeed checkpoint loaded."""
    import deepspeed

    from ds_smoes.data import WordTokenizer
    from ds_smoes.model import TinyMoEVLM
    from ds_smoes.parallel.launch import init_distributed
    from ds_smoes.app.config import TrainConfig

    cfg_path, tok_path = run_dir / "train_config.json", run_dir / "tokenizer.json"
    for path in (cfg_path, tok_path):
        if not path.is_file():
            raise ConfigError(f"{path} not found: --run must be a training run's output_dir (ds_smoes.train "
                              "writes train_config.json, tokenizer.json and checkpoint/ there)")
    cfg = TrainConfig.model_validate_json(cfg_path.read_text())
    checkpoint = checkpoint or run_dir / "checkpoint"
    if not checkpoint.is_dir():
        raise ConfigError(f"checkpoint folder {checkpoint} not found (set run.save_checkpoint=true, or --checkpoint)")
    tokenizer = WordTokenizer.load(tok_path)
    one = cfg.smoes.model_copy(update={"ep_size": 1})
    init_distributed()
    model = TinyMoEVLM(cfg.model, tokenizer.vocab_size, tokenizer.image_id,
                       one if cfg.model.moe_layers != "none" else None)
    engine, *_ = deepspeed.initialize(model=model, config={"train_micro_batch_size_per_gpu": 1,
                                                           "zero_optimization": {"stage": 0},
                                                           "steps_per_print": 10**9})
    log(f"loading {checkpoint} (tag {tag or 'latest'}) ...")
    path, _ = engine.load_checkpoint(str(checkpoint), tag=tag, load_module_only=True,
                                     load_optimizer_states=False, load_lr_scheduler_states=False)
    if path is None:
        raise ConfigError(f"no DeepSpeed checkpoint in {checkpoint} (tag {tag or 'latest'})")
    return cfg, engine.module


def export_run(run_dir: Path, out_dir: Path, checkpoint: Path | None = None, tag: str | None = "final",
               log=print, serving: dict | None = None) -> dict:
    """Write the deployment export of a training run; returns placement.json's content.  `serving`: also write
    the serving engines' placement files (keyword arguments of `ds_smoes.app.serving.write_serving`)."""
    cfg, model = _load_run(Path(run_dir), checkpoint, tag, log)
    moved = order_experts_by_bin(model)
    s = cfg.smoes
    ep_sizes = supported_ep_sizes(s.num_experts, s.num_bins)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, "state_dict": model.state_dict()}, out_dir / "model.pt")
    (out_dir / "train_config.json").write_text(cfg.model_dump_json(indent=2))
    shutil.copyfile(Path(run_dir) / "tokenizer.json", out_dir / "tokenizer.json")
    report = placement_report(model, ep_sizes)
    report["experts_reordered"] = moved
    (out_dir / "placement.json").write_text(json.dumps(report, indent=1))
    log(f"exported {out_dir / 'model.pt'}: {len(report['layers'])} MoE layers, experts in bin order "
        f"({moved} physical ids changed); loadable at ep_size {ep_sizes}")
    for layer in report["layers"]:
        log(f"  MoE layer {layer['moe_layer']}: bins {layer['bin_of_expert']} -> physical ids "
            f"{layer['physical_of_expert']}")
    if serving is not None:
        from ds_smoes.app.serving import write_serving

        report["serving"] = write_serving(model, cfg, Path(run_dir), out_dir, log=log, **serving)
    return report


# -- load ---------------------------------------------------------------------------------------------
def load_export(model, export_dir: Path, ep_size: int, ep_rank: int) -> None:
    """Load an export into a freshly built model (this rank's slice of experts when ep_size > 1)."""
    export_dir = Path(export_dir)
    path = export_dir / "model.pt"
    if not path.is_file():
        raise ConfigError(f"{path} not found: --init-from takes a folder written by python -m ds_smoes.export")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a ds-smoes export ({FORMAT})")
    layers = model.moe_layers()
    if layers:
        s = layers[0].config
        if ep_size not in supported_ep_sizes(s.num_experts, s.num_bins):
            raise ConfigError(f"the export places {s.num_bins} bins of {s.num_experts} experts; ep_size={ep_size} "
                              f"would split a bin across ranks: use ep_size in "
                              f"{supported_ep_sizes(s.num_experts, s.num_bins)}")
        state = slice_experts(blob["state_dict"], s.num_experts, ep_size, ep_rank)
    else:
        state = blob["state_dict"]
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(f"{path} does not fit this model (is the config the export's train_config.json?): "
                          f"missing {result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ds_smoes.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a training run's output_dir (e.g. runs/demo)")
    p.add_argument("--out", type=Path, default=None, help="export folder (default: RUN/export)")
    p.add_argument("--checkpoint", type=Path, default=None, help="DeepSpeed checkpoint folder (default: RUN/checkpoint)")
    p.add_argument("--tag", default="final", help="checkpoint tag (default: final)")
    p.add_argument("--serving", action="store_true", help="also write the serving engines' placement files "
                   "(SGLang --init-expert-location, EPLB maps, expert load, serving simulation; docs/serving.md)")
    p.add_argument("--serving-ep-size", type=int, default=None, help="EP ranks of the serving engine (default: the "
                   "run's smoes.ep_size)")
    p.add_argument("--redundant-experts", type=int, default=0, help="extra copies of the hottest experts per MoE "
                   "layer, a multiple of --serving-ep-size (default 0)")
    p.add_argument("--serving-load", choices=("test", "ema"), default="test", help="where the expert load comes "
                   "from: a pass over the test split, keeping every token's routes (default), or the checkpoint's "
                   "training-time EMA (load only: the simulation then draws routes from it)")
    p.add_argument("--serving-placement", choices=("search", "bins", "linear", "round_robin", "eplb"),
                   default="search", help="the placement written for the engines (default search: the fewest remote "
                   "bytes on the measured routes of a trace within --max-load-imbalance; docs/serving.md)")
    p.add_argument("--serving-trace", choices=("image_heavy", "mixed", "text_heavy"), default="mixed",
                   help="the traffic the placement in sglang_expert_location.json is searched for (default mixed: half "
                   "the tokens vision); each trace's own is in sglang_expert_location.TRACE.json")
    p.add_argument("--max-load-imbalance", type=float, default=1.1, help="the search's bound on the busiest rank's "
                   "load over the mean, on every trace (default 1.1)")
    p.add_argument("--search-evals", type=int, default=3000, help="placements the search scores per MoE layer and "
                   "starting point, at most (default 3000)")
    args = p.parse_args(argv)
    serving = (dict(num_ranks=args.serving_ep_size, redundant_experts=args.redundant_experts,
                    load_source=args.serving_load, placement=args.serving_placement,
                    max_load=args.max_load_imbalance, search_evals=args.search_evals,
                    serving_trace=args.serving_trace) if args.serving else None)
    try:
        export_run(args.run, args.out or args.run / "export", args.checkpoint, args.tag, serving=serving)
    except SMoESError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
