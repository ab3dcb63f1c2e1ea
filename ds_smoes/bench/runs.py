"""The trained models the benchmarks measure: found in a run directory, or trained by the demo
recipe through the DeepSpeed launcher (as `make demo` does, output under runs/bench/).

A *recipe* is the demo config plus a few overrides that pick the model: the routing method
(`smoes`, `topk`, `hard`), SMoES trained with one bin per token (`smoes-bin1`), or the dense
VLM with the same active parameters (`dense`: no MoE layer, every block's MLP 3 d_model wide
instead of 2 d_model, so its 4 MLPs hold the weights a token meets in the MoE model's 2 MLPs and
2 x 2 experts (top-2) of 2 d_model each; bench infer prints both counts)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ds_smoes.core.errors import ConfigError
from ds_smoes.parallel.launch import free_port


@dataclass(frozen=True)
class Recipe:
    name: str
    label: str
    gate: str | None                   # the gate a finished run's metrics.json must name (None: a dense model)
    overrides: tuple[str, ...] = ()    # applied after the base config and the user's --set


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("smoes", "SMoES", "smoes"),
    Recipe("topk", "DeepSpeed top-k", "topk", ("smoes.gate=topk",)),
    Recipe("hard", "hard modality routing", "hard", ("smoes.gate=hard",)),
    Recipe("smoes-bin1", "SMoES, one bin per token", "smoes", ("smoes.max_bins_per_token=1",)),
    Recipe("dense", "dense VLM, same active parameters", None, ("model.moe_layers=none", "model.ffn_mult=3")),
)}
# what must agree between the benchmark's config and a run's metrics.json
CHECKED_FIELDS = ("num_experts", "k", "ep_size", "num_bins")
# rank 0's lines of a training run worth echoing as progress
PROGRESS = re.compile(r"^(\[epoch |  validation after|evaluating|data:|model:|error|Traceback|  accuracy, )")


class RunFailed(RuntimeError):
    """A subprocess (training or the measurement) failed; the message names its log."""


def default_run_dir(out_dir: Path, recipe: str, epochs: float | None) -> Path:
    """runs/bench/<recipe>, or runs/bench/<recipe>-epochs<N> for a shortened recipe."""
    return out_dir / (recipe if epochs is None else f"{recipe}-epochs{epochs:g}")


def is_complete(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").is_file() and (run_dir / "checkpoint" / "final").is_dir()


def load_run(run_dir: Path, recipe: str, smoes_cfg, model_cfg=None) -> dict:
    """metrics.json of a finished run of `recipe` (a RECIPES name), checked against the recipe's gate and the
    layout the benchmark builds and, when
    `model_cfg` is given and the run saved its train_config.json, against every model field (its checkpoint
    loads only into the same architecture)."""
    if not is_complete(run_dir):
        raise ConfigError(f"{run_dir}: not a finished training run (needs metrics.json and checkpoint/final, "
                          f"as `make demo` or `python -m ds_smoes.train` write them); leave the flag out to let "
                          "the benchmark train the model")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    gate = RECIPES[recipe].gate
    if gate is not None and metrics.get("gate") != gate:
        raise ConfigError(f"{run_dir}: trained with gate {metrics.get('gate')!r}, but the benchmark needs a "
                          f"{gate!r} model here")
    wrong = [f"{f}={metrics.get(f)} (benchmark config: {getattr(smoes_cfg, f)})" for f in CHECKED_FIELDS
             if f in metrics and metrics[f] != getattr(smoes_cfg, f)]
    saved = run_dir / "train_config.json"
    if model_cfg is not None and saved.is_file():
        trained_model = json.loads(saved.read_text()).get("model", {})
        wrong += [f"model.{f}={trained_model[f]} (benchmark config: {v})" for f, v in model_cfg.model_dump().items()
                  if f in trained_model and trained_model[f] != v]
    if wrong:
        raise ConfigError(f"{run_dir}: trained with " + ", ".join(wrong) + "; pass the same --config/--set "
                          "as the training run, or give this recipe its own --out (the benchmark then trains "
                          "its models there)")
    return metrics


def launcher_command(module: str, ranks: int, args: list[str]) -> list[str]:
    """`deepspeed --num_gpus N --master_port P --module MODULE ARGS` with this interpreter's launcher."""
    launcher = str(Path(sys.executable).parent / "deepspeed")
    return [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module", module, *args]


def train_args(config: Path, overrides: list[str], recipe: str, run_dir: Path, epochs: float | None,
               tracking_uri: str | None, experiment: str, parent_run_id: str | None) -> list[str]:
    """Arguments of `ds_smoes.train` for `recipe` (a RECIPES name) into `run_dir` (pure)."""
    items = [*overrides, *RECIPES[recipe].overrides, f"run.output_dir={run_dir.resolve()}",
             "run.save_checkpoint=true"]
    if epochs is not None:
        items.append(f"optim.epochs={epochs:g}")
    args = ["--config", str(config), "--run-name", f"bench-{run_dir.name}"]
    for item in items:
        args += ["--set", item]
    if tracking_uri is None:
        args.append("--no-mlflow")
    else:
        args += ["--tracking-uri", tracking_uri, "--experiment", experiment]
        if parent_run_id:
            args += ["--parent-run-id", parent_run_id]
    return args


def stream(cmd: list[str], log_path: Path, echo: Callable[[str], None], keep: Callable[[str], bool]) -> int:
    """Run `cmd`, writing all output to `log_path` and echoing the lines `keep` accepts."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    import torch

    if not torch.cuda.is_available():  # else DeepSpeed finds the GPUs (and NCCL) itself
        env.setdefault("DS_ACCELERATOR", "cpu")
    with open(log_path, "w") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True, env=env) as proc:
        for line in proc.stdout:
            log.write(line)
            if keep(line):
                echo(line.rstrip("\n"))
        return proc.wait()


def train(gate: str, run_dir: Path, config: Path, overrides: list[str], epochs: float | None, ranks: int,
          tracking_uri: str | None, experiment: str, parent_run_id: str | None,
          echo: Callable[[str], None] = print) -> None:
    """Train `gate`'s recipe (a RECIPES name) into `run_dir` on `ranks` CPU ranks, echoing its progress."""
    t0 = time.time()
    echo(f"training the {gate} model by the demo recipe into {run_dir}"
         + (f" ({epochs:g} epochs)" if epochs is not None else "") + f"; log: {run_dir / 'train.log'}")
    cmd = launcher_command("ds_smoes.train", ranks, train_args(config, overrides, gate, run_dir, epochs,
                                                                 tracking_uri, experiment, parent_run_id))
    code = stream(cmd, run_dir / "train.log", lambda line: echo(f"  [{gate}] {line}"),
                  lambda line: bool(PROGRESS.match(line)))
    if code != 0 or not is_complete(run_dir):
        raise RunFailed(f"training the {gate} model failed (exit {code}); see {run_dir / 'train.log'}")
    echo(f"trained the {gate} model in {time.time() - t0:.0f}s")


def measure(module: str, ranks: int, args: list[str], raw_path: Path, log: Path, echo: Callable[[str], None],
            prefixes: tuple[str, ...] = (), what: str = "the measurement") -> dict:
    """Launch a benchmark worker `module` on `ranks` ranks (DeepSpeed launcher) with `args` (which tell it to write
    `raw_path`), echo its lines that start with `prefixes` (and errors), and return the JSON it wrote.

    Exit 2 is a user error the worker printed already (ConfigError here); any other failure, or no file, is
    RunFailed naming the log."""
    if raw_path.exists():
        raw_path.unlink()
    code = stream(launcher_command(module, ranks, args), log, echo,
                  lambda line: line.startswith((*prefixes, "error", "Traceback")))
    if code != 0 or not raw_path.exists():
        if code == 2:
            raise ConfigError(f"{what} stopped on an error (see {log})")
        raise RunFailed(f"{what} failed (exit {code}); see {log}")
    return json.loads(raw_path.read_text())


def wrote_line(paths: list[Path], seconds: float, tracker, uri: str | None) -> str:
    """The closing line of a benchmark command: what it wrote, how long it took, its MLflow run."""
    return (f"wrote {', '.join(str(p) for p in paths)} in {seconds:.0f}s"
            + (f"; MLflow run {tracker.run_id} ({uri})" if tracker.active else ""))


def worker_main(out_path: Path, produce: Callable[[], dict]) -> int:
    """A benchmark worker's body: join the launcher's process group, `produce()` the raw result, rank 0 writes it
    (`write_raw`); a user error (SMoESError) is printed once and exits 2."""
    from ds_smoes.core.errors import SMoESError
    from ds_smoes.parallel.console import report_error
    from ds_smoes.parallel.launch import init_distributed

    try:
        init_distributed()
        write_raw(out_path, produce())
    except SMoESError as err:
        return report_error(err)
    return 0


def publish(out_dir: Path, stem: str, result: dict, report: Callable[[dict], str], metrics: Callable[[dict], dict],
            tracker, uri: str | None, seconds: float, echo: Callable[[str], None]) -> None:
    """A benchmark command's last step: the result (with its MLflow run id) as `stem`.json (strict JSON) and its
    `report` as `stem`.md under `out_dir`, the table echoed, `metrics(result)` and both files logged to the
    tracker's run when it is active, then the closing line."""
    from ds_smoes.bench.comm.report import strict_json

    result["mlflow_run_id"] = tracker.run_id
    markdown = report(result)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    paths[0].write_text(strict_json(result))
    paths[1].write_text(markdown)
    echo("\n" + markdown)
    if tracker.active:
        tracker.log_metrics(metrics(result))
        for path in paths:
            tracker.log_file(path)
    echo(wrote_line(paths, seconds, tracker, uri))


def write_raw(path: Path, result: dict) -> None:
    """A benchmark worker's last step: rank 0 writes the raw result as JSON, then every rank waits for it."""
    from ds_smoes.parallel import distributed

    if distributed.rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    distributed.barrier()
