"""What every script here shares: its command line under `deepspeed --num_gpus N` (an --out folder,
the launcher's --local_rank, extra options) and the per-rank report OUT/rank{r}.json the tests read."""
import argparse
import json
from pathlib import Path

from ds_smoes.parallel import distributed


def parse_args(*extra: tuple[str, dict]) -> argparse.Namespace:
    """--out FOLDER (required), --local_rank (the launcher's), and `extra` as (flag, add_argument kwargs)."""
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    for flag, kwargs in extra:
        p.add_argument(flag, **kwargs)
    p.add_argument("--local_rank", type=int, default=None)
    return p.parse_args()


def write_report(out: Path, report: dict) -> None:
    (out / f"rank{distributed.rank()}.json").write_text(json.dumps(report, indent=1))
