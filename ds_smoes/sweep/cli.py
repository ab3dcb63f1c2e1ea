"""Command line of the sweeps: run, resume, report.

    python ray_jobs/sweep.py run configs/sweeps/smoke.yaml [--set optim.max_steps=40] [--address ADDR]
    python ray_jobs/sweep.py resume SWEEP_ID
    python ray_jobs/sweep.py report [SWEEP] [--format csv] [--list]

`run` prints the sweep id (NAME-YYYYmmdd-HHMMSS) first; `resume` takes it.  Exit status: 0 all
trials finished, 1 some failed (the others still ran), 2 an error in the sweep file or the
arguments, 130 interrupted (resume it).  `report` reads only MLflow, so it works for any past
sweep in the store, wherever it ran.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ds_smoes.core.errors import SMoESError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python ray_jobs/sweep.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def ray_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("--address", default=None,
                       help="Ray cluster to use (default: RAY_ADDRESS, else a local Ray started in this process)")
        q.add_argument("--storage-path", type=Path, default=None,
                       help="where sweeps keep Tune state and checkpoints (default: runs/sweeps; "
                            "~/ray_results/ds-smoes in a Ray job); shared storage on a multi-node cluster")
        q.add_argument("--verbose", action="store_true",
                       help="also show Ray's own console output: Tune's trial tables and every worker's output "
                            "(by default one line per trial event; workers write to trials/tNN/worker-rankR.log)")

    run = sub.add_parser("run", help="start a sweep")
    run.add_argument("sweep_file", type=Path, help="sweep file (YAML or JSON), e.g. configs/sweeps/smoke.yaml")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                     help="set a training field in every trial (repeatable), e.g. --set optim.max_steps=40")
    run.add_argument("--max-concurrent-trials", type=int, default=None, metavar="N",
                     help="trials at the same time (default: the sweep file's resources.max_concurrent_trials)")
    run.add_argument("--tracking-uri", default=None,
                     help="MLflow store: sqlite:///PATH or http://server (default: sqlite:///$PWD/mlflow.db)")
    ray_options(run)

    resume = sub.add_parser("resume", help="continue an interrupted sweep (finished trials are not re-run)")
    resume.add_argument("sweep", help="the sweep id printed by `run`, or its folder")
    ray_options(resume)

    rep = sub.add_parser("report", help="the comparison table of a past sweep, read from MLflow")
    rep.add_argument("sweep", nargs="?", default=None,
                     help="sweep id, sweep name (its newest run) or parent run id (default: the newest sweep)")
    rep.add_argument("--tracking-uri", default=None, help="MLflow store (default: sqlite:///$PWD/mlflow.db)")
    rep.add_argument("--experiment", default=None, help="only look in this MLflow experiment")
    rep.add_argument("--format", choices=("md", "csv"), default="md", help="Markdown tables or per-trial CSV")
    rep.add_argument("--list", action="store_true", help="list the sweeps in the store")
    return p.parse_args(argv)


def _report(args: argparse.Namespace) -> int:
    from ds_smoes.core.errors import ConfigError
    from ds_smoes.sweep import report
    from ds_smoes.sweep.common import resolve_tracking_uri
    from ds_smoes.sweep.store import SweepStore

    uri = resolve_tracking_uri(args.tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ConfigError(f"no MLflow store at {uri}: pass --tracking-uri")
    store = SweepStore(uri)
    if args.list:
        for p in store.parents(args.experiment):
            note = "  (not ended: running now, or abandoned: resume it by its id)" if p.status == "RUNNING" else ""
            print(f"{p.tags.get('sweep.id', p.name):40s} {p.status:9s} {p.params.get('sweep.num_trials', '?'):>4s} "
                  f"trials  run {p.run_id}  experiment {store.experiment_name(p.experiment_id)!r}{note}")
        return 0
    parents = store.parents(args.experiment, args.sweep) if args.sweep else [
        p for p in [store.default_parent(args.experiment)] if p is not None]
    if not parents:
        raise ConfigError(f"no sweep {args.sweep!r} in {uri}" if args.sweep else f"no sweeps in {uri}")
    if not args.sweep and parents[0].status == "RUNNING":
        print(f"(no sweep has ended; showing {parents[0].tags.get('sweep.id', parents[0].name)}, still RUNNING)",
              file=sys.stderr)
    print(report.render(store, parents[0].run_id, args.format))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "report":
            return _report(args)
        from ds_smoes.sweep.driver import resume_sweep, start_sweep

        if args.command == "run":
            outcome = start_sweep(args.sweep_file, args.overrides, address=args.address,
                                  storage=args.storage_path, tracking_uri=args.tracking_uri,
                                  max_concurrent=args.max_concurrent_trials, verbose=args.verbose)
        else:
            outcome = resume_sweep(args.sweep, address=args.address, storage=args.storage_path, verbose=args.verbose)
        return outcome.exit_code
    except SMoESError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
