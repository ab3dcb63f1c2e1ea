"""`python -m ds_smoes.bench comm`: measured EP communication of the four variants (docs/bench.md).

1. The trained models: `--smoes-run DIR` / `--topk-run DIR` when given, else runs/bench/smoes and
   runs/bench/topk, trained there by the demo recipe (DeepSpeed launcher) when missing.
2. The measurement: `ds_smoes.bench.comm.worker` on `ep_size` gloo ranks (DeepSpeed launcher), on the
   trained models and on the same architecture at initialisation.
3. The table (printed, comm.md), the result (comm.json, strict JSON), the simulation beyond 2
   ranks (simulate.*) and one MLflow run holding all of it (the training runs nest under it).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ds_smoes.bench import runs
from ds_smoes.bench.comm.report import assemble, done_lines, markdown_table, report_markdown, strict_json
from ds_smoes.bench.simulate.command import FILES as SIMULATION_FILES
from ds_smoes.bench.simulate.command import run_simulation
from ds_smoes.bench.comm.variants import VARIANTS
from ds_smoes.bench.comm.worker import variant_config
from ds_smoes.core.errors import ConfigError

EXPERIMENT = "ds-smoes-bench"
SIMULATION_NEEDS = {"a", "b", "c"}  # the stock capacity of both gates and the SMoES router's profile


def _echo(message: str) -> None:
    print(message, flush=True)


def check_args(args) -> None:
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if args.init_only and args.no_init:
        raise ConfigError("--init-only and --no-init leave nothing to measure")
    for name in ("repeats", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("warmup", "batches", "eval_questions"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0")
    if args.epochs is not None and args.epochs <= 0:
        raise ConfigError("--epochs must be > 0")
    if args.init_only and (args.smoes_run or args.topk_run):
        raise ConfigError("--init-only measures no trained model: drop --smoes-run / --topk-run")


def trained_runs(args, cfg, tracking_uri: str | None, parent_run_id: str | None) -> dict:
    """gate -> {run_dir, metrics} for every gate the variants need; trains missing default runs."""
    given = {"smoes": args.smoes_run, "topk": args.topk_run}
    needed = sorted({VARIANTS[v].gate for v in args.variants})
    out = {}
    for gate in needed:
        run_dir = given[gate] or runs.default_run_dir(args.out, gate, args.epochs)
        if not runs.is_complete(run_dir):
            if given[gate] is not None:
                runs.load_run(run_dir, gate, cfg.smoes, cfg.model)  # raises, saying what is missing
            if args.no_train:
                raise ConfigError(f"{run_dir}: no trained {gate} model there and --no-train was given; pass "
                                  f"--{gate}-run DIR or drop --no-train")
            runs.train(gate, run_dir, args.config, args.overrides, args.epochs, cfg.smoes.ep_size, tracking_uri,
                       args.experiment, parent_run_id, _echo)
        out[gate] = {"run_dir": run_dir, "metrics": runs.load_run(run_dir, gate, cfg.smoes, cfg.model)}
        _echo(f"{gate} model: {run_dir} (reported accuracy: multimodal "
              f"{out[gate]['metrics'].get('acc_multimodal', float('nan')):.4f}, language "
              f"{out[gate]['metrics'].get('acc_language', float('nan')):.4f})")
    return out


def worker_args(args, trained: dict, raw_path: Path, batch_size: int) -> list[str]:
    """Arguments of `ds_smoes.bench.comm.worker` (pure)."""
    out = ["--config", str(args.config), "--out", str(raw_path), "--variants", *args.variants,
           "--batches", str(args.batches), "--batch-size", str(batch_size), "--warmup", str(args.warmup),
           "--repeats", str(args.repeats), "--eval-questions", str(args.eval_questions),
           "--sources", *(["init"] if args.init_only else ["trained"] if args.no_init else ["trained", "init"])]
    for item in args.overrides:
        out += ["--set", item]
    for gate, run in trained.items():
        out += [f"--{gate}-checkpoint", str(Path(run["run_dir"]) / "checkpoint")]
    return out


def run(args) -> int:
    from ds_smoes.app.tracking import Tracker, default_tracking_uri
    from ds_smoes.app.config import load_train_config

    check_args(args)
    cfg = load_train_config(args.config, args.overrides)
    for key in args.variants:  # every variant's config must validate before anything starts
        variant_config(cfg.smoes, VARIANTS[key])
    if cfg.smoes.ep_size < 2:
        raise ConfigError(f"smoes.ep_size={cfg.smoes.ep_size}: the benchmark measures traffic between EP ranks; "
                          "use ep_size >= 2")
    t0 = time.time()
    uri = None if args.no_mlflow else (args.tracking_uri or default_tracking_uri())
    tracker = Tracker(uri or "", args.experiment, f"bench-comm-{time.strftime('%Y%m%d-%H%M%S')}",
                      active=uri is not None, tags={"kind": "bench-comm"})
    status = "FAILED"
    try:
        tracker.log_params({"config": str(args.config), "overrides": " ".join(args.overrides),
                            "variants": ",".join(args.variants), "batches": args.batches,
                            "repeats": args.repeats, "warmup": args.warmup, "init_only": args.init_only,
                            "epochs": args.epochs, "eval_questions": args.eval_questions})
        trained = {} if args.init_only else trained_runs(args, cfg, uri, tracker.run_id)
        args.out.mkdir(parents=True, exist_ok=True)
        raw_path = args.out / "comm_raw.json"
        batch_size = args.batch_size or cfg.optim.micro_batch_size
        _echo(f"measuring on {cfg.smoes.ep_size} gloo ranks; log: {args.out / 'comm_worker.log'}")
        raw = runs.measure("ds_smoes.bench.comm.worker", cfg.smoes.ep_size, worker_args(args, trained, raw_path, batch_size),
                           raw_path, args.out / "comm_worker.log", _echo, ("[bench]",))
        result = assemble(raw, trained)
        result["command"] = {"config": str(args.config), "overrides": args.overrides, "variants": args.variants}
        result["mlflow_run_id"] = tracker.run_id
        if SIMULATION_NEEDS <= set(args.variants):
            result["simulation"] = run_simulation(result, args.out)
            result["simulation"].pop("rows")  # the full grid is in simulate.json / .csv
        md = report_markdown(result)
        (args.out / "comm.json").write_text(strict_json(result))
        (args.out / "comm.md").write_text(md)
        _print_result(result)
        _log(tracker, result, args.out, md)
        written = ["comm.json", "comm.md", *(SIMULATION_FILES if "simulation" in result else ())]
        _echo("\n" + runs.wrote_line([args.out / f for f in written], time.time() - t0, tracker, uri))
        status = "FINISHED"
    finally:
        tracker.end(status)
    return 0


def _print_result(result: dict) -> None:
    titles = {"trained": "models trained by the demo recipe", "init": "models at initialisation (same seed)"}
    s = result["setup"]
    _echo(f"\n== EP communication, {s['ep_size']} ranks, {s['num_experts']} experts top-{s['k']}, "
          f"{s['tokens']} test tokens; bytes per token and MoE layer (dispatch + combine) " + "=" * 8)
    for source, rows in result["sources"].items():
        _echo(f"\n{titles.get(source, source)}:\n{markdown_table(rows)}")
    if "done_criteria" in result:
        _echo("\n" + "\n".join(done_lines(result["done_criteria"])))
    sim = result.get("simulation")
    if sim is None:
        _echo(f"\nsimulation skipped: it needs variants {sorted(SIMULATION_NEEDS)}")
        return
    _echo(f"\nsimulation beyond {s['ep_size']} ranks ({sim['source']} routers; table in simulate.md):")
    for line in sim["highlights"]:
        _echo(f"  {line}")
    cal = sim["calibration"]
    _echo("  model vs measurement at the measured layout: " + ", ".join(
        f"({k}) {v['model']:.0f} vs {v['measured']:.0f}" for k, v in cal.items()))


def _log(tracker, result: dict, out_dir: Path, md: str) -> None:
    if not tracker.active:
        return
    metrics = {}
    for source, rows in result["sources"].items():
        for key, r in rows.items():
            for f in ("bytes_per_token", "total_bytes_per_token", "cross_rank_rate", "ranks_per_token",
                      "expert_rows_per_token", "expert_load_imbalance",
                      "ms_per_step", "acc_multimodal", "acc_language", "acc_overall", "delta_bytes_vs_a_pct"):
                if isinstance(r.get(f), (int, float)):  # Tracker drops NaN
                    metrics[f"{source}/{key}/{f}"] = r[f]
    crit = result.get("done_criteria")
    if crit and crit["bytes_reduction_c_vs_a_pct"] is not None:
        metrics["trained/c_bytes_reduction_vs_a_pct"] = crit["bytes_reduction_c_vs_a_pct"]
    tracker.log_metrics(metrics)
    for name in ("comm.json", "comm.md", *(SIMULATION_FILES if "simulation" in result else ())):
        tracker.log_file(out_dir / name)
    tracker.set_tags({"bench.done_criteria": json.dumps({k: v for k, v in (crit or {}).items() if k.endswith("_met")})})
