"""`python -m ds_smoes.pipeline`: the MoE-LLaVA recipe for one seed and one stage-III gate (docs/recipe.md).

    python -m ds_smoes.pipeline --config configs/recipe/canvas32.yaml                   # seed 0, SMoES
    python -m ds_smoes.pipeline --config configs/recipe/canvas32.yaml --seed 1 --variant topk
    python -m ds_smoes.pipeline --config configs/recipe/canvas48.yaml --set moe.epochs=12

Stages: vision (stage 0: the encoder), language (the language model), align (stage I: the projector, encoder and
language model frozen, on captions), dense (stage II), moe (stage III: upcycled from the dense model, the chosen
gate, rank_once dispatch).  Finished stages are reused (a second gate trains only its MoE stage), an interrupted
one resumes from its last epoch: run the same command again.  MLflow: one parent run, a child per stage.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ds_smoes.core.errors import SMoESError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ds_smoes.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("configs/recipe/canvas32.yaml"), help="pipeline YAML")
    p.add_argument("--seed", type=int, default=None, help="seed of every stage (default: the file's)")
    p.add_argument("--variant", default=None, help="stage III's gate, a variant of python -m ds_smoes.compare")
    p.add_argument("--out", type=Path, default=None, help="output root (default: the file's out_dir)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                   help="override a pipeline field, e.g. --set moe.epochs=12 (repeatable)")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default: sqlite:///$PWD/mlflow.db)")
    p.add_argument("--experiment", default="ds-smoes-recipe", help="MLflow experiment")
    p.add_argument("--no-mlflow", action="store_true", help="log nothing to MLflow")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from ds_smoes.app.pipeline import Pipeline, print_summary
        from ds_smoes.app.pipeline_config import load_pipeline_config
        from ds_smoes.app.tracking import default_tracking_uri

        overrides = list(args.overrides)
        for key, value in (("seed", args.seed), ("variant", args.variant),
                           ("out_dir", args.out.resolve() if args.out else None)):
            if value is not None:
                overrides.append(f"{key}={value}")
        cfg = load_pipeline_config(args.config, overrides)
        uri = None if args.no_mlflow else (args.tracking_uri or default_tracking_uri())
        pipeline = Pipeline(cfg, uri, args.experiment)
        try:
            pipeline.run()
        except KeyboardInterrupt:
            print("\ninterrupted: run the same command again to resume (finished stages are reused, the "
                  "interrupted one continues from its last epoch)", file=sys.stderr)
            return 130
        print_summary(pipeline.summary)
        if uri is not None:
            print(f"  MLflow parent run {pipeline.parent.run_id} ({uri})")
    except SMoESError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
