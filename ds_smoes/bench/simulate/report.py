"""The simulation's outputs: a wide Markdown table, a long CSV, a check against the 2-rank
measurement, and a figure (matplotlib, Agg)."""
from __future__ import annotations

import csv
import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ds_smoes.bench.simulate.model import (VARIANT_LABELS, SimulationInputs, bin_limited_figures,  # noqa: E402
                                     rank_once_bytes_per_token, rank_once_figures, stock_bytes_per_token)

CSV_FIELDS = ("experts", "ep_size", "variant", "label", "bytes_per_token", "delta_vs_a_pct", "ranks_per_token",
              "remote_ranks_per_token", "cross_rank_rate")


def _by_cell(rows: list[dict]) -> dict[tuple[int, int], dict[str, dict]]:
    cells: dict[tuple[int, int], dict[str, dict]] = {}
    for r in rows:
        cells.setdefault((r["experts"], r["ep_size"]), {})[r["variant"]] = r
    return cells


def markdown_table(rows: list[dict]) -> str:
    """One line per (experts, ep_size): bytes per token of every variant, and (c), (d) relative to (a)."""
    variants = [v for v in VARIANT_LABELS if any(r["variant"] == v for r in rows)]
    head = ("| experts | ep_size | " + " | ".join(f"({v}) B/token" for v in variants)
            + " | (c) Δ vs (a) | (d) Δ vs (a) | (c) cross-rank rate | (c) ranks/token |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (e, ep), cell in sorted(_by_cell(rows).items()):
        c = cell["c"]
        lines.append(f"| {e} | {ep} | " + " | ".join(f"{cell[v]['bytes_per_token']:.1f}" for v in variants)
                     + f" | {c['delta_vs_a_pct']:+.1f}% | {cell['d']['delta_vs_a_pct']:+.1f}% "
                     f"| {c['cross_rank_rate']:.3f} | {c['ranks_per_token']:.3f} |")
    return "\n".join(lines)


def csv_table(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if isinstance(r[k], float) and not math.isfinite(r[k]) else r[k])
                         for k in CSV_FIELDS})
    return buf.getvalue()


def calibration(inputs: SimulationInputs, measured: dict, num_experts: int, ep_size: int) -> dict:
    """The model at the measured layout next to the measurement, per variant (bytes per token).
    (a), (b) match by construction (their capacity ratio comes from the measurement); (c) and
    (e) test the rank model, which assumes bins placed on their ranks."""
    k, d, b = inputs.smoes.k, inputs.hidden, inputs.element_size
    model = {"a": stock_bytes_per_token(k, inputs.capacity_ratio_a, ep_size, d, b),
             "b": stock_bytes_per_token(k, inputs.capacity_ratio_b, ep_size, d, b),
             "c": rank_once_bytes_per_token(rank_once_figures(inputs.smoes, num_experts, ep_size)
                                            .remote_ranks_per_token, d, b),
             "d": rank_once_bytes_per_token(bin_limited_figures(k, num_experts, ep_size).remote_ranks_per_token,
                                            d, b)}
    if inputs.topk is not None:
        model["e"] = rank_once_bytes_per_token(rank_once_figures(inputs.topk, num_experts, ep_size)
                                               .remote_ranks_per_token, d, b)
    return {key: {"model": value, "measured": measured[key]["bytes_per_token"]}
            for key, value in model.items() if key in measured}


def figure(rows: list[dict], title: str = ""):
    """Left: bytes per token against ep_size for each variant (solid: 64 experts or the largest
    simulated count up to it; thin: the other expert counts).  Right: (c)'s change against (a) over
    the (experts, ep_size) grid."""
    cells = _by_cell(rows)
    experts = sorted({e for e, _ in cells})
    eps = sorted({ep for _, ep in cells})
    main_e = max([e for e in experts if e <= 64] or experts)
    fig, (ax, hm) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = {"a": "tab:gray", "b": "tab:orange", "c": "tab:blue", "d": "tab:green", "e": "tab:purple"}
    for v, label in VARIANT_LABELS.items():
        for e in experts:
            pts = [(ep, cells[(e, ep)][v]["bytes_per_token"]) for ep in eps if (e, ep) in cells and v in cells[(e, ep)]]
            if not pts:
                continue
            xs, ys = zip(*pts)
            if e == main_e:
                ax.plot(xs, ys, "o-", color=colors[v], label=f"({v}) {label}", lw=2)
            else:
                ax.plot(xs, ys, "-", color=colors[v], alpha=0.25, lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("expert-parallel ranks (ep_size)")
    ax.set_ylabel("remote bytes per token and MoE layer")
    ax.set_title(f"expected EP traffic ({main_e} experts bold, others faint)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    grid = [[cells[(e, ep)]["c"]["delta_vs_a_pct"] if (e, ep) in cells else float("nan") for ep in eps]
            for e in experts]
    im = hm.imshow(grid, cmap="RdYlGn_r", vmin=-100, vmax=0, aspect="auto", origin="lower")
    hm.set_xticks(range(len(eps)), [str(x) for x in eps])
    hm.set_yticks(range(len(experts)), [str(x) for x in experts])
    hm.set_xlabel("ep_size")
    hm.set_ylabel("experts")
    hm.set_title("(c) remote bytes vs (a), %", fontsize=9)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if math.isfinite(value):
                hm.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=hm, fraction=0.04)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def highlights(rows: list[dict], experts: int = 64) -> list[str]:
    """Short lines: (c) and (d) against (a) at `experts` experts (or the nearest simulated count)."""
    cells = _by_cell(rows)
    counts = sorted({e for e, _ in cells})
    if not counts:
        return []
    e = min(counts, key=lambda x: (abs(x - experts), x))
    out = []
    for (ee, ep), cell in sorted(cells.items()):
        if ee == e:
            out.append(f"{e} experts, ep_size {ep}: (a) {cell['a']['bytes_per_token']:.0f} B/token, (c) "
                       f"{cell['c']['bytes_per_token']:.0f} ({cell['c']['delta_vs_a_pct']:+.1f}%), (d) "
                       f"{cell['d']['bytes_per_token']:.0f} ({cell['d']['delta_vs_a_pct']:+.1f}%); (c) cross-rank "
                       f"rate {cell['c']['cross_rank_rate']:.3f}")
    return out


def save_figure(fig, path) -> None:
    fig.savefig(path, dpi=120)
    plt.close(fig)
