"""The visual token compression comparison (issue 19, item 5): method x vision-token budget x seeds on the canvas
digits, with the SMoES gate, on 2 CPU ranks per run.

    python -m ds_smoes.compare --suite compression                 # 13 settings x 3 seeds = 39 runs, 1-2 h here
    python -m ds_smoes.compare --suite compression --smoke         # 2 runs of 4 steps on a slice of the data

The grid (`GRID`): `none` (every one of the 64 vision tokens: keep 1.0), QMoP and LearnPruner at keep 0.5, 0.25
and 0.125, and the baselines (random, pool, FastV) at 0.25 and 0.125.  Every run is one `deepspeed --module
ds_smoes.train` of `configs/canvas.yaml` with `SCHEDULE`, logged as a child of one MLflow parent run (experiment
`ds-smoes-compare`, created by `ds_smoes.app.tracking` as a model-training experiment).  A run whose metrics.json
exists is not run again and the parent run's id is kept in `OUT/state.json`, so an interrupted comparison resumes
where it stopped, under the same parent (an interrupted run starts over: runs are a few minutes long).

The report (`OUT/table.md`, `OUT/table.json`, logged to the parent with the plots `accuracy_vs_tokens_kept.png`
and `accuracy_vs_bytes_per_sample.png`): per setting, mean ± sample standard deviation over the seeds of the
multimodal and language-only accuracy, the vision tokens kept per image (entering the LLM -> reaching its last
layers), training tokens/s, prefill ms per sample and EP remote bytes per sample, each run's own test-split
figures (`ds_smoes.app.session`).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

# (method, keep_ratio): none is keep 1.0 (the config refuses another ratio with it)
GRID: list[tuple[str, float]] = (
    [("none", 1.0)]
    + [(m, r) for m in ("qmop", "learnpruner") for r in (0.5, 0.25, 0.125)]
    + [(m, r) for m in ("random", "pool", "fastv") for r in (0.25, 0.125)])


def variant_name(method: str, keep_ratio: float) -> str:
    return method if method == "none" else f"{method}-{keep_ratio:g}"


VARIANTS: dict[str, list[str]] = {variant_name(m, r): [f"model.compress.method={m}", f"model.compress.keep_ratio={r}"]
                                  for m, r in GRID}
REFERENCE = "none"
DEFAULT_CONFIG = Path("configs/canvas.yaml")
DEFAULT_OUT = Path("runs/compare_compression")

# The schedule of every run of the full table: 10 epochs (760 steps of 2 ranks x 32 conversations), configs/
# canvas.yaml's, no per-epoch validation.
#
# Run times, each from launch to its metrics.json (launcher, imports, data, training, test evaluation, MLflow):
# - measured on 2026-11-29 at 2 epochs, 2 CPU ranks, load average 4-6:
#     none              153 s  (91 s of training: 45 s per epoch)
#     learnpruner-0.25  113 s  (55 s: 28 s per epoch)
#     qmop-0.125        103 s  (43 s: 22 s per epoch)
#   Per epoch, from the tokens each setting keeps (interpolated between the three): none 45 s; learnpruner
#   40 / 28 / 22 s at 0.5 / 0.25 / 0.125; qmop 30 / 25 / 22 s; random and pool 20 / 17 s at 0.25 / 0.125; fastv
#   (all 64 tokens in blocks 0-1) 35 / 33 s: 353 s per epoch for the 13 settings, about 60 s of every run outside
#   training.
# - measured on a quiet machine at 10 epochs: none 250 s, learnpruner-0.25 171 s (about half the loaded times).
# Estimate at 10 epochs on a quiet machine, the loaded per-epoch figures halved: 3 seeds x 10 epochs x 176 s + 39
# runs x 35 s = 6,650 s, about 1 h 50 min; on a loaded machine up to twice that.
# Measured on 2026-11-29 (quiet machine): the 39 runs' wall times add up to 6,148 s.  Accuracy at this length
# (docs/compression.md, "The comparison"): none's multimodal accuracy is 0.305 +- 0.082 over seeds 0-2 against a
# chance level of 0.233 (seed 2: 0.226), and the methods differ by less than the seed spread; 20 epochs (about 3 h
# here) are needed for a table that ranks them.  The token counts and bytes are exact whatever the training.
SCHEDULE: list[str] = ["smoes.gate=smoes", "optim.epochs=10", "run.eval_every_epoch=false", "run.log_every=40"]

# --smoke: two settings, one seed, 4 steps on a slice of the data (the end-to-end test runs it)
SMOKE_VARIANTS = ["none", "learnpruner-0.25"]
SMOKE_SCHEDULE = ["smoes.gate=smoes", "optim.max_steps=4", "optim.warmup_steps=2", "run.eval_every_epoch=false",
                  "run.log_every=2", "run.eval_batch_size=32"]
SMOKE_SPLITS = {"train": 256, "test": 64}

# (metrics.json key, column title, format)
FIGURES = [("acc_multimodal", "multimodal acc", "{:.3f}"), ("acc_language", "language-only acc", "{:.3f}"),
           ("tokens_per_s", "training tokens/s", "{:,.0f}"), ("prefill_ms_per_sample", "prefill ms/sample", "{:.2f}"),
           ("bytes_per_sample", "EP remote bytes/sample", "{:,.0f}"),
           ("bytes_per_token", "EP remote bytes/token/layer", "{:,.0f}"),
           ("moe_tokens_per_sample", "MoE token visits/sample", "{:.1f}")]


def run_overrides(name: str, seed: int) -> list[str]:
    """A run's overrides on top of the suite's schedule: the setting, and random's draws follow the seed."""
    return [*VARIANTS[name], f"model.compress.seed={seed}"]


def smoke_data(cfg, out_dir: Path, log=print) -> list[str]:
    """--smoke: the first SMOKE_SPLITS records of the config's train and test splits (generated first if missing),
    as `--set data.*` overrides; the images stay in the config's folder."""
    from ds_smoes.app.family import ensure_digits

    ensure_digits(cfg.data, log)
    out_dir.mkdir(parents=True, exist_ok=True)
    sets = []
    for split, n in SMOKE_SPLITS.items():
        records = json.loads(Path(getattr(cfg.data, f"{split}_json")).read_text())[:n]
        path = out_dir / f"{split}.json"
        path.write_text(json.dumps(records))
        sets.append(f"data.{split}_json={path.resolve()}")
    return sets + ["data.val_json=null"]


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    """One row per setting that has runs: mean and sample standard deviation over its seeds of each figure (nan
    where a run lacks it), the vision tokens per image, and multimodal accuracy and bytes per sample relative to
    the reference (`none`) mean."""
    rows = []
    for name, runs in results.items():
        if not runs:
            continue
        first = runs[0]
        row = {"variant": name, "method": first.get("compress_method", name.split("-")[0]),
               "keep_ratio": first.get("keep_ratio", 1.0), "seeds": len(runs),
               "vision_patches_per_image": first.get("vision_patches_per_image"),
               "vision_tokens_pre_llm": first.get("vision_tokens_pre_llm"),
               "vision_tokens_kept": first.get("vision_tokens_kept")}
        for key, _, _ in FIGURES:
            values = [r.get(key) for r in runs]
            if any(not isinstance(v, (int, float)) for v in values):
                row[key] = row[key + "_sd"] = row[key + "_range"] = float("nan")
                continue
            row[key] = statistics.fmean(values)
            row[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
            row[key + "_range"] = max(values) - min(values)
        tasks = [r.get("acc_by_task") or {} for r in runs]
        row["acc_by_task"] = {t: statistics.fmean(per[t] for per in tasks)   # only tasks every seed measured
                              for t in sorted(set().union(*tasks))
                              if all(isinstance(per.get(t), (int, float)) for per in tasks)}
        rows.append(row)
    ref = next((r for r in rows if r["variant"] == REFERENCE), None)
    for row in rows:
        for key in ("acc_multimodal", "bytes_per_sample", "moe_tokens_per_sample"):
            row[key + "_vs_none"] = _ratio(row[key], ref[key]) if ref else float("nan")
    return rows


# The bars ("done when"), judged on the rows by `bars`:
BAR_KEEP, BAR_FRACTION = 0.25, 0.95       # at 25 % of the vision tokens, the better of QMoP and LearnPruner keeps
LEARNED = ("qmop", "learnpruner")         # >= 95 % of `none`'s multimodal accuracy (means over seeds)
LOW_KEEP = 0.125                          # at 12.5 %, each of them beats random pruning by more than the seed spread


def bars(rows: list[dict]) -> list[tuple[str, bool | None, str]]:
    """The issue's three bars on the summarized rows: (claim, met / missed / None when a setting it needs has no
    runs, the figures behind the verdict).

    - accuracy at 25 %: max over QMoP and LearnPruner at keep 0.25 of the mean multimodal accuracy, against 0.95 x
      `none`'s mean;
    - beating random at 12.5 %: each method's mean minus random's mean, against the seed spread, taken as the larger
      of the two settings' ranges over seeds (max - min; with 3 seeds about 1.7 sample standard deviations);
    - bytes in proportion: every compressed setting's EP remote bytes per sample relative to `none` at most its MoE
      token visits per sample relative to `none` (the tokens a sample sends through the MoE layers, summed over
      the layers: a vision token removed after layer K saves only the layers after K).  Equality is "in proportion";
      below it, the removed tokens were the more remote ones."""
    by = {r["variant"]: r for r in rows}
    out: list[tuple[str, bool | None, str]] = []
    ref = by.get(REFERENCE)

    claim = f"at {BAR_KEEP:g} of the vision tokens the better of QMoP and LearnPruner keeps >= {BAR_FRACTION:.0%} " \
            "of the uncompressed multimodal accuracy"
    cands = [by[n] for n in (variant_name(m, BAR_KEEP) for m in LEARNED)
             if n in by and _number(by[n]["acc_multimodal"])]
    if ref is None or not _number(ref["acc_multimodal"]) or not cands:
        out.append((claim, None, "not measured"))
    else:
        best = max(cands, key=lambda r: r["acc_multimodal"])
        share = (f"{100 * best['acc_multimodal'] / ref['acc_multimodal']:.1f} %" if ref["acc_multimodal"]
                 else "none scores 0")           # a 4-step smoke run can
        out.append((claim, best["acc_multimodal"] >= BAR_FRACTION * ref["acc_multimodal"],
                    f"{best['variant']} {best['acc_multimodal']:.3f} vs none {ref['acc_multimodal']:.3f}: {share}"))

    rnd = by.get(variant_name("random", LOW_KEEP))
    for m in LEARNED:
        claim = f"{m} beats random pruning at {LOW_KEEP:g} by more than the seed spread"
        row = by.get(variant_name(m, LOW_KEEP))
        if rnd is None or row is None or not _number(row["acc_multimodal"]) or not _number(rnd["acc_multimodal"]):
            out.append((claim, None, "not measured"))
            continue
        diff = row["acc_multimodal"] - rnd["acc_multimodal"]
        spread = max(row["acc_multimodal_range"], rnd["acc_multimodal_range"])
        out.append((claim, diff > spread, f"{row['acc_multimodal']:.3f} - random {rnd['acc_multimodal']:.3f} = "
                                          f"{diff:+.3f} against a spread of {spread:.3f} ({row['seeds']} and "
                                          f"{rnd['seeds']} seeds)"))

    claim = "EP remote bytes per sample fall at least in proportion to the vision tokens removed"
    pruned = [r for r in rows if r["variant"] != REFERENCE and _number(r.get("bytes_per_sample_vs_none"))
              and _number(r.get("moe_tokens_per_sample_vs_none"))]
    if not pruned:                            # a ratio to `none` is nan without `none`
        out.append((claim, None, "not measured"))
    else:
        missed = [r for r in pruned if r["bytes_per_sample_vs_none"] > r["moe_tokens_per_sample_vs_none"]]
        shown = missed or pruned[:2]
        out.append((claim, not missed, ("missed by " if missed else f"all {len(pruned)} settings, e.g. ") + "; ".join(
            f"{r['variant']}: bytes {100 * r['bytes_per_sample_vs_none']:.1f} % of none's, MoE token visits "
            f"{100 * r['moe_tokens_per_sample_vs_none']:.1f} %" for r in shown)))
    return out


def bars_markdown(rows: list[dict]) -> str:
    verdict = {True: "**met**", False: "**missed**", None: "not measured"}
    return "\n".join(f"- {verdict[v]}: {claim} ({detail})" for claim, v, detail in bars(rows))


def _number(value) -> bool:
    """A figure that was measured: a number and not nan (metrics.json writes nan as null)."""
    return isinstance(value, (int, float)) and value == value


def fmt(value, spec: str) -> str:
    """`value` formatted, or n/a when it is missing or not a number."""
    return format(value, spec) if _number(value) else "n/a"


def _ratio(a: float, b: float) -> float:
    return a / b if b and a == a and b == b else float("nan")


def markdown_table(rows: list[dict]) -> str:
    head = ["method", "keep", "seeds", "vision tokens / image (into LLM -> last layers)",
            *(title for _, title, _ in FIGURES[:2]), "multimodal vs none", *(title for _, title, _ in FIGURES[2:]),
            "bytes/sample vs none"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        pm = lambda key, fmt: (f"{fmt.format(r[key])} ± {fmt.format(r[key + '_sd'])}"  # noqa: E731
                               if r[key] == r[key] else "n/a")
        pct = lambda v: f"{100 * v:.1f} %" if v == v else "n/a"  # noqa: E731
        tokens = (f"{r['vision_tokens_pre_llm']} -> {r['vision_tokens_kept']} of {r['vision_patches_per_image']}"
                  if r["vision_tokens_kept"] is not None else "n/a")
        cells = [r["method"], f"{r['keep_ratio']:g}", str(r["seeds"]), tokens,
                 *(pm(k, f) for k, _, f in FIGURES[:2]), pct(r["acc_multimodal_vs_none"]),
                 *(pm(k, f) for k, _, f in FIGURES[2:]), pct(r["bytes_per_sample_vs_none"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def task_table(rows: list[dict]) -> str:
    """Accuracy per task (each run's `acc_by_task`, mean over seeds): which questions a setting answers; empty
    when no run has per-task figures."""
    tasks = sorted(set().union(*(r.get("acc_by_task") or {} for r in rows)))
    if not tasks:
        return ""
    lines = ["| setting | " + " | ".join(tasks) + " |", "|" + "|".join(["---"] * (len(tasks) + 1)) + "|"]
    for r in rows:
        per = r.get("acc_by_task") or {}
        lines.append(f"| {r['variant']} | " + " | ".join(fmt(per.get(t), ".3f") for t in tasks) + " |")
    return "\n".join(lines)


def table_json(rows: list[dict], results: dict[str, list[dict]]) -> str:
    """The rows plus each setting's per-seed figures (strict JSON: nan -> null)."""
    def clean(v):
        return None if isinstance(v, float) and v != v else v
    per_seed = {name: [{k: clean(m.get(k)) for k in ("seed", "mlflow_run_id", *(k for k, _, _ in FIGURES))}
                       for m in runs] for name, runs in results.items() if runs}
    return json.dumps({"rows": [{k: clean(v) for k, v in r.items()} for r in rows], "runs": per_seed}, indent=2,
                      allow_nan=False)


def _series(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows by method, `none` joining every method's series as its keep-1.0 point."""
    ref = [r for r in rows if r["variant"] == REFERENCE]
    out: dict[str, list[dict]] = {}
    for r in rows:
        if r["variant"] != REFERENCE:
            out.setdefault(r["method"], list(ref)).append(r)
    return out or ({"none": ref} if ref else {})


def accuracy_plot(rows: list[dict], x_key: str, x_label: str, title: str):
    """Multimodal (solid) and language-only (dotted) accuracy against `x_key`, one colour per method, error bars
    the sample standard deviation over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(9, 4.8))
    colours = plt.get_cmap("tab10")
    for i, (method, members) in enumerate(_series(rows).items()):
        pts = sorted((r for r in members if r.get(x_key) is not None and r[x_key] == r[x_key]), key=lambda r: r[x_key])
        if not pts:
            continue
        xs = [r[x_key] for r in pts]
        for key, style, kind in (("acc_multimodal", "-o", "multimodal"), ("acc_language", ":^", "language-only")):
            ax.errorbar(xs, [r[key] for r in pts], yerr=[r[key + "_sd"] for r in pts], fmt=style, capsize=3,
                        color=colours(i % 10), label=f"{method}, {kind}", linewidth=1, markersize=4)
    for r in rows:
        if r["variant"] == REFERENCE and r.get(x_key) is not None and r[x_key] == r[x_key]:
            ax.scatter([r[x_key]] * 2, [r["acc_multimodal"], r["acc_language"]], marker="*", s=90, color="black",
                       zorder=3, label="none (every vision token)")
    if x_key == "vision_tokens_kept":      # budgets halve: 64, 32, 16, 8
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel(x_label, fontsize=8)
    ax.set_ylabel("held-out accuracy (mean ± sd over seeds)", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


PLOTS = {
    "accuracy_vs_tokens_kept.png": ("vision_tokens_kept", "vision tokens per image reaching the LLM's last layers",
                                    "accuracy vs vision tokens kept (canvas digits, SMoES gate)"),
    "accuracy_vs_bytes_per_sample.png": ("bytes_per_sample", "EP remote bytes per sample (all MoE layers, dispatch + "
                                         "combine, test split)", "accuracy vs expert-parallel traffic per sample"),
}


def write_report(rows: list[dict], results: dict[str, list[dict]], out: Path, parent) -> str:
    """table.md, table.json and the two plots into `out`, and to the MLflow parent run `parent` (a Tracker)."""
    import matplotlib.pyplot as plt

    tasks = task_table(rows)
    md = (markdown_table(rows) + (f"\n\nAccuracy per task (mean over seeds):\n\n{tasks}" if tasks else "")
          + "\n\nThe issue's bars (`compare_compression.bars`):\n" + bars_markdown(rows))
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(md + "\n")
    (out / "table.json").write_text(table_json(rows, results) + "\n")
    parent.log_file(out / "table.md")
    parent.log_file(out / "table.json")
    for name, (key, label, title) in PLOTS.items():
        fig = accuracy_plot(rows, key, label, title)
        fig.savefig(out / name, dpi=120)
        parent.log_figure(fig, name)
        plt.close(fig)
    parent.log_metrics({f"{r['variant']}/{k}": r[k] for r in rows
                        for k in ("acc_multimodal", "acc_language", "bytes_per_sample", "prefill_ms_per_sample",
                                  "tokens_per_s", "vision_tokens_kept") if isinstance(r.get(k), (int, float))})
    return md


def load_state(out: Path) -> dict:
    path = out / "state.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def save_state(out: Path, state: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "state.json").write_text(json.dumps(state, indent=2))
