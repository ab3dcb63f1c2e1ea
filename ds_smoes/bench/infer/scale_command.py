"""`python -m ds_smoes.bench infer --shapes [SHAPE ...]`: serving one decoder block at published shapes, and
the projection to the whole model at 2..64 EP ranks (docs/bench.md, "Inference at scale").

1. The SMoES router's statistics (as `bench scale` takes them: a `bench comm` result, or measured on a
   trained run, default runs/demo): the routes the routed variants draw.
2. The block on 2 ranks (`ds_smoes.bench.infer.block_worker`): per shape, the five variants on vision-heavy
   prefills and on decode steps after a cache, in paired rounds.
3. Figures per variant and workload: prefill ms, decode ms per token, tokens/s, remote bytes per token, peak
   memory; time ratios against top-k with 95 % intervals; the issue's bars.
4. The projection (`ds_smoes.bench.infer.projection`) for each shape's whole model, per interconnect, and its
   check: the bytes its formula predicts at 2 ranks against the bytes the block measured.
5. infer_scale.json / infer_scale.md under --out and one MLflow run.
"""
from __future__ import annotations

import json
import statistics
import time

from ds_smoes.bench import runs
from ds_smoes.bench.comm.report import paired_ratio
from ds_smoes.bench.infer.block import REFERENCE, TEXT_TOKENS, VARIANT_LABELS, VARIANTS
from ds_smoes.bench.infer.projection import (EP_SIZES, INTERCONNECTS, ModelLayers, breakeven_bandwidth,
                                             bytes_per_token, comm_seconds, crossover, fitted_capacity_ratio, project)
from ds_smoes.bench.infer.shapes import BLOCK_SHAPES
from ds_smoes.bench.scale.shapes import PUBLISHED
from ds_smoes.bench.scale.command import default_profile_source, native_bf16, profile_from
from ds_smoes.bench.scale.synthetic_routes import OwnRouteModel
from ds_smoes.bench.simulate.model import RouterProfile
from ds_smoes.core.errors import ConfigError

BARS = {"decode_ratio_smoes_vs_topk": 1.05, "prefill_bytes_ratio_smoes_vs_topk": 0.5}
DEFAULTS = {"prefill": ["576:1", "2304:1"], "decode_batches": [1, 8, 64], "decode_context": 640,
            "decode_steps": 2, "warmup": 1, "repeats": 6}
ELEMENT_BYTES = {"fp32": 4, "bf16": 2}


def _echo(message: str) -> None:
    print(message, flush=True)


def resolve(args) -> None:
    """Fill the block benchmark's defaults (the `infer` command's own defaults are for the demo-sized models)."""
    for name, value in DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    args.shapes = args.shapes or list(PUBLISHED)
    unknown = [s for s in args.shapes if s not in BLOCK_SHAPES]
    if unknown:
        raise ConfigError(f"--shapes {unknown}: one of {sorted(BLOCK_SHAPES)}")
    if set(args.variants) - set(VARIANTS):
        raise ConfigError(f"--variants {sorted(set(args.variants) - set(VARIANTS))} are not served at --shapes: "
                          f"one of {list(VARIANTS)}")
    variants = list(args.variants) if args.variants_given else list(VARIANTS)
    for needed in (REFERENCE, "dense"):
        if needed not in variants:
            variants.insert(0, needed)   # the ratios' reference and the dense layers of the projection
    args.variants = variants
    for item in args.prefill:
        image, sep, batch = item.partition(":")
        if not sep or not image.isdigit() or not batch.isdigit() or int(batch) < 1:
            raise ConfigError(f"--prefill {item!r}: IMAGE_TOKENS:BATCH, e.g. 576:1")
    if min(args.decode_batches, default=1) < 1 or args.decode_context < 1 or args.decode_steps < 1:
        raise ConfigError("--decode-batches, --decode-context and --decode-steps must be >= 1")
    if args.repeats < 1 or args.warmup < 0:
        raise ConfigError("--repeats must be >= 1 and --warmup >= 0")
    if args.dtype is None:
        native, seen = native_bf16()
        args.dtype = "bf16" if native else "fp32"
        args.dtype_reason = f"bf16: native here ({seen})" if native else f"fp32: no native bf16 here ({seen})"
    else:
        args.dtype_reason = "asked for (--dtype)"


# -- figures -------------------------------------------------------------------------------------------
def shape_figures(raw: dict, profile: RouterProfile, ep_size: int) -> dict:
    """Per workload and variant: ms, tokens/s, bytes per token, peak MB, the ratio against top-k; the bars; the
    projection and its check."""
    shape = BLOCK_SHAPES[raw["shape"]]
    elt = ELEMENT_BYTES[raw["dtype"]]
    names = list(raw["seconds"])
    rows = []
    for w, load in enumerate(raw["workloads"]):
        steps = load.get("steps", 1)
        per = {}
        for v in names:
            secs = [rnd[w] for rnd in raw["seconds"][v]]
            med = statistics.median(secs)
            nbytes = raw["remote_bytes"][v][w]
            per[v] = {"ms": 1000 * med / steps, "tokens_per_s": ep_size * load["tokens_per_rank"] / med,
                      "bytes_per_token": nbytes / (ep_size * load["tokens_per_rank"]),
                      "peak_mb": (raw["peak_bytes_rank0"][v][w] / 2 ** 20) if raw.get("peak_bytes_rank0") else None,
                      "vs_topk": paired_ratio(secs, [rnd[w] for rnd in raw["seconds"][REFERENCE]])}
        rows.append({**load, "variants": per})
    bars = {}
    if "smoes" in names:
        decode = [r["variants"]["smoes"]["vs_topk"]["median"] for r in rows if r["kind"] == "decode"]
        ref_bytes = [(r["variants"]["smoes"]["bytes_per_token"], r["variants"][REFERENCE]["bytes_per_token"])
                     for r in rows if r["kind"] == "prefill"]
        prefill = [a / b if b else None for a, b in ref_bytes]
        bars["decode_ratio_smoes_vs_topk"] = _bar(decode, BARS["decode_ratio_smoes_vs_topk"])
        bars["prefill_bytes_ratio_smoes_vs_topk"] = _bar(prefill, BARS["prefill_bytes_ratio_smoes_vs_topk"])
    return {"shape": raw["shape"], "label": shape.label, "dtype": raw["dtype"], "stand_in": shape.stand_in,
            "rows": rows, "bars": bars, "build_seconds": raw.get("build_seconds"),
            "projection": projection(rows, shape, profile, elt, ep_size)}


def _bar(values: list, bar: float) -> dict:
    known = [v for v in values if v is not None]
    worst = max(known) if known else None
    return {"values": values, "worst": worst, "bar": bar, "met": worst is not None and worst <= bar}


def projection(rows: list[dict], shape, profile: RouterProfile, elt: int, ep_size: int) -> dict:
    """Whole-model prefill seconds and decode tokens/s per interconnect and EP size, the crossover, and the check
    of the bytes formula at the measured EP size."""
    m = shape.moe
    layers = ModelLayers(shape.layers, shape.moe_layers)
    # the router's statistics carried to the shape's k as the block's routes were drawn (the beta-binomial fit)
    fitted = OwnRouteModel.fit(profile)
    profile = RouterProfile(m.k, profile.vision_share, (tuple(fitted.own_probs(0, m.k)),
                                                        tuple(fitted.own_probs(1, m.k))))
    sizes = [r for r in EP_SIZES if r <= m.num_experts and m.num_experts % r == 0]
    out = {"layers": shape.layers, "moe_layers": shape.moe_layers, "workloads": [], "check": []}
    for row in rows:
        per = row["variants"]
        steps = row.get("steps", 1)
        compute_s = {v: f["ms"] / 1000 for v, f in per.items()}     # per forward (a decode step)
        capacity = fitted_capacity_ratio(per[REFERENCE]["bytes_per_token"], m.k, m.hidden, elt, ep_size)

        share = row["image_tokens"] / (row["image_tokens"] + TEXT_TOKENS) if row["kind"] == "prefill" else 0.0

        def bytes_fn(variant, ep, capacity=capacity, share=share):
            return bytes_per_token(variant, ep, m.num_experts, m.k, m.hidden, elt, profile, capacity, share)

        tokens = row["tokens_per_rank"] // steps
        entry = {"kind": row["kind"], "batch": row["batch"], "image_tokens": row.get("image_tokens"),
                 "vision_share": share, "capacity_ratio": capacity, "links": {},
                 "breakeven_smoes_vs_topk": {ep: breakeven_bandwidth(compute_s, bytes_fn, tokens, ep)
                                                  for ep in sizes}}
        for link in INTERCONNECTS:
            table = {ep: project(compute_s, bytes_fn, tokens, layers, ep, link) for ep in sizes}
            if row["kind"] == "decode":
                figures = {ep: {v: ep * row["batch"] / s for v, s in t.items()} for ep, t in table.items()}
            else:
                figures = {ep: {v: 1000 * s for v, s in t.items()} for ep, t in table.items()}
            entry["links"][link.key] = {
                "unit": "tokens/s (EP group)" if row["kind"] == "decode" else "ms",
                "by_ep": figures,
                "comm_share_smoes": {ep: _comm_share(compute_s, bytes_fn, tokens, ep, link) for ep in sizes},
                "crossover_smoes_vs_topk": crossover(compute_s, bytes_fn, tokens, layers, link, sizes)}
        out["workloads"].append(entry)
        for v in per:
            if v in ("dense", REFERENCE):
                continue   # dense sends nothing; top-k's lambda is fitted to its own measured bytes
            predicted = bytes_fn(v, ep_size)
            measured = per[v]["bytes_per_token"]
            out["check"].append({"kind": row["kind"], "batch": row["batch"], "variant": v, "predicted": predicted,
                                 "measured": measured, "ratio": predicted / measured if measured else None})
    return out


def _comm_share(compute_s, bytes_fn, tokens, ep, link) -> float:
    comm = comm_seconds(bytes_fn("smoes", ep), tokens, link)
    return comm / (comm + compute_s["smoes"])


# -- the report ----------------------------------------------------------------------------------------
def _ci(r: dict) -> str:
    if not r or r.get("median") is None:
        return "n/a"
    low, high = r["ci95"] or (None, None)
    return f"{r['median']:.3f}" + (f" [{low:.2f}, {high:.2f}]" if low is not None else "")


def _workload(row: dict) -> str:
    if row["kind"] == "prefill":
        return f"prefill {row['image_tokens']}+64 x{row['batch']}"
    return f"decode b={row['batch']} (cache {row['context']})"


def _gbps(even: dict) -> str:
    if even["faster"] in ("always", "never"):
        return even["faster"]
    return f"{even['faster']} {even['gbps']:.3g}"


def report_markdown(result: dict) -> str:
    s = result["setup"]
    lines = [f"# Inference at published shapes: one decoder block on {s['ep_size']} EP ranks ({s['backend']}, "
             f"{s['dtype']}: {s['dtype_reason']})", "",
             f"`{s['command']}`; {s['warmup']} + {s['repeats']} paired rounds, {s['threads_per_rank']} threads per rank; "
             f"routes: {s['profile_source']}.  ms = the slowest rank's median per prefill, or per decoding step "
             "(one token per sequence); tokens/s for the EP group; bytes per token both directions; peak = rank 0's "
             "allocation above its start; ratio = variant / top-k per round, median [95 % interval].", ""]
    for r in result["shapes"]:
        lines += [f"## {r['label']} ({r['dtype']})", ""]
        if r["stand_in"]:
            lines += [f"Block: {r['stand_in']}.", ""]
        lines += ["| workload | variant | ms | vs top-k | tokens/s | remote bytes / token | peak MB |",
                  "|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            for v, f in row["variants"].items():
                peak = f"{f['peak_mb']:.0f}" if f["peak_mb"] is not None else "n/a"
                lines.append(f"| {_workload(row)} | {v} | {f['ms']:.1f} | {_ci(f['vs_topk'])} "
                             f"| {f['tokens_per_s']:.0f} | {f['bytes_per_token']:.0f} | {peak} |")
        p = r["projection"]
        lines += ["", f"Projection to the whole model ({p['layers']} layers, {p['moe_layers']} MoE): SMoES and top-k "
                  "(and dense) per EP size, and the EP size from which SMoES is faster:", ""]
        for w in p["workloads"]:
            for key, link in w["links"].items():
                cells = "; ".join(f"EP {ep}: " + ", ".join(f"{v} {val:.0f}" for v, val in t.items()
                                                           if v in ("smoes", REFERENCE, "dense"))
                                  for ep, t in link["by_ep"].items())
                cross = link["crossover_smoes_vs_topk"]
                lines.append(f"- {w['kind']} b={w['batch']}" + (f" ({w['image_tokens']}+64)" if w["image_tokens"] else "")
                             + f", {key} ({link['unit']}): {cells}; SMoES faster from EP "
                             + (str(cross) if cross else "never in 2..64"))
            even = w["breakeven_smoes_vs_topk"]
            lines.append(f"- {w['kind']} b={w['batch']}: SMoES faster than top-k on links (GB/s) "
                         + ", ".join(f"EP {ep}: {_gbps(v)}" for ep, v in even.items()))
        lines += ["", "Check of the bytes formula at the measured EP size (predicted / measured): "
                  + ", ".join(f"{c['variant']} {c['kind']} b={c['batch']} {c['ratio']:.3f}"
                              for c in p["check"] if c["ratio"] is not None), ""]
    lines += ["## Bars", ""] + [f"- {line}" for line in bar_lines(result)]
    lines += ["", "Interconnects: " + "; ".join(f"{l.key}: {l.note}" for l in INTERCONNECTS) + "."]
    return "\n".join(lines) + "\n"


def bar_lines(result: dict) -> list[str]:
    out = []
    for r in result["shapes"]:
        for name, bar in r["bars"].items():
            worst = "n/a" if bar["worst"] is None else f"{bar['worst']:.3f}"
            out.append(f"{r['label']} {r['dtype']}: {name} worst {worst} of "
                       f"{[None if v is None else round(v, 3) for v in bar['values']]} (bar <= {bar['bar']}): "
                       f"{'met' if bar['met'] else 'NOT met'}")
    return out


# -- the command ---------------------------------------------------------------------------------------
def run(args) -> int:
    import torch

    from ds_smoes.app.tracking import Tracker, default_tracking_uri

    resolve(args)
    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    uri = None if args.no_mlflow else (args.tracking_uri or default_tracking_uri())
    tracker = Tracker(uri or "", args.experiment, f"bench-infer-scale-{time.strftime('%Y%m%d-%H%M%S')}",
                      active=uri is not None, tags={"kind": "bench-infer-scale"})
    status = "FAILED"
    ep_size = 2
    try:
        tracker.log_params({"shapes": ",".join(args.shapes), "dtype": args.dtype, "prefill": " ".join(args.prefill),
                            "decode_batches": ",".join(map(str, args.decode_batches)),
                            "decode_context": args.decode_context, "repeats": args.repeats, "warmup": args.warmup})
        profile, described = profile_from(args.profile_from or default_profile_source(args.out), args.out)
        profile_json = args.out / "infer_scale_profile.json"
        profile_json.write_text(json.dumps({"k": profile.k, "vision_share": profile.vision_share,
                                            "own_routes_MJ": profile.own_routes_MJ, "source": described}))
        raw_path, log = args.out / "infer_scale_raw.json", args.out / "infer_scale_worker.log"
        _echo(f"one decoder block on {ep_size} ranks: {', '.join(BLOCK_SHAPES[s].label for s in args.shapes)} in "
              f"{args.dtype} ({args.dtype_reason}); prefill {' '.join(args.prefill)}, decode b={args.decode_batches} "
              f"after {args.decode_context} positions; {args.warmup} + {args.repeats} rounds; log: {log}")
        worker_args = ["--shapes", *args.shapes, "--dtype", args.dtype, "--prefill", *args.prefill,
                       "--decode-batches", *map(str, args.decode_batches), "--decode-context", str(args.decode_context),
                       "--decode-steps", str(args.decode_steps), "--variants", *args.variants,
                       "--warmup", str(args.warmup), "--repeats", str(args.repeats),
                       "--profile-json", str(profile_json), "--out", str(raw_path)]
        if args.no_memory:
            worker_args.append("--no-memory")
        raw = runs.measure("ds_smoes.bench.infer.block_worker", ep_size, worker_args, raw_path, log, _echo,
                           ("[bench]",), what="the block benchmark")
        result = {"setup": {**raw["setup"], "profile_source": described, "dtype_reason": args.dtype_reason,
                            "backend": "NCCL" if torch.cuda.is_available() else "gloo", "command": args.command_line,
                            "variants": {v: VARIANT_LABELS[v] for v in args.variants},
                            "interconnects": {l.key: l.note for l in INTERCONNECTS}},
                  "shapes": [shape_figures(r, profile, ep_size) for r in raw["results"]], "raw": raw["results"]}
        runs.publish(args.out, "infer_scale", result, report_markdown, _metrics, tracker, uri, time.time() - t0, _echo)
        status = "FINISHED"
    finally:
        tracker.end(status)
    return 0


def _metrics(result: dict) -> dict:
    """The MLflow metrics of the result."""
    metrics = {}
    for r in result["shapes"]:
        for row in r["rows"]:
            tag = f"{r['shape']}/{row['kind']}_b{row['batch']}" + (f"_p{row['image_tokens']}" if row["kind"] == "prefill"
                                                                  else "")
            for v, f in row["variants"].items():
                metrics[f"{tag}/{v}/ms"] = f["ms"]
                metrics[f"{tag}/{v}/bytes_per_token"] = f["bytes_per_token"]
                if f["vs_topk"]["median"] is not None:
                    metrics[f"{tag}/{v}/vs_topk"] = f["vs_topk"]["median"]
        for name, bar in r["bars"].items():
            if bar["worst"] is not None:
                metrics[f"{r['shape']}/bar/{name}"] = bar["worst"]
    return metrics
