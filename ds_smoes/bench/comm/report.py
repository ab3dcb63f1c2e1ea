"""From the worker's raw measurements to the benchmark's figures, table and JSON (pure functions).

Units (docs/bench.md):
- bytes_per_token: token vectors sent to *other* EP ranks in the forward, dispatch + combine,
  summed over the ranks and the MoE layers, divided by (valid tokens x MoE layers): the remote
  bytes of one MoE layer per valid token.  metadata_bytes_per_token (rank_once's counts and
  per-row routing) is reported beside it; total_bytes_per_token adds both.
- cross_rank_rate, ranks_per_token, remote_pairs_per_token: token-weighted over ranks, layers
  and batches, valid tokens only, under the layout the dispatch really used.
- expert_rows_per_token (busiest rank): the rows the busiest EP rank's experts run on in each call
  (padding included for the stock dispatch, whose experts run on the whole [E/ep, capacity] buffer),
  summed over calls and MoE layers, per valid token and MoE layer; expert_load_imbalance: the busiest
  rank's rows over the average rank's (1 = balanced).  Where expert compute, not the wire, limits a
  step (small models on CPU), these explain ms_per_step better than the bytes do.
- ms_per_step: median over the timed rounds of one fwd+bwd of the whole model on one batch per
  rank (the slowest rank's time).
"""
from __future__ import annotations

import json
import math
import statistics

from ds_smoes.bench.simulate.model import RouterProfile, SimulationInputs, capacity_ratio_from_bytes
from ds_smoes.bench.comm.variants import REFERENCE, VARIANTS
from ds_smoes.core.errors import ConfigError

PAPER_COMM_REDUCTION_PCT = 56.1
ACCURACY_KEYS = ("acc_multimodal", "acc_language", "acc_overall")


def variant_figures(raw: dict) -> dict:
    """Figures of one (source, variant) from its raw per-layer tallies."""
    layers = raw["layers"]
    tokens = sum(l["tokens"] for l in layers)
    remote = sum(l["dispatch_bytes"] + l["combine_bytes"] for l in layers)
    metadata = sum(l["metadata_bytes"] for l in layers)
    per = (lambda x: x / tokens) if tokens else (lambda x: float("nan"))  # noqa: E731
    counts_MJ = [[sum(l["own_route_counts_MJ"][m][j] for l in layers) for j in range(len(layers[0]
                  ["own_route_counts_MJ"][m]))] for m in range(2)]
    times = raw.get("step_seconds", [])
    # measurements from before the expert-work tally have none: nan, not 0
    busiest = sum(l.get("expert_rows_busiest", float("nan")) for l in layers)
    mean = sum(l.get("expert_rows_mean", float("nan")) for l in layers)
    quartiles = statistics.quantiles(times, n=4) if len(times) >= 2 else [float("nan")] * 3
    return {
        "bytes_per_token": per(remote),
        "metadata_bytes_per_token": per(metadata),
        "total_bytes_per_token": per(remote + metadata),
        "bytes_per_token_per_layer": [(l["dispatch_bytes"] + l["combine_bytes"]) / l["tokens"] if l["tokens"]
                                      else float("nan") for l in layers],
        "cross_rank_rate": per(sum(l["cross_rank_tokens"] for l in layers)),
        "ranks_per_token": per(sum(l["rank_token_sum"] for l in layers)),
        "remote_pairs_per_token": per(sum(l["remote_pairs"] for l in layers)),
        "expert_rows_per_token": per(busiest),
        "expert_load_imbalance": busiest / mean if mean else float("nan"),
        "ms_per_step": raw.get("ms_per_step", float("nan")),
        "ms_per_step_quartiles": [1000 * q for q in quartiles],
        "step_seconds": list(times),  # per timed round, aligned across variants (paired comparisons)
        **{k: raw.get(k, float("nan")) for k in ACCURACY_KEYS},
        "num_questions": raw.get("num_multimodal", 0) + raw.get("num_language", 0),
        "valid_tokens": tokens // len(layers) if layers else 0,
        "measured_remote_bytes": remote,
        "expected_remote_bytes": sum(l["expected_bytes"] for l in layers),
        "own_route_counts_MJ": counts_MJ,
        "bins_per_layer": [l["bins"] for l in layers],
        "physical_per_layer": [l.get("physical") for l in layers],
        "bins_placed_on_ranks": all(l.get("bins_placed_on_ranks", False) for l in layers),
    }


def assemble(raw: dict, runs: dict | None = None) -> dict:
    """The benchmark result: setup, per source and variant the figures with deltas to (a), and the
    issue's done criteria on the trained models.  `runs`: gate -> {run_dir, metrics} of the trained
    models (their reported accuracy is kept beside the re-evaluated one)."""
    out = {"setup": dict(raw["setup"]), "sources": {}}
    for source, variants in raw["sources"].items():
        rows = {}
        for key, raw_v in variants.items():
            v = VARIANTS[key]
            fig = {"variant": key, "label": v.label, "gate": v.gate, "dispatch": v.dispatch,
                   "max_bins_per_token": v.max_bins_per_token, **variant_figures(raw_v)}
            if source == "trained" and runs and v.gate in runs:
                fig["run_dir"] = str(runs[v.gate]["run_dir"])
                fig["reported_accuracy"] = {k: runs[v.gate]["metrics"].get(k) for k in ACCURACY_KEYS}
            rows[key] = fig
        ref = rows.get(REFERENCE)
        for fig in rows.values():
            fig["delta_bytes_vs_a_pct"] = _pct(fig["bytes_per_token"], ref["bytes_per_token"]) if ref else None
            fig["delta_ms_vs_a_pct"] = _pct(fig["ms_per_step"], ref["ms_per_step"]) if ref else None
        out["sources"][source] = rows
    trained = out["sources"].get("trained", {})
    if "a" in trained and "c" in trained:
        out["done_criteria"] = done_criteria(trained["a"], trained["c"])
    return out


def _pct(value: float, reference: float) -> float | None:
    if reference is None or not reference or not math.isfinite(reference) or not math.isfinite(value):
        return None
    return 100.0 * (value - reference) / reference


def done_criteria(a: dict, c: dict) -> dict:
    """The issue's bar on the trained models: (c) sends >= 56.1 % fewer remote bytes per token than
    (a), with accuracy no worse (overall exact match) and a faster fwd+bwd."""
    reduction = -_pct(c["bytes_per_token"], a["bytes_per_token"]) if _pct(c["bytes_per_token"],
                                                                          a["bytes_per_token"]) is not None else None
    acc_delta = {k: c[k] - a[k] for k in ACCURACY_KEYS}
    return {
        "bytes_reduction_c_vs_a_pct": reduction,
        "bytes_target_pct": PAPER_COMM_REDUCTION_PCT,
        "bytes_met": reduction is not None and reduction >= PAPER_COMM_REDUCTION_PCT,
        "accuracy_delta_c_minus_a": acc_delta,
        "accuracy_met": acc_delta["acc_overall"] >= 0,
        "ms_per_step_a": a["ms_per_step"], "ms_per_step_c": c["ms_per_step"],
        **paired_speed(a.get("step_seconds") or [], c.get("step_seconds") or []),
    }


SPEED_ALPHA = 0.05  # one-sided sign test for "(c) is faster than (a)"; two-sided 95 % interval for the median


def sign_test_p(faster: int, slower: int) -> float:
    """One-sided sign test: P(at least `faster` of n = faster + slower fair coin flips come up
    "faster"), i.e. how likely so many wins are if (c) and (a) were equally fast.  Ties are left
    out, as usual for the sign test.  1.0 when n = 0."""
    n = faster + slower
    if n == 0:
        return 1.0
    return sum(math.comb(n, i) for i in range(faster, n + 1)) / 2 ** n


def median_interval(sorted_values: list[float], alpha: float = SPEED_ALPHA) -> tuple[float, float] | None:
    """Distribution-free (1 - alpha) interval for the median: order statistics (j, n + 1 - j) with j
    the largest rank such that P(Binomial(n, 1/2) < j) <= alpha / 2.  None when n is too small for one."""
    n = len(sorted_values)
    tail, j = 0.0, 0
    while j < n:
        nxt = tail + math.comb(n, j) / 2 ** n  # P(B <= j), i.e. P(B < j + 1)
        if nxt > alpha / 2:
            break
        tail, j = nxt, j + 1
    if j == 0:
        return None
    return sorted_values[j - 1], sorted_values[n - j]


def paired_speed(a_seconds: list[float], c_seconds: list[float]) -> dict:
    """(c) against (a) round by round (both ran in every timed round, on the same batch).

    diff_ms_median / diff_ms_quartiles / diff_ms_ci95: of the per-round differences (c) - (a), in ms
    (the interval is distribution-free, `median_interval`); c_faster_share: the share of rounds in
    which (c) was faster; sign_test_p: one-sided sign test of "(c) faster".  speed_met: (c) was
    faster in significantly more than half of the rounds (sign_test_p < SPEED_ALPHA), so a median
    difference that noise could produce does not count."""
    diffs = sorted(1000.0 * (c - a) for a, c in zip(a_seconds, c_seconds))
    if not diffs:
        return {"diff_ms_median": None, "diff_ms_quartiles": None, "diff_ms_ci95": None, "c_faster_share": None,
                "sign_test_p": None, "rounds": 0, "speed_met": False}
    q = statistics.quantiles(diffs, n=4) if len(diffs) > 1 else [diffs[0]] * 3
    faster, slower = sum(d < 0 for d in diffs), sum(d > 0 for d in diffs)
    p = sign_test_p(faster, slower)
    interval = median_interval(diffs)
    return {"diff_ms_median": statistics.median(diffs), "diff_ms_quartiles": [q[0], q[2]],
            "diff_ms_ci95": list(interval) if interval else None, "c_faster_share": faster / len(diffs),
            "sign_test_p": p, "rounds": len(diffs), "speed_met": p < SPEED_ALPHA}


def paired_ratio(new_seconds: list[float], ref_seconds: list[float]) -> dict:
    """Per round new / reference (both ran in every round, on the same batch): median and its 95 % interval."""
    ratios = sorted(n / r for n, r in zip(new_seconds, ref_seconds) if r > 0)
    if not ratios:
        return {"median": None, "ci95": None, "rounds": 0}
    interval = median_interval(ratios)
    return {"median": statistics.median(ratios), "ci95": list(interval) if interval else None, "rounds": len(ratios),
            "new_ms": 1000 * statistics.median(new_seconds), "ref_ms": 1000 * statistics.median(ref_seconds)}


def _fmt(value, spec: str, none: str = "n/a") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return none
    return format(value, spec)


def markdown_table(rows: dict) -> str:
    """One source's variants as a Markdown table."""
    head = ("| variant | routing + dispatch | bytes / token | Δ vs (a) | cross-rank rate | ranks / token | "
            "expert rows / token (busiest rank) | imbalance | "
            "ms / step | Δ ms vs (a) | acc multimodal | acc language | acc overall |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key, r in rows.items():
        lines.append(f"| ({key}) | {r['label']} | {_fmt(r['bytes_per_token'], '.1f')} "
                     f"| {_fmt(r['delta_bytes_vs_a_pct'], '+.1f')}% | {_fmt(r['cross_rank_rate'], '.3f')} "
                     f"| {_fmt(r['ranks_per_token'], '.3f')} | {_fmt(r.get('expert_rows_per_token'), '.2f')} "
                     f"| {_fmt(r.get('expert_load_imbalance'), '.2f')} | {_fmt(r['ms_per_step'], '.1f')} "
                     f"| {_fmt(r['delta_ms_vs_a_pct'], '+.1f')}% | {_fmt(r['acc_multimodal'], '.4f')} "
                     f"| {_fmt(r['acc_language'], '.4f')} | {_fmt(r['acc_overall'], '.4f')} |")
    return "\n".join(lines)


def report_markdown(result: dict) -> str:
    """Every source's table, the setup line and the done criteria."""
    s = result["setup"]
    parts = [(f"EP size {s['ep_size']} ({s['world_size']} gloo ranks), {s['num_experts']} experts, top-{s['k']}, "
              f"{s['moe_layers']} MoE layers, hidden {s['d_model']}; {s['tokens']} test tokens "
              f"({s['batches_per_rank']} batches of {s['batch_size']} sequences per rank); ms/step: median of "
              f"{s['repeats']} rounds after {s['warmup']} warm-up, {s['threads_per_rank']} thread(s) per rank. "
              "bytes / token: remote bytes (dispatch + combine, forward) per valid token and MoE layer; "
              "expert rows / token: rows the busiest EP rank's experts run on (stock: the padded buffer), per "
              "valid token and MoE layer; imbalance: busiest rank over the average rank.")]
    titles = {"trained": "trained by the demo recipe", "init": "at initialisation (same seed)"}
    for source, rows in result["sources"].items():
        parts.append(f"\n### Models {titles.get(source, source)}\n\n{markdown_table(rows)}")
    crit = result.get("done_criteria")
    if crit:
        parts.append("\n" + "\n".join(done_lines(crit)))
    return "\n".join(parts) + "\n"


def done_lines(crit: dict) -> list[str]:
    ok = lambda flag: "met" if flag else "NOT met"  # noqa: E731
    acc = crit["accuracy_delta_c_minus_a"]
    return [
        (f"- (c) vs (a), remote bytes per token: {_fmt(crit['bytes_reduction_c_vs_a_pct'], '.1f')}% fewer "
         f"(target >= {crit['bytes_target_pct']}%): {ok(crit['bytes_met'])}"),
        (f"- (c) - (a), accuracy: overall {acc['acc_overall']:+.4f}, multimodal {acc['acc_multimodal']:+.4f}, "
         f"language {acc['acc_language']:+.4f} (target >= 0 overall): {ok(crit['accuracy_met'])}"),
        (f"- ms per step: (c) {crit['ms_per_step_c']:.1f} vs (a) {crit['ms_per_step_a']:.1f}; paired over "
         f"{crit.get('rounds', 'n/a')} rounds, (c) - (a) median {_fmt(crit['diff_ms_median'], '+.2f')} ms (95% interval "
         + (", ".join(f"{q:+.2f}" for q in crit["diff_ms_ci95"]) if crit.get("diff_ms_ci95") else "n/a")
         + "; quartiles " + (", ".join(f"{q:+.2f}" for q in crit["diff_ms_quartiles"]) if crit["diff_ms_quartiles"]
                               else "n/a")
         + f"), (c) faster in {_fmt(100 * crit['c_faster_share'] if crit['c_faster_share'] is not None else None, '.0f')}%"
         f" of rounds, sign test p = {_fmt(crit.get('sign_test_p'), '.3g')} (target: (c) faster, p < {SPEED_ALPHA}): "
         f"{ok(crit['speed_met'])}"),
    ]


def strict_json(obj) -> str:
    """JSON without NaN or infinities (they become null)."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(obj), indent=2, allow_nan=False)


def simulation_inputs(result: dict, source: str | None = None) -> tuple[SimulationInputs, str]:
    """The simulator's inputs from a benchmark result: the SMoES router's own-route profile (from
    variant c, else b: the same routing), the top-k router's (from a) and the stock capacity ratios
    measured for (a) and (b).  Bin-limited routing (d) needs no statistics.  Uses the trained models
    when measured, else the initialised ones; returns (inputs, source used)."""
    sources = result.get("sources", {})
    source = source or ("trained" if "trained" in sources else "init")
    rows = sources.get(source)
    if not rows:
        raise ConfigError(f"the benchmark result has no {source!r} models (it has {sorted(sources)})")
    s = result["setup"]
    k, ep, d = s["k"], s["ep_size"], s["d_model"]
    elt = s["element_size"]
    smoes_row = rows.get("c") or rows.get("b")
    if smoes_row is None or "a" not in rows or "b" not in rows:
        raise ConfigError("the simulation needs variants (a), (b) and (c) measured; run the benchmark with them")
    topk_row = rows.get("a")
    return SimulationInputs(
        smoes=RouterProfile.from_counts(k, smoes_row["own_route_counts_MJ"]),
        topk=RouterProfile.from_counts(k, topk_row["own_route_counts_MJ"]),
        capacity_ratio_a=capacity_ratio_from_bytes(rows["a"]["bytes_per_token"], k, ep, d, elt),
        capacity_ratio_b=capacity_ratio_from_bytes(rows["b"]["bytes_per_token"], k, ep, d, elt),
        hidden=d, element_size=elt), source
