"""The gate comparison on the recipe (`python -m ds_smoes.compare --suite recipe`, docs/results.md): for every
seed, stages 0-II once (the pipeline reuses them) and stage III with every gate, from the same stage-II model.

    python -m ds_smoes.compare --suite recipe                                  # 9 gates x seeds 0 1 2
    python -m ds_smoes.compare --suite recipe --variants topk smoes --seeds 0 # a part of it

Each (seed, gate) is one run of the pipeline (`ds_smoes.app.pipeline`) of `configs/recipe/evidence32.yaml`, whose
MLflow run nests under the comparison's parent run.  Finished stages are reused, so an interrupted comparison
resumes with the same command (the parent run's id is kept in OUT/<suite>/state.json, beside the report).  Per gate the report gives the
mean and standard deviation over seeds of stage III's figures and, against DeepSpeed's top-k, the paired
difference over seeds (same seed = same stages 0-II) with its 95 % t interval, for multimodal accuracy and for
language retention (stage III's language-only accuracy minus stage II's).
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

from ds_smoes.core.paired import paired_difference

GATES = ("topk", "hard", "smar", "ltdr", "hybrid", "smoes", "smoes-gaussian", "smoes-one-bin", "smoes-binning-only")
REFERENCE = "topk"
DEFAULT_CONFIG = Path("configs/recipe/evidence32.yaml")
DEFAULT_OUT = Path("runs/compare_recipe")
# --suite recipe-compression: the compression settings on the same recipe (each from stage I on, the SMoES gate)
COMPRESSION_REFERENCE = "none"
FIGURES = ("acc_multimodal", "acc_language", "retention", "msi", "cross_rank_rate", "bytes_per_token",
           "stock_bytes_per_token", "bytes_per_sample", "tokens_per_s", "vision_tokens_kept",
           "moe_tokens_per_sample", "prefill_ms_per_sample")


def compression_settings() -> list[str]:
    from ds_smoes.app.compare_compression import VARIANTS

    return list(VARIANTS)


def run_figures(stage3: dict, stage2: dict) -> dict:
    """One run's figures: stage III's, with language retention = its language-only accuracy minus stage II's."""
    out = {f: stage3.get(f) for f in FIGURES if f != "retention"}
    out["acc_by_task"] = stage3.get("acc_by_task") or {}
    lang3, lang2 = stage3.get("acc_language"), stage2.get("acc_language")
    out["retention"] = lang3 - lang2 if isinstance(lang3, (int, float)) and isinstance(lang2, (int, float)) else None
    out["stage2_acc_language"], out["stage2_acc_multimodal"] = lang2, stage2.get("acc_multimodal")
    return out


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def summarize(results: dict[str, dict[int, dict]], reference: str = REFERENCE) -> list[dict]:
    """Per gate: mean and sd over its seeds of every figure, and the paired differences against `reference` over
    the seeds both have (multimodal accuracy and retention, in points)."""
    rows = []
    ref = results.get(reference, {})
    for gate, by_seed in results.items():
        if not by_seed:
            continue
        row: dict = {"variant": gate, "seeds": sorted(by_seed)}
        for f in FIGURES:
            values = [r[f] for r in by_seed.values() if _number(r.get(f))]
            row[f] = statistics.fmean(values) if values else float("nan")
            row[f + "_sd"] = statistics.stdev(values) if len(values) > 1 else float("nan")
        for f in ("acc_multimodal", "retention"):
            seeds = [s for s in sorted(by_seed) if s in ref and _number(by_seed[s].get(f)) and _number(ref[s].get(f))]
            if gate == reference or not seeds:
                row[f"delta_{f}"] = None
                continue
            d = paired_difference([100 * by_seed[s][f] for s in seeds], [100 * ref[s][f] for s in seeds])
            row[f"delta_{f}"] = {"mean": d.mean, "low": d.low, "high": d.high, "n": d.n}
        ref_stock = [ref[s]["stock_bytes_per_token"] for s in by_seed if s in ref
                     and _number(ref[s].get("stock_bytes_per_token"))]
        row["bytes_vs_reference_stock"] = (row["bytes_per_token"] / statistics.fmean(ref_stock)
                                           if ref_stock and _number(row["bytes_per_token"]) else float("nan"))
        tasks = sorted({t for r in by_seed.values() for t in r.get("acc_by_task", {})})
        row["acc_by_task"] = {t: statistics.fmean(r["acc_by_task"][t] for r in by_seed.values()
                                                  if t in r.get("acc_by_task", {})) for t in tasks}
        rows.append(row)
    return rows


def _pm(row: dict, f: str, spec: str = ".3f") -> str:
    v, sd = row[f], row[f + "_sd"]
    if not _number(v):
        return "n/a"
    return f"{v:{spec}} ± {sd:{spec}}" if _number(sd) else f"{v:{spec}}"


def _delta(d: dict | None) -> str:
    if d is None:
        return "-"
    if d["n"] < 2:
        return f"{d['mean']:+.1f} (1 seed)"
    return f"{d['mean']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]"


def markdown_table(rows: list[dict], reference: str = REFERENCE) -> str:
    head = (f"| setting | seeds | multimodal | Δ vs {reference} (points, 95 % CI) | language-only | retention (points) "
            f"| Δ retention vs {reference} | MSI | cross-rank rate | bytes / token (stock) | x {reference} stock "
            "| bytes / sample | vision tokens kept | prefill ms / sample | tokens/s |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        retention = (f"{100 * r['retention']:+.1f} ± {100 * r['retention_sd']:.1f}" if _number(r["retention_sd"])
                     else (f"{100 * r['retention']:+.1f}" if _number(r["retention"]) else "n/a"))
        lines.append(
            f"| {r['variant']} | {','.join(map(str, r['seeds']))} | {_pm(r, 'acc_multimodal')} "
            f"| {_delta(r['delta_acc_multimodal'])} | {_pm(r, 'acc_language')} | {retention} "
            f"| {_delta(r['delta_retention'])} | {_pm(r, 'msi')} | {_pm(r, 'cross_rank_rate')} "
            f"| {r['bytes_per_token']:.0f} ({r['stock_bytes_per_token']:.0f}) | {r['bytes_vs_reference_stock']:.2f} "
            f"| {r['bytes_per_sample']:,.0f} | {_pm(r, 'vision_tokens_kept', '.0f')} "
            f"| {_pm(r, 'prefill_ms_per_sample', '.2f')} | {r['tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def write_report(rows: list[dict], out: Path, parent, reference: str = REFERENCE) -> str:
    """table.md, table.json and accuracy_vs_bytes_per_sample.png into `out`, and to the MLflow parent run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    md = markdown_table(rows, reference)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(md + "\n")
    (out / "table.json").write_text(json.dumps(rows, indent=1, default=str))
    rows_plotted = sorted((r for r in rows if _number(r["bytes_per_sample"]) and _number(r["acc_multimodal"])),
                          key=lambda r: r["bytes_per_sample"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    panels = [("acc_multimodal", 1.0, "multimodal accuracy"),
              ("retention", 100.0, "language retention (points)")]
    for ax, (key, scale, label) in zip(axes, panels):
        for i, r in enumerate(rows_plotted):
            if not _number(r[key]):
                continue
            sd = r[key + "_sd"] * scale if _number(r[key + "_sd"]) else None
            ax.errorbar(r["bytes_per_sample"], r[key] * scale, yerr=sd, fmt="o", capsize=3,
                        color="black" if r["variant"] == reference else None)
            # neighbours along the x axis get labels above and below in turn, so close points stay readable
            ax.annotate(r["variant"], (r["bytes_per_sample"], r[key] * scale), textcoords="offset points",
                        xytext=(5, 6 if i % 2 == 0 else -12), fontsize=8)
        ax.set_xlabel("EP remote bytes per test sample (rank_once dispatch)")
        ax.set_ylabel(f"{label}, stage III (mean ± sd over seeds)")
    fig.suptitle(f"the recipe's settings against {reference}: accuracy and communication")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_bytes_per_sample.png", dpi=120)
    if parent is not None:   # --report-only has no MLflow run
        parent.log_figure(fig, "accuracy_vs_bytes_per_sample.png")
        parent.log_dict(md, "comparison.md")
        parent.log_dict(rows, "comparison.json")
    plt.close(fig)
    return md


def _finished(cfg) -> dict | None:
    """The run's figures when its stage III (and so its stage II) finished, else None."""
    from ds_smoes.app.pipeline import stage_dirs

    dirs = stage_dirs(cfg)
    stage3, stage2 = dirs["moe"] / "metrics.json", dirs["dense"] / "metrics.json"
    if not (stage3.is_file() and stage2.is_file()):
        return None
    return run_figures(json.loads(stage3.read_text()), json.loads(stage2.read_text()))


def _report_only(configs: dict, out: Path, reference: str, echo: Callable[[str], None]) -> int:
    results: dict[str, dict[int, dict]] = {}
    missing = []
    for (seed, setting), cfg in configs.items():
        figures = _finished(cfg)
        if figures is None:
            missing.append(f"{setting} seed {seed}")
            continue
        results.setdefault(setting, {})[seed] = figures
    if reference not in results:
        echo(f"no finished run of the reference {reference!r} yet: nothing to report")
        return 1
    md = write_report(summarize(results, reference), out, None, reference)
    echo(f"{md}\n\n{len(configs) - len(missing)}/{len(configs)} runs finished; table in {out / 'table.md'}"
         + (f"; not yet: {', '.join(missing)}" if missing else ""))
    return 0


def run(config: Path, gates: list[str], seeds: list[int], out: Path, overrides: list[str], uri: str,
        experiment: str, echo: Callable[[str], None] = print, reference: str = REFERENCE,
        suite: str = "recipe", report_only: bool = False) -> int:
    """Every (seed, setting) pipeline, seed-major, then the report (paired against `reference`); 0, 1 if a run
    failed, 130 on Ctrl-C.  `report_only`: the report from the pipelines whose stage III finished, nothing run
    or logged to MLflow."""
    from ds_smoes.app.pipeline import Pipeline, StageFailed, plan
    from ds_smoes.app.pipeline_config import load_pipeline_config
    from ds_smoes.app.tracking import Tracker

    out = Path(out).resolve()
    configs = {(s, g): load_pipeline_config(config, [*overrides, f"seed={s}", f"variant={g}", f"out_dir={out}"])
               for s in seeds for g in gates}
    for cfg in configs.values():
        plan(cfg)   # a bad override fails here, before anything runs
    if report_only:
        return _report_only(configs, out / suite, reference, echo)
    state_path = out / suite / "state.json"   # per suite: both share the output root (and the stages they share)
    candidates = [state_path] + ([out / "state.json"] if suite == "recipe" else [])   # where the first ones kept it
    found = next((path for path in candidates if path.is_file()), None)
    state = json.loads(found.read_text()) if found is not None else {}
    same_store = state.get("tracking_uri") == uri and state.get("experiment") == experiment
    parent = Tracker(uri, experiment, f"{suite}-{time.strftime('%Y%m%d-%H%M%S')}",
                     tags={"kind": "comparison", "suite": suite},
                     run_id=state.get("parent_run_id") if same_store else None)
    if not (same_store and parent.run_id == state.get("parent_run_id")):
        parent.log_params({"suite": suite, "variants": ",".join(gates), "seeds": ",".join(map(str, seeds)),
                           "config": str(config), "overrides": " ".join(overrides)})
        state_path.parent.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps({"parent_run_id": parent.run_id, "tracking_uri": uri,
                                          "experiment": experiment}, indent=2))
    echo(f"{suite} comparison: {len(configs)} pipelines into {out}; MLflow parent run {parent.run_id}")
    results: dict[str, dict[int, dict]] = {g: {} for g in gates}
    failed: list[str] = []
    t0 = time.time()
    quiet = lambda line: echo("    " + line) if line.startswith("== ") else None  # noqa: E731
    try:
        for i, ((seed, gate), cfg) in enumerate(configs.items(), 1):
            echo(f"[{i}/{len(configs)}] seed {seed}, gate {gate}")
            try:
                Pipeline(cfg, uri, experiment, echo=quiet, parent_run_id=parent.run_id).run()
            except StageFailed as err:
                failed.append(f"{gate} seed {seed}")
                echo(f"    FAILED: {err}")
                continue
            results[gate][seed] = _finished(cfg)
    except KeyboardInterrupt:
        parent.end("KILLED")
        echo("interrupted: the same command resumes (finished stages are reused, the interrupted one continues "
             "from its last epoch)")
        return 130
    rows = summarize(results, reference)
    md = write_report(rows, out / suite, parent, reference)
    parent.end("FAILED" if failed else "FINISHED")
    echo(f"\n{md}\n\n{len(configs) - len(failed)}/{len(configs)} pipelines in {time.time() - t0:.0f}s this "
         f"session; table in {out / suite / 'table.md'}; MLflow parent run {parent.run_id} ({uri})")
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0
