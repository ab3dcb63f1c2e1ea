"""`python -m ds_smoes.bench scale`: the MoE layer and the attention score at the shapes users train
(docs/bench.md, "scale").

1. The router statistics the drawn routings follow: the SMoES router's own-route histogram, from a
   `bench comm` result (comm.json) or measured here on a trained run (default runs/demo, as `make demo`
   leaves it) by the communication benchmark's worker (`ds_smoes.bench.comm.worker`, variant c, routing pass).
2. The MoE layer on `ep_size` gloo ranks (`ds_smoes.bench.scale.worker`): per published shape, paired
   rounds of eight variants (router x dispatch) sharing one set of expert weights.
3. The attention score (`ds_smoes.bench.scale.attention`) per sequence length, in this process.
4. Ratios with distribution-free 95 % intervals (`median_interval` of the per-round ratios), the issue's
   bars, scale.json / scale.md under --out and one MLflow run.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from ds_smoes.bench import runs
from ds_smoes.bench.comm.report import paired_ratio
from ds_smoes.bench.scale.shapes import SHAPES
from ds_smoes.bench.simulate.model import RouterProfile
from ds_smoes.core.errors import ConfigError

EXPERIMENT = "ds-smoes-bench"
BARS = {"layer_ratio_smoes_vs_topk": 1.05, "dispatch_ratio_rank_once_vs_stock": 0.80,
        "attn_score_peak_mem_ratio_T8192": 1.2, "attn_score_time_ratio_T4096": 1.5,
        # --autoep: the ds-smoes layer on AutoEP (SMoES-profile routes, once per rank) against AutoEP as shipped
        "autoep_bytes_ratio": 0.5, "autoep_layer_ratio": 1.05}


def _echo(message: str) -> None:
    print(message, flush=True)


def native_bf16() -> tuple[bool, str]:
    """Whether this machine computes bf16 natively (CUDA, or a CPU with AVX512-BF16 / AMX), and what was seen."""
    if torch.cuda.is_available():
        return True, f"CUDA device {torch.cuda.get_device_name(0)}"
    capability = torch.backends.cpu.get_cpu_capability()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    native = any(f in flags for f in ("avx512_bf16", "amx_bf16"))
    return native, f"CPU capability {capability}" + ("" if native else ", no avx512_bf16 or amx_bf16 in /proc/cpuinfo")


def measured_dtypes(asked: list[str] | None, probe=native_bf16) -> tuple[list[str], str | None]:
    """The dtypes to measure and, where bf16 is left out, why.  Asked for (`--dtypes`): exactly those.
    Not asked: fp32, plus bf16 where `probe()` says the machine computes it natively (on a CPU without
    native bf16 its times measure an emulation, not the layer)."""
    if asked:
        return list(asked), None
    native, seen = probe()
    return (["fp32", "bf16"], None) if native else (["fp32"], seen)


def check_args(args) -> None:
    for name in ("tokens", "repeats"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1")
    if args.warmup < 0:
        raise ConfigError("--warmup must be >= 0")
    if args.vision_share is not None and not 0.0 < args.vision_share < 1.0:
        raise ConfigError(f"--vision-share {args.vision_share} must lie strictly between 0 and 1")
    if args.ep_size < 2:
        raise ConfigError("--ep-size must be >= 2: the dispatch ratio compares traffic between EP ranks")
    for key in args.shapes:
        shape = SHAPES[key]
        if shape.num_experts % args.ep_size:
            raise ConfigError(f"{shape.label}: {shape.num_experts} experts do not split over {args.ep_size} EP ranks")
    bad_t = [t for t in args.attention_lengths if t < 1]
    if bad_t:
        raise ConfigError(f"--attention-lengths {bad_t}: lengths must be >= 1")


# -- the router profile ---------------------------------------------------------------------------------
def profile_from(source: Path, out_dir: Path, echo=_echo) -> tuple[RouterProfile, str]:
    """The SMoES router's profile and a description of where it came from."""
    if source.is_file():
        from ds_smoes.bench.comm.report import simulation_inputs

        try:
            result = json.loads(source.read_text())
            if isinstance(result, dict) and "own_routes_MJ" in result:   # a scale_profile.json of an earlier run
                return (RouterProfile(result["k"], result["vision_share"],
                                      tuple(tuple(row) for row in result["own_routes_MJ"])),
                        result.get("source", str(source)))
            inputs, which = simulation_inputs(result)
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConfigError(f"{source}: not a comm.json written by `python -m ds_smoes.bench comm` ({err})") from None
        return inputs.smoes, f"{source} ({which} SMoES router, variant c)"
    if not runs.is_complete(source):
        raise ConfigError(f"{source}: no trained run there (needs metrics.json and checkpoint/final); run `make demo` "
                          "first (about 5 minutes), or pass --profile-from with a finished SMoES run or a comm.json "
                          "of `python -m ds_smoes.bench comm`")
    metrics = json.loads((source / "metrics.json").read_text())
    if metrics.get("gate") != "smoes":
        raise ConfigError(f"{source}: trained with gate {metrics.get('gate')!r}; the profile must come from an "
                          "SMoES router")
    config = source / "train_config.json"
    if not config.is_file():
        raise ConfigError(f"{source}: no train_config.json (runs of ds_smoes.train write it); cannot rebuild the model")
    log = out_dir / "scale_profile.log"
    echo(f"measuring the SMoES router's own-route statistics on {source} (log: {log})")
    raw_path = out_dir / "scale_profile_raw.json"
    raw = runs.measure("ds_smoes.bench.comm.worker", int(metrics["ep_size"]), [
        "--config", str(config), "--out", str(raw_path), "--variants", "c", "--sources", "trained",
        "--batches", "8", "--warmup", "0", "--repeats", "1", "--eval-questions", "1",
        "--smoes-checkpoint", str(source / "checkpoint")], raw_path, log, echo, what="measuring the router profile")
    from ds_smoes.bench.comm.report import variant_figures

    figures = variant_figures(raw["sources"]["trained"]["c"])
    return (RouterProfile.from_counts(raw["setup"]["k"], figures["own_route_counts_MJ"]),
            f"{source} (SMoES router, {int(figures['valid_tokens'])} test tokens per layer)")


def default_profile_source(out_dir: Path) -> Path:
    comm = out_dir / "comm.json"
    return comm if comm.is_file() else Path("runs/demo")


# -- ratios ---------------------------------------------------------------------------------------------
def shape_figures(raw: dict) -> dict:
    """The ratios and bytes of one (shape, dtype) from the worker's raw times."""
    t, b = raw["seconds"], raw["remote_bytes_per_token"]
    out = {"shape": raw["shape"], "dtype": raw["dtype"], "tokens_per_rank": raw["tokens_per_rank"],
           "ms": {k: 1000 * statistics.median(v) for k, v in t.items()}, "remote_bytes_per_token": b,
           "layer_ratio_smoes_vs_topk": {d: paired_ratio(t[f"smoes/{d}"], t[f"topk/{d}"])
                                         for d in ("rank_once", "stock")},
           "dispatch_ratio_rank_once_vs_stock": {r: paired_ratio(t[f"{r}/rank_once"], t[f"{r}/stock"])
                                                 for r in ("profile", "uniform", "smoes", "topk")},
           "bytes_ratio_rank_once_vs_stock": {r: b[f"{r}/rank_once"] / b[f"{r}/stock"] if b[f"{r}/stock"] else None
                                              for r in ("profile", "uniform", "smoes", "topk")},
           # the expert kernel "auto" chose against the module loop, same routes (SMoES-profile), same rounds
           "kernel_ratio_chosen_vs_modules": (paired_ratio(t["profile/rank_once"], t["profile/rank_once:modules"])
                                              if "profile/rank_once:modules" in t else None),
           "expert_kernels": sorted({k["kernel"] for k in raw.get("expert_kernels", [])})}
    if "autoep/stock" in t:
        out["autoep"] = autoep_figures(t, b)
    layer = out["layer_ratio_smoes_vs_topk"]["rank_once"]["median"]
    disp = out["dispatch_ratio_rank_once_vs_stock"]["profile"]["median"]
    out["bars"] = {"layer_ratio_smoes_vs_topk": {"value": layer, "bar": BARS["layer_ratio_smoes_vs_topk"],
                                                 "met": layer is not None and layer <= BARS["layer_ratio_smoes_vs_topk"]},
                   "dispatch_ratio_rank_once_vs_stock": {
                       "value": disp, "bar": BARS["dispatch_ratio_rank_once_vs_stock"],
                       "met": disp is not None and disp <= BARS["dispatch_ratio_rank_once_vs_stock"]}}
    if "autoep" in out:
        for name in ("autoep_bytes_ratio", "autoep_layer_ratio"):
            value = out["autoep"][name]["median"] if name == "autoep_layer_ratio" else out["autoep"][name]
            out["bars"][name] = {"value": value, "bar": BARS[name], "met": value is not None and value <= BARS[name]}
    return out


def autoep_figures(t: dict, b: dict) -> dict:
    """The --autoep side by side: the ds-smoes layer on AutoEP (SMoES-profile routes, once per rank) against AutoEP
    as DeepSpeed ships it (its router and pair dispatch) and against the legacy layer's rank_once on the same routes;
    the dispatch alone (profile routes, rank_once against AutoEP's pair dispatch); and the SMoES gate's own routing
    on AutoEP against AutoEP's router.  Layer times: paired per-round ratios; bytes: remote bytes per token."""
    stock = b["autoep/stock"]
    return {"autoep_layer_ratio": paired_ratio(t["autoep-profile/rank_once"], t["autoep/stock"]),
            "autoep_bytes_ratio": b["autoep-profile/rank_once"] / stock if stock else None,
            "vs_legacy_rank_once": paired_ratio(t["autoep-profile/rank_once"], t["profile/rank_once"]),
            "dispatch_ratio_rank_once_vs_pair": paired_ratio(t["autoep-profile/rank_once"], t["autoep-profile/stock"]),
            "bytes_ratio_rank_once_vs_pair": (b["autoep-profile/rank_once"] / b["autoep-profile/stock"]
                                              if b["autoep-profile/stock"] else None),
            "smoes_gate_vs_autoep_router": paired_ratio(t["autoep-smoes/rank_once"], t["autoep/stock"])}


def attention_bars(rows: list[dict]) -> dict:
    by_t = {r["T"]: r for r in rows}
    out = {}
    if 8192 in by_t:
        v = by_t[8192]["peak_mem_ratio"]
        out["attn_score_peak_mem_ratio_T8192"] = {"value": v, "bar": 1.2, "met": v is not None and v <= 1.2}
    if 4096 in by_t:
        v = by_t[4096]["time_ratio"]
        out["attn_score_time_ratio_T4096"] = {"value": v, "bar": 1.5, "met": v is not None and v <= 1.5}
    return out


# -- report -----------------------------------------------------------------------------------------------
def _f(v, spec=".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def _ci(r: dict) -> str:
    return f"{_f(r['median'])} [{_f(r['ci95'][0])}, {_f(r['ci95'][1])}]" if r.get("ci95") else _f(r["median"])


def report_markdown(result: dict) -> str:
    s = result["setup"]
    lines = [f"# bench scale: {s['ep_size']} EP ranks ({s['backend']}), {s['tokens_per_rank']} tokens per rank, "
             f"{s['repeats']} paired rounds, {s['threads_per_rank']} thread(s) per rank", "",
             f"Router profile: {s['profile_source']}; drawn routings with vision share {s['vision_share']:.2f}.", "",
             "## MoE layer fwd+bwd (median of per-round ratios, 95 % interval)", "",
             "| shape | dtype | SMoES / top-k gate, rank_once | SMoES / top-k gate, stock | rank_once / stock, "
             "SMoES-profile routes | rank_once / stock, uniform routes | bytes/token rank_once vs stock (profile) "
             "| bytes/token (uniform) | ms: smoes/rank_once, topk/stock | expert kernel (auto) / module loop |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["shapes"]:
        b = r["remote_bytes_per_token"]
        lines.append(
            f"| {SHAPES[r['shape']].label} | {r['dtype']} | {_ci(r['layer_ratio_smoes_vs_topk']['rank_once'])} "
            f"| {_ci(r['layer_ratio_smoes_vs_topk']['stock'])} "
            f"| {_ci(r['dispatch_ratio_rank_once_vs_stock']['profile'])} "
            f"| {_ci(r['dispatch_ratio_rank_once_vs_stock']['uniform'])} "
            f"| {b['profile/rank_once']:.0f} vs {b['profile/stock']:.0f} "
            f"| {b['uniform/rank_once']:.0f} vs {b['uniform/stock']:.0f} "
            f"| {r['ms']['smoes/rank_once']:.0f}, {r['ms']['topk/stock']:.0f} "
            f"| {', '.join(r.get('expert_kernels') or []) or 'n/a'}: "
            f"{_ci(r['kernel_ratio_chosen_vs_modules']) if r.get('kernel_ratio_chosen_vs_modules') else 'n/a'} |")
    autoep_rows = [r for r in result["shapes"] if "autoep" in r]
    if autoep_rows:
        lines += ["", "## On DeepSpeed's AutoEP layer (median of per-round ratios, 95 % interval)", "",
                  "The ds-smoes layer on AutoEP with SMoES-profile routes and the once-per-rank dispatch, against AutoEP "
                  "as DeepSpeed ships it (its router's routes, one row per (token, expert) pair).", "",
                  "| shape | dtype | layer time vs AutoEP | bytes/token vs AutoEP | vs legacy rank_once (same routes) "
                  "| rank_once / AutoEP pair dispatch (same routes) | bytes: rank_once vs pair (same routes) "
                  "| SMoES gate on AutoEP / AutoEP router | bytes/token: AutoEP, ours | ms: AutoEP, ours |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in autoep_rows:
            a, b, ms = r["autoep"], r["remote_bytes_per_token"], r["ms"]
            lines.append(
                f"| {SHAPES[r['shape']].label} | {r['dtype']} | {_ci(a['autoep_layer_ratio'])} "
                f"| {_f(a['autoep_bytes_ratio'])} | {_ci(a['vs_legacy_rank_once'])} "
                f"| {_ci(a['dispatch_ratio_rank_once_vs_pair'])} | {_f(a['bytes_ratio_rank_once_vs_pair'])} "
                f"| {_ci(a['smoes_gate_vs_autoep_router'])} "
                f"| {b['autoep/stock']:.0f}, {b['autoep-profile/rank_once']:.0f} "
                f"| {ms['autoep/stock']:.0f}, {ms['autoep-profile/rank_once']:.0f} |")
    if result.get("bf16_skipped"):
        lines += ["", f"bf16: not measured ({result['bf16_skipped']}); `--dtypes fp32 bf16` measures it anyway."]
    att = result.get("attention")
    if att:
        lines += ["", f"## Attention with the score over attention alone (fwd+bwd; {att['setup']})", "",
                  "| T | time ratio | peak memory ratio | attention ms | with score ms | attention MB | with score MB |",
                  "|---|---|---|---|---|---|---|"]
        for row in att["rows"]:
            lines.append(f"| {row['T']} | {_f(row['time_ratio'])} | {_f(row['peak_mem_ratio'])} "
                         f"| {1000 * row['time_attention']:.0f} | {1000 * row['time_with_score']:.0f} "
                         f"| {row['peak_attention'] / 2**20:.0f} | {row['peak_with_score'] / 2**20:.0f} |")
        lines.append(f"\nPeak memory: {att['rows'][0]['method']}.")
    lines += ["", "## Bars", ""] + [f"- {line}" for line in bar_lines(result)]
    return "\n".join(lines) + "\n"


def bar_lines(result: dict) -> list[str]:
    out = []
    for r in result["shapes"]:
        for name, bar in r["bars"].items():
            out.append(f"{SHAPES[r['shape']].label} {r['dtype']}: {name} {_f(bar['value'])} "
                       f"(bar {'<=' } {bar['bar']}): {'met' if bar['met'] else 'NOT met'}")
    for name, bar in (result.get("attention") or {}).get("bars", {}).items():
        out.append(f"{name} {_f(bar['value'])} (bar <= {bar['bar']}): {'met' if bar['met'] else 'NOT met'}")
    return out


# -- the command ------------------------------------------------------------------------------------------
def run(args) -> int:
    from ds_smoes.app.tracking import Tracker, default_tracking_uri

    check_args(args)
    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    dtypes, bf16_skipped = measured_dtypes(args.dtypes, native_bf16)
    uri = None if args.no_mlflow else (args.tracking_uri or default_tracking_uri())
    tracker = Tracker(uri or "", args.experiment, f"bench-scale-{time.strftime('%Y%m%d-%H%M%S')}",
                      active=uri is not None, tags={"kind": "bench-scale"})
    status = "FAILED"
    try:
        tracker.log_params({"shapes": ",".join(args.shapes), "dtypes": ",".join(dtypes), "tokens": args.tokens,
                            "repeats": args.repeats, "warmup": args.warmup, "ep_size": args.ep_size,
                            "attention_lengths": ",".join(map(str, args.attention_lengths))})
        source = args.profile_from or default_profile_source(args.out)
        profile, described = profile_from(source, args.out)
        _echo(f"router profile: {described}: P(j own routes of {profile.k}) text "
              + ", ".join(f"{p:.3f}" for p in profile.own_routes_MJ[0]) + "; vision "
              + ", ".join(f"{p:.3f}" for p in profile.own_routes_MJ[1]) + f"; vision share {profile.vision_share:.3f}")
        profile_json = args.out / "scale_profile.json"
        profile_json.write_text(json.dumps({"k": profile.k, "vision_share": profile.vision_share,
                                            "own_routes_MJ": profile.own_routes_MJ, "source": described}))
        raw_path = args.out / "scale_raw.json"
        log = args.out / "scale_worker.log"
        shapes = [s for s in args.shapes]
        _echo(f"MoE layer on {args.ep_size} ranks: {', '.join(SHAPES[s].label for s in shapes)} in "
              f"{', '.join(dtypes)}, {args.tokens} tokens per rank, {args.warmup} + {args.repeats} rounds; log: {log}")
        worker_args = ["--shapes", *shapes, "--dtypes", *dtypes, "--tokens", str(args.tokens),
                       "--warmup", str(args.warmup), "--repeats", str(args.repeats),
                       "--profile-json", str(profile_json), "--out", str(raw_path), "--seed", str(args.seed)]
        if args.vision_share is not None:
            worker_args += ["--vision-share", str(args.vision_share)]
        if getattr(args, "autoep", False):
            worker_args.append("--autoep")
        raw = runs.measure("ds_smoes.bench.scale.worker", args.ep_size, worker_args, raw_path, log, _echo, ("[bench]",))
        result = {"setup": {**raw["setup"], "profile_source": described, "backend": runs_backend(),
                            "command": args.command_line},
                  "shapes": [shape_figures(r) for r in raw["results"]], "bf16_skipped": bf16_skipped,
                  "raw": raw["results"]}
        if args.attention_lengths:
            from ds_smoes.bench.scale.attention import measure_attention_score

            rows = []
            for t in args.attention_lengths:
                _echo(f"attention score at T={t} ({args.attention_heads} heads, head dim {args.head_dim})")
                rows.append(measure_attention_score(t, args.attention_heads, args.head_dim, torch.float32,
                                                    args.attention_repeats))
                _echo(f"  time ratio {rows[-1]['time_ratio']:.3f}, peak memory ratio {rows[-1]['peak_mem_ratio']:.3f}")
            result["attention"] = {"setup": f"{args.attention_heads} heads, head dim {args.head_dim}, batch 1, causal, "
                                            f"fp32, {args.attention_repeats} repeats, {torch.get_num_threads()} threads",
                                   "rows": rows, "bars": attention_bars(rows)}
        runs.publish(args.out, "scale", result, report_markdown, _metrics, tracker, uri, time.time() - t0, _echo)
        status = "FINISHED"
    finally:
        tracker.end(status)
    return 0


def runs_backend() -> str:
    return "NCCL" if torch.cuda.is_available() else "gloo"


def _metrics(result: dict) -> dict:
    """The MLflow metrics of the result."""
    metrics = {}
    for r in result["shapes"]:
        prefix = f"{r['shape']}/{r['dtype']}"
        for d, v in r["layer_ratio_smoes_vs_topk"].items():
            if v["median"] is not None:
                metrics[f"{prefix}/layer_ratio_smoes_vs_topk/{d}"] = v["median"]
        for routing, v in r["dispatch_ratio_rank_once_vs_stock"].items():
            if v["median"] is not None:
                metrics[f"{prefix}/dispatch_ratio_rank_once_vs_stock/{routing}"] = v["median"]
        for name, v in (r.get("autoep") or {}).items():
            value = v["median"] if isinstance(v, dict) else v
            if value is not None:
                metrics[f"{prefix}/autoep/{name}"] = value
        for key, v in r["remote_bytes_per_token"].items():
            metrics[f"{prefix}/bytes_per_token/{key.replace('/', '_')}"] = v
    for row in (result.get("attention") or {}).get("rows", []):
        for f in ("time_ratio", "peak_mem_ratio"):
            if row.get(f) is not None:
                metrics[f"attention/T{row['T']}/{f}"] = row[f]
    return metrics
