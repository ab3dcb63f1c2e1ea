"""The paper-style comparison: every gate and SMoES ablation, same recipe, same seeds.

    python -m ds_smoes.compare --config configs/demo.yaml --seeds 0 1 2 --out runs/compare
    python -m ds_smoes.compare --suite compression [--smoke]     # visual token compression (issue 19)
    python -m ds_smoes.compare --suite recipe                    # the gates on the recipe (docs/gates.md)
    python -m ds_smoes.compare --suite recipe-compression        # compression on the recipe (docs/compression.md)

`--suite compression` is the method x vision-token budget table on the canvas digits
(`ds_smoes.app.compare_compression` says what it runs and reports); the rest of this text is the gates'.

Each (variant, seed) is one run of the DeepSpeed entry point (`deepspeed --num_gpus N --module
ds_smoes.train`), logged as a child of one MLflow parent run.  A run whose metrics.json exists
is not run again, so an interrupted comparison resumes.  The table (accuracy relative to `topk`
on multimodal and language-only questions, overall, MSI, communication) is printed and logged
to the parent run as Markdown and CSV.  Any LLaVA-format dataset works through --set data.*=...
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from ds_smoes.app.gate_variants import VARIANTS  # the gate variants, shared with the pipeline
from ds_smoes.core.errors import ConfigError, SMoESError
from ds_smoes.parallel.launch import free_port

REFERENCE = "topk"
FIGURES = ("acc_multimodal", "acc_language", "acc_overall", "msi", "cross_rank_rate", "ranks_per_token",
           "remote_pairs_per_token", "tokens_per_s")
# measured by the dispatch (what each MoE call sent, collected by ds_smoes.moe.collector); absent from runs made before it was logged
OPTIONAL_FIGURES = ("bytes_per_token",)


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    """One row per variant: mean and (sample) standard deviation over seeds of each figure, and
    accuracy differences to the reference variant's mean in percentage points."""
    rows = []
    ref = results.get(REFERENCE) or []
    ref_mean = {f: statistics.fmean(r[f] for r in ref) for f in FIGURES} if ref else {}
    for name, runs in results.items():
        if not runs:
            continue
        row = {"variant": name, "seeds": len(runs)}
        for f in FIGURES + OPTIONAL_FIGURES:
            values = [r.get(f) for r in runs]
            if any(v is None for v in values):  # not measured in every run: no figure rather than a partial one
                row[f] = row[f + "_sd"] = float("nan")
                continue
            row[f] = statistics.fmean(values)
            row[f + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        for f in ("acc_multimodal", "acc_language", "acc_overall"):
            row["delta_" + f] = 100.0 * (row[f] - ref_mean[f]) if ref_mean else float("nan")
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = ("| variant | seeds | multimodal | Δ vs topk | language-only | Δ vs topk | overall | Δ vs topk | MSI "
            "| cross-rank rate | remote pairs / token | remote bytes / token |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        pm = lambda f: f"{r[f]:.4f} ± {r[f + '_sd']:.4f}" if r[f] == r[f] else "n/a"  # noqa: E731
        lines.append(f"| {r['variant']} | {r['seeds']} | {pm('acc_multimodal')} | {r['delta_acc_multimodal']:+.2f} "
                     f"| {pm('acc_language')} | {r['delta_acc_language']:+.2f} | {pm('acc_overall')} "
                     f"| {r['delta_acc_overall']:+.2f} | {pm('msi')} | {pm('cross_rank_rate')} "
                     f"| {pm('remote_pairs_per_token')} | {pm('bytes_per_token')} |")
    return "\n".join(lines)


def csv_table(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def run_jobs(jobs: list[tuple[str, int]], out: Path, run: Callable[[str, int, Path], dict | None],
             describe: Callable[[dict], str]) -> tuple[dict[str, list[dict]], list[str]]:
    """Run every (setting, seed) job in order into OUT/setting/seedN, printing one line before and after each;
    returns ({setting: [metrics of its finished runs]}, the failed jobs).  Ctrl-C raises `Interrupted` naming the
    job it stopped (finished runs are kept: the same command resumes)."""
    results: dict[str, list[dict]] = {name: [] for name, _ in jobs}
    failed = []
    for i, (name, seed) in enumerate(jobs, 1):
        t = time.time()
        run_dir = out / name / f"seed{seed}"
        print(f"[{i}/{len(jobs)}] {name} seed {seed} ... (progress: {run_dir / 'train.log'})", flush=True)
        try:
            m = run(name, seed, run_dir)
        except KeyboardInterrupt:
            raise Interrupted(f"{name} seed {seed}") from None
        if m is None:
            failed.append(f"{name} seed {seed}")
            print(f"    FAILED (log: {run_dir / 'train.log'})", flush=True)
            continue
        results[name].append(m)
        print(f"    {time.time() - t:.0f}s: {describe(m)}", flush=True)
    return results, failed


class Interrupted(Exception):
    """Ctrl-C during a comparison's run (the message names it)."""


def close(parent, md: str, jobs: list, failed: list[str], seconds: float, where: str) -> int:
    """End the parent run, print the table and the closing line; 1 if a run failed, else 0."""
    parent.end("FAILED" if failed else "FINISHED")
    print(f"\n{md}\n\n{len(jobs) - len(failed)}/{len(jobs)} runs in {seconds:.0f}s this session; {where}; MLflow "
          f"parent run {parent.run_id} ({parent.tracking_uri})")
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


def interrupted(parent, err: Interrupted) -> int:
    parent.end("KILLED")
    print(f"\ninterrupted; the same command resumes it (finished runs are kept, {err} starts over)", file=sys.stderr)
    return 130


def run_one(args, name: str, seed: int, out_dir: Path, parent_run_id: str | None, tracking_uri: str,
            overrides: list[str] | None = None) -> dict | None:
    """One (variant, seed) run; `overrides`: the variant's (default: the gate variant `name`'s, after --set)."""
    metrics_path = out_dir / "metrics.json"
    if metrics_path.exists():
        return json.loads(metrics_path.read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    launcher = str(Path(sys.executable).parent / "deepspeed")
    cmd = [launcher, "--num_gpus", str(args.ranks), "--master_port", str(free_port()), "--module", "ds_smoes.train",
           "--config", str(args.config), "--run-name", f"{name}-seed{seed}", "--tracking-uri", tracking_uri,
           "--experiment", args.experiment, "--output-json", str(metrics_path.with_suffix(".partial"))]
    if parent_run_id:
        cmd += ["--parent-run-id", parent_run_id]
    overrides = [*args.overrides, *VARIANTS[name]] if overrides is None else overrides
    for item in [*overrides, f"run.seed={seed}", f"run.output_dir={out_dir}",
                 "run.save_checkpoint=false", "tracking.enabled=true"]:
        cmd += ["--set", item]
    with open(out_dir / "train.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    partial = metrics_path.with_suffix(".partial")
    if proc.returncode != 0 or not partial.exists():
        return None
    shutil.move(partial, metrics_path)
    return json.loads(metrics_path.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ds_smoes.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=("gates", "compression", "recipe", "recipe-compression"), default="gates",
                   help="gates: every gate and SMoES ablation (default); compression: visual token compression "
                        "methods x budgets on the canvas digits (issue 19); recipe: the gates' stage III on the "
                        "recipe (configs/recipe/evidence32.yaml); recipe-compression: the compression settings on "
                        "it, from stage I on")
    p.add_argument("--smoke", action="store_true",
                   help="compression suite: 2 settings, 1 seed, 4 steps on a slice of the data (about 2 minutes)")
    p.add_argument("--config", type=Path, default=None,
                   help="base training config (default: configs/demo.yaml; compression: configs/canvas.yaml)")
    p.add_argument("--variants", nargs="+", default=None, help=f"gates: a subset of {', '.join(VARIANTS)}; "
                   "compression: of none, qmop-0.5, ..., fastv-0.125 (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2 (--smoke: 0)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override for every run, e.g. --set optim.epochs=10 or --set data.train_json=...")
    p.add_argument("--ranks", type=int, default=2, help="CPU ranks per run (DeepSpeed launcher)")
    p.add_argument("--out", type=Path, default=None,
                   help="default runs/compare (compression: runs/compare_compression, --smoke: .../smoke)")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default: sqlite:///$PWD/mlflow.db)")
    p.add_argument("--experiment", default="ds-smoes-compare")
    p.add_argument("--report-only", action="store_true",
                   help="recipe suites: write the table and plots from the runs that finished (no training, no "
                        "MLflow run), e.g. while the comparison still runs")
    args = p.parse_args(argv)
    if args.report_only and args.suite not in ("recipe", "recipe-compression"):
        print("error: --report-only belongs to --suite recipe and recipe-compression", file=sys.stderr)
        return 2
    if args.suite == "compression":
        return _main_compression(args)
    if args.suite in ("recipe", "recipe-compression"):
        return _main_recipe(args)
    if args.smoke:
        print("error: --smoke belongs to --suite compression", file=sys.stderr)
        return 2
    args.config = args.config or Path("configs/demo.yaml")
    args.variants = args.variants or list(VARIANTS)
    args.seeds = args.seeds if args.seeds is not None else [0, 1, 2]
    args.out = args.out or Path("runs/compare")
    try:
        unknown = [v for v in args.variants if v not in VARIANTS]
        if unknown:
            raise ConfigError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
        from ds_smoes.app.config import load_train_config
        from ds_smoes.app.tracking import Tracker, default_tracking_uri

        load_train_config(args.config, args.overrides)  # fail fast on a bad base config
        for name in args.variants:
            load_train_config(args.config, [*args.overrides, *VARIANTS[name]])
        uri = args.tracking_uri or default_tracking_uri()
        parent = Tracker(uri, args.experiment, f"compare-{time.strftime('%Y%m%d-%H%M%S')}",
                         tags={"kind": "comparison"})
        parent.log_params({"variants": ",".join(args.variants), "seeds": ",".join(map(str, args.seeds)),
                           "config": str(args.config), "overrides": " ".join(args.overrides)})
        jobs = [(n, s) for s in args.seeds for n in args.variants]  # seed-major: partial results stay comparable
        t0 = time.time()
        try:
            results, failed = run_jobs(
                jobs, args.out, lambda name, seed, run_dir: run_one(args, name, seed, run_dir, parent.run_id, uri),
                lambda m: (f"multimodal {m['acc_multimodal']:.4f}  language {m['acc_language']:.4f}  MSI "
                           f"{m['msi']:.3f}  cross-rank {m['cross_rank_rate']:.3f}"))
        except Interrupted as err:
            return interrupted(parent, err)
        rows = summarize(results)
        md, table_csv = markdown_table(rows), csv_table(rows)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text(md + "\n")
        (args.out / "table.csv").write_text(table_csv)
        parent.log_dict(md, "comparison.md")
        parent.log_dict(table_csv, "comparison.csv")
        parent.log_metrics({f"{r['variant']}/{f}": r[f] for r in rows for f in ("acc_multimodal", "acc_language",
                                                                                   "acc_overall", "msi")})
        return close(parent, md, jobs, failed, time.time() - t0, f"table in {args.out / 'table.md'}")
    except SMoESError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _main_compression(args) -> int:
    """`--suite compression`: the runs of `compare_compression`'s grid (resumable, under one parent run that a
    resumed comparison reopens), then its table and plots."""
    from ds_smoes.app import compare_compression as cc

    args.config = args.config or cc.DEFAULT_CONFIG
    args.out = args.out or (cc.DEFAULT_OUT / "smoke" if args.smoke else cc.DEFAULT_OUT)
    variants = args.variants or (cc.SMOKE_VARIANTS if args.smoke else list(cc.VARIANTS))
    seeds = args.seeds if args.seeds is not None else ([0] if args.smoke else [0, 1, 2])
    try:
        unknown = [v for v in variants if v not in cc.VARIANTS]
        if unknown:
            raise ConfigError(f"unknown setting(s) {unknown}; choose from {list(cc.VARIANTS)}")
        from ds_smoes.app.config import load_train_config
        from ds_smoes.app.tracking import Tracker, default_tracking_uri

        base = [*(cc.SMOKE_SCHEDULE if args.smoke else cc.SCHEDULE), *args.overrides]
        cfg = load_train_config(args.config, base)   # fail fast on a bad base config
        if args.smoke:
            base += cc.smoke_data(cfg, args.out / "data")
        for name in variants:
            load_train_config(args.config, [*base, *cc.run_overrides(name, seeds[0])])
        uri = args.tracking_uri or default_tracking_uri()
        state = cc.load_state(args.out)
        same_store = state.get("tracking_uri") == uri and state.get("experiment") == args.experiment
        parent = Tracker(uri, args.experiment, f"compression{'-smoke' if args.smoke else ''}-"
                         f"{time.strftime('%Y%m%d-%H%M%S')}",
                         tags={"kind": "comparison", "suite": "compression"},
                         run_id=state.get("parent_run_id") if same_store else None)
        resumed = same_store and parent.run_id == state.get("parent_run_id")
        if not resumed:
            parent.log_params({"suite": "compression", "variants": ",".join(variants),
                               "seeds": ",".join(map(str, seeds)), "config": str(args.config),
                               "overrides": " ".join(base), "smoke": args.smoke})
            cc.save_state(args.out, {"parent_run_id": parent.run_id, "tracking_uri": uri,
                                     "experiment": args.experiment})
        jobs = [(n, s) for s in seeds for n in variants]   # seed-major: partial results stay comparable
        t0 = time.time()
        print(f"compression comparison: {len(jobs)} runs into {args.out}; MLflow parent run {parent.run_id}"
              + (" (resumed)" if resumed else ""), flush=True)
        try:
            results, failed = run_jobs(
                jobs, args.out,
                lambda name, seed, run_dir: run_one(args, name, seed, run_dir, parent.run_id, uri,
                                                    [*base, *cc.run_overrides(name, seed)]),
                lambda m: (f"multimodal {cc.fmt(m.get('acc_multimodal'), '.4f')}  language "
                           f"{cc.fmt(m.get('acc_language'), '.4f')}  vision tokens {m.get('vision_tokens_kept')}  "
                           f"bytes/sample {cc.fmt(m.get('bytes_per_sample'), ',.0f')}  "
                           f"prefill {cc.fmt(m.get('prefill_ms_per_sample'), '.2f')} ms/sample"))
        except Interrupted as err:
            return interrupted(parent, err)
        rows = cc.summarize(results)
        md = cc.write_report(rows, results, args.out, parent)
        return close(parent, md, jobs, failed, time.time() - t0,
                     f"table in {args.out / 'table.md'} and table.json")
    except SMoESError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _main_recipe(args) -> int:
    """`--suite recipe`: stage III of every gate on the recipe, from the same stages 0-II per seed
    (`ds_smoes.app.compare_recipe`)."""
    from ds_smoes.app import compare_recipe as cr

    if args.smoke:
        print("error: --smoke belongs to --suite compression", file=sys.stderr)
        return 2
    try:
        from ds_smoes.app.tracking import default_tracking_uri

        compression = args.suite == "recipe-compression"
        known = cr.compression_settings() if compression else list(VARIANTS)
        reference = cr.COMPRESSION_REFERENCE if compression else cr.REFERENCE
        settings = args.variants or (known if compression else list(cr.GATES))
        unknown = [v for v in settings if v not in known]
        if unknown:
            raise ConfigError(f"unknown setting(s) {unknown}; choose from {known}")
        if reference not in settings:
            raise ConfigError(f"the paired differences are against {reference}: include it in --variants")
        seeds = args.seeds if args.seeds is not None else [0, 1, 2]
        out = args.out or cr.DEFAULT_OUT   # one root for both suites: stage 0 and the language stage are shared
        return cr.run(args.config or cr.DEFAULT_CONFIG, settings, seeds, out, args.overrides,
                      args.tracking_uri or default_tracking_uri(), args.experiment, reference=reference,
                      suite=args.suite, report_only=args.report_only)
    except SMoESError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
