"""`python -m ds_smoes.bench infer`: serving the trained models with the KV cache under expert
parallelism (docs/bench.md, "infer").

1. The trained models: one per recipe the variants need (`ds_smoes.bench.runs.RECIPES`: dense,
   top-k, hard, SMoES, SMoES with one bin per token), from `--run RECIPE=DIR` when given, else
   runs/bench/<recipe>, trained there by the demo recipe (DeepSpeed launcher) when missing.
2. The measurement: `ds_smoes.bench.infer.worker` once per ep_size (`--ep-sizes`, default 1 2)
   on that many ranks: traffic, paired timing rounds and accuracy of every variant.
3. The table (printed, infer.md), the result (infer.json, strict JSON) and one MLflow run holding
   them (the training runs nest under it).

Definitions (per EP group of R ranks, each generating for `batch_size` prompts per round):
- prefill ms per sample: the slowest rank's prefill wall time / (R x batch_size) prompts;
- decode tokens/s: R x batch_size x (new_tokens - 1) tokens fed by the decode steps / the slowest
  rank's decode wall time;
- remote bytes per generated token: bytes all ranks sent to other EP ranks (dispatch + combine,
  every MoE layer) during the decode steps / the tokens those steps fed; per prompt sample: the
  same for the prefill / the prompts;
- time ratios: per round, the variant's time / the reference's (top-k, stock dispatch) in the same
  round, median and distribution-free 95 % interval.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from ds_smoes.bench import runs
from ds_smoes.bench.infer.variants import INFER_VARIANTS, REFERENCE
from ds_smoes.bench.comm.report import paired_ratio, strict_json
from ds_smoes.core.errors import ConfigError

FILES = ("infer.json", "infer.md")


def _echo(message: str) -> None:
    print(message, flush=True)


def check_args(args) -> None:
    unknown = [v for v in args.variants if v not in INFER_VARIANTS]
    if unknown:
        raise ConfigError(f"unknown variant(s) {unknown}; choose from {list(INFER_VARIANTS)}")
    for name in ("repeats", "batches", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if args.new_tokens < 2:
        raise ConfigError("--new-tokens must be >= 2: the first token comes from the prefill, decode steps feed the rest")
    for name in ("warmup", "eval_questions"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0")
    if not args.ep_sizes or any(r < 1 for r in args.ep_sizes):
        raise ConfigError(f"--ep-sizes {args.ep_sizes}: give one or more sizes >= 1")
    if args.epochs is not None and args.epochs <= 0:
        raise ConfigError("--epochs must be > 0")


def given_runs(items: list[str]) -> dict[str, Path]:
    """`--run RECIPE=DIR` items as a dict (pure)."""
    out = {}
    for item in items:
        recipe, sep, folder = item.partition("=")
        if not sep or not folder:
            raise ConfigError(f"--run {item!r}: write RECIPE=DIR, e.g. --run smoes=runs/demo")
        if recipe not in runs.RECIPES:
            raise ConfigError(f"--run {item!r}: unknown recipe {recipe!r}; choose from {list(runs.RECIPES)}")
        out[recipe] = Path(folder)
    return out


def recipe_config(config: Path, overrides: list[str], recipe: str):
    from ds_smoes.app.config import load_train_config

    return load_train_config(config, [*overrides, *runs.RECIPES[recipe].overrides])


def trained_runs(args, tracking_uri: str | None, parent_run_id: str | None) -> dict:
    """recipe -> {run_dir, metrics} for every recipe the variants need; trains the missing default runs."""
    given = given_runs(args.runs)
    out = {}
    for recipe in dict.fromkeys(INFER_VARIANTS[v].recipe for v in args.variants):
        cfg = recipe_config(args.config, args.overrides, recipe)
        run_dir = given.get(recipe) or runs.default_run_dir(args.out, recipe, args.epochs)
        if not runs.is_complete(run_dir):
            if recipe in given:
                runs.load_run(run_dir, recipe, cfg.smoes, cfg.model)   # raises, saying what is missing
            if args.no_train:
                raise ConfigError(f"{run_dir}: no trained {recipe} model there and --no-train was given; pass "
                                  f"--run {recipe}=DIR or drop --no-train")
            runs.train(recipe, run_dir, args.config, args.overrides, args.epochs, cfg.smoes.ep_size, tracking_uri,
                       args.experiment, parent_run_id, _echo)
        out[recipe] = {"run_dir": str(run_dir), "metrics": runs.load_run(run_dir, recipe, cfg.smoes, cfg.model)}
    return out


def worker_args(args, trained: dict, raw_path: Path, batch_size: int) -> list[str]:
    """Arguments of `ds_smoes.bench.infer.worker` (pure)."""
    out = ["--config", str(args.config), "--out", str(raw_path), "--variants", *args.variants,
           "--batches", str(args.batches), "--batch-size", str(batch_size), "--new-tokens", str(args.new_tokens),
           "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--eval-questions", str(args.eval_questions)]
    for item in args.overrides:
        out += ["--set", item]
    for recipe, run in trained.items():
        out += ["--checkpoint", f"{recipe}={Path(run['run_dir']) / 'checkpoint'}"]
    return out


# -- figures (pure) -------------------------------------------------------------------------------------------
def variant_figures(raw: dict, setup: dict, reference: dict | None) -> dict:
    """The table's figures of one variant at one ep_size from the worker's raw result."""
    prefill, decode = raw["prefill_seconds"], raw["decode_seconds"]
    prompts = setup["world_size"] * setup["batch_size"]
    fed = prompts * (setup["new_tokens"] - 1)
    out = {"params_active": raw["params"]["active"], "params_total": raw["params"]["total"],
           "moe_layers": raw["moe_layers"],
           "prefill_ms_per_sample": 1000 * statistics.median(prefill) / prompts,
           "prefill_ms_per_batch": 1000 * statistics.median(prefill),
           "decode_tokens_per_s": fed / statistics.median(decode),
           "bytes_per_generated_token": raw["decode_bytes"] / raw["decode_tokens"] if raw["decode_tokens"] else None,
           "bytes_per_prompt_sample": raw["prefill_bytes"] / raw["samples"] if raw["samples"] else None,
           "bytes_per_prompt_token": raw["prefill_bytes"] / raw["prompt_tokens"] if raw["prompt_tokens"] else None,
           **{k: raw[k] for k in ("acc_multimodal", "acc_language", "acc_overall", "num_multimodal",
                                  "num_language")}}
    if reference is not None:
        out["prefill_ratio_vs_ref"] = paired_ratio(prefill, reference["prefill_seconds"])
        out["decode_ratio_vs_ref"] = paired_ratio(decode, reference["decode_seconds"])
    return out


def assemble(raws: dict[int, dict], trained: dict) -> dict:
    """{ep_size: worker raw} -> the result: per ep_size the setup and each variant's figures."""
    result = {"reference": REFERENCE, "runs": trained, "ep_sizes": {}}
    for ep_size, raw in sorted(raws.items()):
        ref = raw["variants"].get(REFERENCE)
        result["ep_sizes"][str(ep_size)] = {
            "setup": raw["setup"],
            "variants": {key: {"label": INFER_VARIANTS[key].label,
                               **variant_figures(v, raw["setup"], ref if key != REFERENCE else None)}
                         for key, v in raw["variants"].items()}}
    return result


def _f(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _ratio(r: dict | None) -> str:
    if not r or r.get("median") is None:
        return "1 (ref)" if r is None else "n/a"
    ci = r.get("ci95")
    return f"{r['median']:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def markdown_table(result: dict) -> str:
    head = ("| ep | model | active / total params | prefill ms/sample | prefill vs top-k | decode tok/s | "
            "decode time vs top-k | remote bytes / generated token | remote bytes / prompt | multimodal | language |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for ep, block in result["ep_sizes"].items():
        for key, v in block["variants"].items():
            lines.append(
                f"| {ep} | {v['label']} | {v['params_active'] / 1e3:.0f}k / {v['params_total'] / 1e3:.0f}k | "
                f"{v['prefill_ms_per_sample']:.3f} | {_ratio(v.get('prefill_ratio_vs_ref'))} | "
                f"{v['decode_tokens_per_s']:.0f} | {_ratio(v.get('decode_ratio_vs_ref'))} | "
                f"{_f(v['bytes_per_generated_token'], ',.0f')} | {_f(v['bytes_per_prompt_sample'], ',.0f')} | "
                f"{v['acc_multimodal']:.4f} | {v['acc_language']:.4f} |")
    return "\n".join(lines)


def report_markdown(result: dict, command: str) -> str:
    first = next(iter(result["ep_sizes"].values()))["setup"]
    return "\n".join([
        "# bench infer: serving the trained models with the KV cache under expert parallelism", "",
        f"Command: `{command}`", "",
        f"Per round and model: greedy generation of {first['new_tokens']} tokens for {first['batch_size']} prompts "
        f"per rank ({first['batches_per_rank']} fixed test batches, {first['warmup']} warm-up + {first['repeats']} "
        f"timed rounds, order rotating), {first['dtype']} on {first['device']}; times are the slowest rank's. "
        "Ratios: per-round time / top-k's (stock dispatch) in the same round, median [95 % interval]. Bytes: "
        "sent to other EP ranks by all ranks, every MoE layer, dispatch + combine (0 at ep_size 1). Accuracy: "
        "exact match on the test split with the recipe's decoding length.", "",
        markdown_table(result), ""])


def command_line(args) -> str:
    return getattr(args, "command_line", "python -m ds_smoes.bench infer")


# -- the command ----------------------------------------------------------------------------------------------
def run(args) -> int:
    from ds_smoes.app.tracking import Tracker, default_tracking_uri

    check_args(args)
    for key in args.variants:    # every variant's config must validate at every size before anything starts
        for ep_size in args.ep_sizes:
            recipe_config(args.config, [*args.overrides, *INFER_VARIANTS[key].overrides(ep_size)],
                          INFER_VARIANTS[key].recipe)
    t0 = time.time()
    uri = None if args.no_mlflow else (args.tracking_uri or default_tracking_uri())
    tracker = Tracker(uri or "", args.experiment, f"bench-infer-{time.strftime('%Y%m%d-%H%M%S')}",
                      active=uri is not None, tags={"kind": "bench-infer"})
    status = "FAILED"
    try:
        tracker.log_params({"config": str(args.config), "overrides": " ".join(args.overrides),
                            "variants": ",".join(args.variants), "ep_sizes": ",".join(map(str, args.ep_sizes)),
                            "batches": args.batches, "batch_size": args.batch_size, "new_tokens": args.new_tokens,
                            "repeats": args.repeats, "warmup": args.warmup, "epochs": args.epochs,
                            "eval_questions": args.eval_questions})
        trained = trained_runs(args, uri, tracker.run_id)
        for recipe, run in trained.items():
            _echo(f"{recipe} model: {run['run_dir']} (reported accuracy: multimodal "
                  f"{run['metrics'].get('acc_multimodal', float('nan')):.4f}, language "
                  f"{run['metrics'].get('acc_language', float('nan')):.4f})")
        args.out.mkdir(parents=True, exist_ok=True)
        batch_size = args.batch_size or recipe_config(args.config, args.overrides, "smoes").run.eval_batch_size
        raws = {}
        for ep_size in args.ep_sizes:
            raw_path = args.out / f"infer_raw_ep{ep_size}.json"
            log = args.out / f"infer_worker_ep{ep_size}.log"
            _echo(f"measuring at ep_size {ep_size} ({ep_size} rank{'s' if ep_size > 1 else ''}); log: {log}")
            raws[ep_size] = runs.measure("ds_smoes.bench.infer.worker", ep_size,
                                         worker_args(args, trained, raw_path, batch_size), raw_path, log, _echo,
                                         ("[infer]",), f"the measurement at ep_size {ep_size}")
        result = assemble(raws, trained)
        result["command"] = command_line(args)
        result["mlflow_run_id"] = tracker.run_id
        md = report_markdown(result, result["command"])
        (args.out / "infer.json").write_text(strict_json(result))
        (args.out / "infer.md").write_text(md)
        _echo("\n" + md)
        _log(tracker, result, args.out)
        _echo(runs.wrote_line([args.out / f for f in FILES], time.time() - t0, tracker, uri))
        status = "FINISHED"
    finally:
        tracker.end(status)
    return 0


def _log(tracker, result: dict, out_dir: Path) -> None:
    if not tracker.active:
        return
    metrics = {}
    for ep, block in result["ep_sizes"].items():
        for key, v in block["variants"].items():
            for f in ("prefill_ms_per_sample", "decode_tokens_per_s", "bytes_per_generated_token",
                      "bytes_per_prompt_sample", "acc_multimodal", "acc_language", "params_active"):
                if isinstance(v.get(f), (int, float)):
                    metrics[f"ep{ep}/{key}/{f}"] = v[f]
            for f in ("prefill_ratio_vs_ref", "decode_ratio_vs_ref"):
                if isinstance((v.get(f) or {}).get("median"), (int, float)):
                    metrics[f"ep{ep}/{key}/{f}"] = v[f]["median"]
    tracker.log_metrics(metrics)
    for name in FILES:
        tracker.log_file(out_dir / name)
