"""Run under `deepspeed --num_gpus 2`: every 2-rank scenario of this folder in ONE launch (one process group,
one start-up of torch, DeepSpeed and the launcher, instead of one per scenario), each writing its per-rank
report into OUT/<scenario>/rank{r}.json as it does when run alone.

A scenario that raises on a rank is recorded in OUT/<scenario>/error{r}.txt, and the launch stops there: a
rank that left a collective half-way would leave the other waiting in the next one.  The tests read the
reports through the `two_rank_scenarios` fixture (tests/conftest.py), which names the scenario that failed.

Each scenario is `(name, script, extra arguments)`; the script's own `main()` runs with
`--out OUT/<name> [extra]` as its command line, so every script still runs alone as well:
`deepspeed --num_gpus 2 tests/dist_scripts/<script>.py --out DIR`."""
import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

from ds_smoes.parallel import distributed
from ds_smoes.parallel.launch import init_distributed

SCENARIOS = (
    ("rank_once_parity", "rank_once_parity", ()),
    ("rank_once_bf16", "rank_once_bf16", ()),
    ("ckpt_roundtrip-gaussian", "ckpt_roundtrip", ("--score-type", "gaussian")),
    ("ckpt_roundtrip-attention", "ckpt_roundtrip", ("--score-type", "attention")),
    ("all_gates", "all_gates", ()),
    ("generation_cache", "generation_cache", ()),
    ("placement_parity", "placement_parity", ()),
    ("step_updates_checkpointing", "step_updates_checkpointing", ()),
    ("token_pruning", "token_pruning", ()),
    ("reshard_resume", "reshard_resume", ()),
    ("resume_from_checkpoint", "resume_from_checkpoint", ("--config", "{small_config}")),
    ("train_variants", "train_variants", ("--config", "{small_config}")),
    ("hf_train", "hf_train", ()),
    ("upcycle_run", "upcycle_run", ("--config", "{small_config}")),
    # last: AutoEP makes expert-parallel groups of its own in DeepSpeed's global group registry
    ("autoep", "autoep", ()),
    ("autoep_smoes", "autoep_smoes", ()),
    ("hf_autoep", "hf_autoep", ()),
)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--small-config", type=Path, required=True, help="the small-split training config (sweep_util)")
    p.add_argument("--only", nargs="*", default=None, help="run these scenarios only")
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_args()
    init_distributed()
    rank = distributed.rank()
    for name, script, extra in SCENARIOS:
        if args.only is not None and name not in args.only:
            continue
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        argv = [f"{script}.py", "--out", str(out), *(a.format(small_config=args.small_config) for a in extra)]
        t0 = time.time()
        saved_argv, sys.argv = sys.argv, argv
        try:
            importlib.import_module(script).main()
        except BaseException:  # noqa: BLE001  (recorded for the test, then the whole launch stops)
            (out / f"error{rank}.txt").write_text(traceback.format_exc())
            sys.stdout.write(f"scenario {name}: FAILED on rank {rank}\n{traceback.format_exc()}")
            sys.stdout.flush()
            os._exit(3)
        finally:
            sys.argv = saved_argv
        distributed.barrier()
        if rank == 0:
            sys.stdout.write(f"scenario {name}: done in {time.time() - t0:.1f}s\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
