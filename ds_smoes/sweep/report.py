"""The comparison of a sweep's trials, read from MLflow (never from Ray's files).

`collect` turns the parent's child runs into `TrialRow`s; everything else is pure Python over
them: the per-trial table, the table of mean and spread over seeds, CSV and Markdown, and the two
figures the parent run carries (accuracy against communication, MSI per layer per trial).
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field

from ds_smoes.sweep.common import SEED_FIELDS, short_names

# (metric key, column title, format)
METRICS = [
    ("acc_multimodal", "acc multimodal", "{:.4f}"),
    ("acc_language", "acc language", "{:.4f}"),
    ("acc_overall", "acc overall", "{:.4f}"),
    ("msi", "MSI", "{:.3f}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("cross_rank_rate", "cross-rank rate", "{:.3f}"),
    ("ranks_per_token", "ranks/token", "{:.3f}"),
    ("remote_pairs_per_token", "remote pairs/token", "{:.3f}"),
    ("bytes_per_token", "remote bytes/token", "{:,.0f}"),
    # issue 19: per test conversation over every MoE layer, the prefill, and the vision tokens per image that reach
    # the LLM's last layers (columns appear when the trials logged them)
    ("bytes_per_sample", "remote bytes/sample", "{:,.0f}"),
    ("prefill_ms_per_sample", "prefill ms/sample", "{:.2f}"),
    ("vision_tokens_kept", "vision tokens kept", "{:.0f}"),
    ("wall_seconds", "wall s", "{:.0f}"),
]
# measured communication, preferred as the x axis of the accuracy plot: key -> axis label
BYTES_KEYS = {"bytes_per_token": "remote bytes per token and MoE layer (measured by the EP dispatch)"}


@dataclass
class TrialRow:
    trial_id: str
    index: int
    name: str
    status: str
    run_id: str
    values: dict[str, str]
    metrics: dict[str, float]
    msi_per_layer: list[float] = field(default_factory=list)
    error: str = ""


def collect(store, parent_run_id: str) -> list[TrialRow]:
    parent = store.get(parent_run_id)
    axes = json.loads(parent.params.get("sweep.axes", "[]"))
    rows = []
    for run in store.children(parent_run_id):
        tid = run.tags.get("sweep.trial_id") or run.name.split(":", 1)[0]
        layers = [v for _, v in store.history(run.run_id, "msi_layer")] if "msi_layer" in run.metrics else []
        rows.append(TrialRow(
            trial_id=tid, index=int(run.tags.get("sweep.trial_index", 10**6)), name=run.name,
            status=run.status, run_id=run.run_id, values={a: run.params.get(a, "") for a in axes},
            metrics={k: run.metrics[k] for k, _, _ in METRICS if k in run.metrics}, msi_per_layer=layers,
            error=(run.tags.get("sweep.error", "").strip().splitlines() or [""])[-1]))
    return sorted(rows, key=lambda r: (r.index, r.trial_id))


def _columns(rows: list[TrialRow]) -> list[tuple[str, str, str]]:
    return [m for m in METRICS if any(m[0] in r.metrics for r in rows)]


def _markdown(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def _axes(rows: list[TrialRow]) -> list[str]:
    return list(rows[0].values) if rows else []


def trial_table(rows: list[TrialRow], fmt: str = "md") -> str:
    """One line per trial: its axis values, status and final figures."""
    axes, cols = _axes(rows), _columns(rows)
    short = short_names(axes)
    if fmt == "csv":
        out = io.StringIO()
        w = csv.writer(out)
        w.writerow(["trial", *axes, "status", *(k for k, _, _ in cols), "msi_per_layer", "mlflow_run_id", "error"])
        for r in rows:
            w.writerow([r.trial_id, *(r.values[a] for a in axes), r.status,
                        *(r.metrics.get(k, "") for k, _, _ in cols), json.dumps(r.msi_per_layer), r.run_id, r.error])
        return out.getvalue()
    body = [[r.trial_id, *(r.values[a] for a in axes), r.status,
             *(f.format(r.metrics[k]) if k in r.metrics else "-" for k, _, f in cols)] for r in rows]
    text = _markdown(["trial", *(short[a] for a in axes), "status", *(t for _, t, _ in cols)], body)
    errors = [f"- {r.trial_id}: {r.error}" for r in rows if r.status != "FINISHED" and r.error]
    return text + ("\n\nfailed trials:\n" + "\n".join(errors) if errors else "")


def seed_groups(rows: list[TrialRow]) -> list[tuple[dict[str, str], list[TrialRow]]]:
    """Finished trials grouped by every axis except the seeds, in first-seen order."""
    keys = [a for a in _axes(rows) if a not in SEED_FIELDS]
    groups: dict[tuple, list[TrialRow]] = {}
    for r in rows:
        if r.status == "FINISHED":
            groups.setdefault(tuple(r.values[k] for k in keys), []).append(r)
    return [(dict(zip(keys, k)), members) for k, members in groups.items()]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n-1); the spread of one value is 0."""
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def seed_table(rows: list[TrialRow], fmt: str = "md") -> str:
    """Mean ± sample standard deviation over seeds, one line per setting of the other axes."""
    cols = _columns(rows)
    groups = seed_groups(rows)
    keys = list(groups[0][0]) if groups else [a for a in _axes(rows) if a not in SEED_FIELDS]
    short = short_names(keys)
    stats = [(values, len(members), {k: mean_std([m.metrics[k] for m in members if k in m.metrics])
                                     for k, _, _ in cols if any(k in m.metrics for m in members)})
             for values, members in groups]
    if fmt == "csv":
        out = io.StringIO()
        w = csv.writer(out)
        w.writerow([*keys, "seeds", *(f"{k}_{s}" for k, _, _ in cols for s in ("mean", "std"))])
        for values, n, st in stats:
            w.writerow([*values.values(), n, *(x for k, _, _ in cols for x in (st.get(k) or ("", "")))])
        return out.getvalue()
    body = [[*values.values(), str(n), *(f"{f.format(st[k][0])} ± {f.format(st[k][1])}" if k in st else "-"
                                         for k, _, f in cols)] for values, n, st in stats]
    return _markdown([*(short[k] for k in keys), "seeds", *(t for _, t, _ in cols)], body) if body else \
        "(no finished trials)"


# -- figures ----------------------------------------------------------------------------------------------
def accuracy_vs_communication(rows: list[TrialRow]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.status == "FINISHED"]
    measured = [k for k in BYTES_KEYS if done and all(k in r.metrics for r in done)]
    key = measured[0] if measured else "remote_pairs_per_token"
    xlabel = (BYTES_KEYS[key] if measured else
              "remote (token, expert) pairs per token, from routing\n(an estimate of dispatch traffic; "
              "bytes are not measured yet)")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for metric, marker, label in (("acc_multimodal", "o", "multimodal"), ("acc_language", "^", "language-only")):
        pts = [(r.metrics[key], r.metrics[metric], r.trial_id) for r in done
               if key in r.metrics and metric in r.metrics]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"accuracy, {label}")
            for x, y, tid in pts:
                ax.annotate(tid, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("held-out accuracy")
    ax.set_title("accuracy vs expert-parallel communication, per trial", fontsize=9)
    ax.grid(alpha=0.3)
    if done:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def msi_per_layer(rows: list[TrialRow]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.status == "FINISHED" and r.msi_per_layer]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab20")
    for i, r in enumerate(done):
        ax.plot(range(len(r.msi_per_layer)), r.msi_per_layer, marker="o", label=r.name, linewidth=1,
                color=colors(i % 20), linestyle="-" if i < 20 else "--")
    layers = max((len(r.msi_per_layer) for r in done), default=0)
    ax.set_xticks(range(layers), [f"MoE layer {l}" for l in range(layers)])
    ax.set_ylabel("MSI (test split)")
    ax.set_ylim(0, 1)
    ax.set_title("modality specialisation index per MoE layer, per trial", fontsize=9)
    ax.grid(alpha=0.3)
    if done:
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def log_to_parent(store, parent_run_id: str, rows: list[TrialRow]) -> None:
    """The comparison as artifacts of the parent run: tables (CSV, Markdown) and the two figures."""
    import matplotlib.pyplot as plt

    store.log_text(parent_run_id, trial_table(rows, "csv"), "comparison.csv")
    store.log_text(parent_run_id, trial_table(rows) + "\n\n## mean ± spread over seeds\n\n" + seed_table(rows)
                   + "\n", "comparison.md")
    store.log_text(parent_run_id, seed_table(rows, "csv"), "comparison_over_seeds.csv")
    for name, make in (("accuracy_vs_communication.png", accuracy_vs_communication),
                       ("msi_per_layer.png", msi_per_layer)):
        fig = make(rows)
        store.log_figure(parent_run_id, fig, name)
        plt.close(fig)


def render(store, parent_run_id: str, fmt: str = "md") -> str:
    """The report for one past sweep: header, per-trial table, mean and spread over seeds."""
    parent = store.get(parent_run_id)
    rows = collect(store, parent_run_id)
    if fmt == "csv":
        return trial_table(rows, "csv")
    done = sum(r.status == "FINISHED" for r in rows)
    head = (f"sweep {parent.tags.get('sweep.id', parent.name)}  (MLflow parent run {parent.run_id}, experiment "
            f"{store.experiment_name(parent.experiment_id)!r}, status {parent.status})\n"
            f"{len(rows)} trials: {done} finished, {len(rows) - done} not finished\n")
    return head + "\n" + trial_table(rows) + "\n\nmean and spread (sample std) over seeds:\n" + seed_table(rows)
