"""`python -m ds_smoes.bench {comm,scale,simulate,infer}` (docs/bench.md).

    python -m ds_smoes.bench comm                         # train what is missing, measure, simulate
    python -m ds_smoes.bench comm --smoes-run runs/demo --topk-run runs/bench/topk
    python -m ds_smoes.bench comm --init-only --batches 2 --repeats 3 --eval-questions 32   # quick
    python -m ds_smoes.bench simulate --from runs/bench/comm.json [--capacity-factor 1.25]
    python -m ds_smoes.bench scale                        # published MoE shapes (needs runs/demo or comm.json)
    python -m ds_smoes.bench scale --shapes toy --tokens 256 --repeats 2 --attention-lengths 256   # quick
    python -m ds_smoes.bench scale --shapes olmoe --autoep --attention-lengths   # with DeepSpeed AutoEP's layer
    python -m ds_smoes.bench infer                        # train what is missing, serve at ep_size 1 and 2
    python -m ds_smoes.bench infer --run smoes=runs/demo --variants topk smoes   # reuse the demo's model
    python -m ds_smoes.bench infer --shapes               # one decoder block at published shapes, 2 ranks

Errors a user can fix print one message and exit 2; a failed subprocess exits 1.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ds_smoes.bench.infer.variants import INFER_VARIANTS
from ds_smoes.bench.runs import RECIPES
from ds_smoes.bench.infer.shapes import BLOCK_SHAPES
from ds_smoes.bench.scale.shapes import PUBLISHED, SHAPES
from ds_smoes.bench.simulate.model import EP_GRID, EXPERTS_GRID
from ds_smoes.bench.comm.variants import VARIANTS
from ds_smoes.core.errors import ConfigError, SMoESError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ds_smoes.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("comm", help="measure EP communication, step time and accuracy of the variants on 2 ranks")
    c.add_argument("--config", type=Path, default=Path("configs/demo.yaml"), help="the training recipe")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field (for training and measuring), repeatable")
    c.add_argument("--smoes-run", type=Path, default=None, help="a finished SMoES training run (e.g. runs/demo)")
    c.add_argument("--topk-run", type=Path, default=None, help="a finished top-k gate training run")
    c.add_argument("--no-train", action="store_true", help="fail instead of training a missing model")
    c.add_argument("--epochs", type=float, default=None,
                   help="train missing models for this many epochs (into runs/bench/<gate>-epochs<N>)")
    c.add_argument("--init-only", action="store_true", help="measure only the models at initialisation")
    c.add_argument("--no-init", action="store_true", help="measure only the trained models")
    c.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="V",
                   help=f"subset of {' '.join(VARIANTS)} (default: all; e is an extra)")
    c.add_argument("--batches", type=int, default=0, help="test batches per rank (default 0: the whole test split)")
    c.add_argument("--batch-size", type=int, default=None, help="sequences per rank and batch (default: "
                                                                "optim.micro_batch_size)")
    c.add_argument("--warmup", type=int, default=3, help="untimed rounds before timing")
    c.add_argument("--repeats", type=int, default=800, help="timed fwd+bwd rounds per variant (default 800: "
                   "enough rounds to show a 1 ms difference under several ms of noise; docs/bench.md)")
    c.add_argument("--eval-questions", type=int, default=0, help="test questions for accuracy (default 0: all)")
    c.add_argument("--out", type=Path, default=Path("runs/bench"))
    _tracking(c)

    sc = sub.add_parser("scale", help="the MoE layer and the attention score at published model shapes")
    sc.add_argument("--shapes", nargs="+", default=list(PUBLISHED), choices=list(SHAPES),
                    help=f"model shapes (default: {' '.join(PUBLISHED)}; toy is a seconds-long check)")
    sc.add_argument("--dtypes", nargs="+", default=None, choices=["fp32", "bf16"],
                    help="default: fp32, plus bf16 where the machine computes it natively (CUDA, AVX512-BF16, AMX)")
    sc.add_argument("--tokens", type=int, default=512, help="tokens per EP rank and MoE call (default 512)")
    sc.add_argument("--repeats", type=int, default=7, help="paired timed rounds per shape (default 7: the fewest "
                    "that give a 95 %% interval for the median)")
    sc.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    sc.add_argument("--ep-size", type=int, default=2, help="EP ranks (processes) for the layer (default 2)")
    sc.add_argument("--profile-from", type=Path, default=None,
                    help="the SMoES router statistics: a finished SMoES run, a comm.json of `bench comm` or the "
                         "scale_profile.json of an earlier scale run (default: OUT/comm.json when present, "
                         "else runs/demo)")
    sc.add_argument("--vision-share", type=float, default=None,
                    help="share of vision tokens in the drawn batches (default: the profile's)")
    sc.add_argument("--attention-lengths", type=int, nargs="*", default=[1024, 4096, 8192],
                    help="sequence lengths for the attention score (none: skip it)")
    sc.add_argument("--attention-heads", type=int, default=16)
    sc.add_argument("--head-dim", type=int, default=64)
    sc.add_argument("--attention-repeats", type=int, default=3)
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--autoep", action="store_true",
                    help="also DeepSpeed's AutoEP layer: its own router and dispatch against the ds-smoes gate and the "
                         "once-per-rank dispatch on it, in the same paired rounds")
    sc.add_argument("--out", type=Path, default=Path("runs/bench"))
    _tracking(sc)

    i = sub.add_parser("infer", help="serving with the KV cache at ep_size 1 and 2: prefill, decode, bytes, accuracy")
    i.add_argument("--config", type=Path, default=Path("configs/demo.yaml"), help="the training recipe")
    i.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field (for training and serving), repeatable")
    i.add_argument("--variants", nargs="+", default=None, metavar="V",
                   help=f"subset of {' '.join(INFER_VARIANTS)} (default: all)")
    i.add_argument("--run", dest="runs", action="append", default=[], metavar="RECIPE=DIR",
                   help=f"a finished training run of a recipe ({', '.join(RECIPES)}), e.g. smoes=runs/demo; "
                        "default: OUT/RECIPE, trained there when missing")
    i.add_argument("--no-train", action="store_true", help="fail instead of training a missing model")
    i.add_argument("--epochs", type=float, default=None,
                   help="train missing models for this many epochs (into OUT/<recipe>-epochs<N>)")
    i.add_argument("--ep-sizes", type=int, nargs="+", default=[1, 2], help="EP sizes (ranks) to serve at")
    i.add_argument("--batches", type=int, default=4, help="fixed test prompt batches per rank for traffic and timing")
    i.add_argument("--batch-size", type=int, default=None, help="prompts per rank and batch (default: "
                                                                "run.eval_batch_size)")
    i.add_argument("--new-tokens", type=int, default=16, help="tokens generated per prompt in the timed rounds")
    i.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2; --shapes: 1)")
    i.add_argument("--repeats", type=int, default=None, help="paired timed rounds (default 20; --shapes: 6, the fewest "
                   "with a 95 %% interval of the median ratio: its extremes)")
    i.add_argument("--eval-questions", type=int, default=0, help="test questions for accuracy (default 0: all)")
    i.add_argument("--out", type=Path, default=Path("runs/bench"))
    # one decoder block at published shapes (ds_smoes.bench.infer.scale_command), instead of the demo's models
    i.add_argument("--shapes", nargs="*", default=None, metavar="SHAPE",
                   help=f"serve one decoder block at these shapes ({', '.join(BLOCK_SHAPES)}; none named: the "
                        f"published {', '.join(PUBLISHED)}) and project the whole model; writes OUT/infer_scale.json")
    i.add_argument("--prefill", nargs="+", default=None, metavar="IMAGE:BATCH",
                   help="--shapes: prefill workloads, image tokens (+64 text) and batch per rank (default 576:1 "
                        "2304:1; add 576:8 for batch 8)")
    i.add_argument("--decode-batches", nargs="+", type=int, default=None, help="--shapes: sequences per rank decoding "
                   "together (default 1 8 64)")
    i.add_argument("--decode-context", type=int, default=None, help="--shapes: cached positions before decoding "
                   "(default 640: a 576-token image and 64 text tokens)")
    i.add_argument("--decode-steps", type=int, default=None, help="--shapes: decoding steps per measurement (default 2)")
    i.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="--shapes: the dtype (default bf16 where "
                   "the machine computes it natively, CUDA or AVX512-BF16/AMX, else fp32)")
    i.add_argument("--profile-from", type=Path, default=None, help="--shapes: the SMoES router statistics, as for "
                   "`scale` (default: OUT/comm.json when present, else runs/demo)")
    i.add_argument("--no-memory", action="store_true", help="--shapes: skip the peak-memory runs")
    _tracking(i)

    s = sub.add_parser("simulate", help="expected remote bytes per token for 2..64 EP ranks and 8..256 experts")
    s.add_argument("--from", dest="source_json", type=Path, default=Path("runs/bench/comm.json"),
                   help="a comm.json written by `comm`")
    s.add_argument("--models", choices=["trained", "init"], default=None,
                   help="whose routers (default: trained when measured)")
    s.add_argument("--experts", type=int, nargs="+", default=list(EXPERTS_GRID))
    s.add_argument("--ep-sizes", type=int, nargs="+", default=list(EP_GRID))
    s.add_argument("--capacity-factor", type=float, default=None,
                   help="stock capacity / mean expert load for (a) and (b) (default: measured)")
    s.add_argument("--hidden", type=int, default=None, help="hidden size to express bytes for (default: measured)")
    s.add_argument("--element-size", type=int, default=None, help="bytes per element (default: measured)")
    s.add_argument("--method", choices=["analytic", "monte-carlo"], default="analytic")
    s.add_argument("--samples", type=int, default=5000, help="monte-carlo: tokens per cell and router")
    s.add_argument("--seed", type=int, default=0, help="monte-carlo seed")
    s.add_argument("--out", type=Path, default=None, help="output folder (default: beside --from)")
    _tracking(s)
    return p


def _tracking(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default: sqlite:///$PWD/mlflow.db)")
    p.add_argument("--experiment", default="ds-smoes-bench", help="MLflow experiment")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")


def simulate_command(args) -> int:
    from ds_smoes.bench.simulate.command import FILES, run_simulation
    from ds_smoes.app.tracking import Tracker, default_tracking_uri

    if not args.source_json.is_file():
        raise ConfigError(f"{args.source_json}: no benchmark result; run `python -m ds_smoes.bench comm` first "
                          "or pass --from PATH")
    try:
        result = json.loads(args.source_json.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{args.source_json}: not valid JSON: {err}") from None
    if not isinstance(result, dict) or "sources" not in result or "setup" not in result:
        raise ConfigError(f"{args.source_json}: not a comm.json written by `python -m ds_smoes.bench comm`")
    out = args.out or args.source_json.parent
    summary = run_simulation(result, out, args.models, tuple(args.experts), tuple(args.ep_sizes),
                             args.capacity_factor, args.hidden, args.element_size, args.method, args.samples,
                             args.seed)
    print((out / "simulate.md").read_text())
    for line in summary["highlights"]:
        print(f"  {line}")
    uri = None if args.no_mlflow else (args.tracking_uri or default_tracking_uri())
    tracker = Tracker(uri or "", args.experiment, f"bench-simulate-{time.strftime('%Y%m%d-%H%M%S')}",
                      active=uri is not None, tags={"kind": "bench-simulate"})
    tracker.log_params({"from": str(args.source_json), "models": summary["source"], "method": args.method,
                        "capacity_factor": args.capacity_factor, "hidden": summary["inputs"]["hidden"],
                        "element_size": summary["inputs"]["element_size"]})
    for name in FILES:
        tracker.log_file(out / name)
    tracker.end("FINISHED")
    print(f"wrote {', '.join(str(out / f) for f in FILES)}"
          + (f"; MLflow run {tracker.run_id} ({uri})" if tracker.active else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "comm":
            from ds_smoes.bench.comm.command import run

            return run(args)
        if args.command == "infer":
            args.command_line = " ".join(["python -m ds_smoes.bench", *(argv if argv is not None else sys.argv[1:])])
            args.variants_given = args.variants is not None
            if args.shapes is not None:
                from ds_smoes.bench.infer.scale_command import run

                args.variants = args.variants or []
                return run(args)
            from ds_smoes.bench.infer.command import run

            args.variants = args.variants or list(INFER_VARIANTS)
            args.warmup = 2 if args.warmup is None else args.warmup
            args.repeats = 20 if args.repeats is None else args.repeats
            return run(args)
        if args.command == "scale":
            from ds_smoes.bench.scale.command import run

            args.command_line = " ".join(["python -m ds_smoes.bench", *(argv if argv is not None else sys.argv[1:])])
            return run(args)
        return simulate_command(args)
    except SMoESError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as err:
        from ds_smoes.bench.runs import RunFailed

        if not isinstance(err, RunFailed):
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
