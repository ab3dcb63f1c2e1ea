"""One training run for every model family: engine, resumable loop, expert placement when the bins
freeze, checkpoint, tracking, evaluation, summary.

    run_session(BuiltinFamily(cfg), ...)      # the built-in MoE-LLaVA (`run_training`)
    run_session(HFFamily(hf_cfg), ...)        # a converted Hugging Face MoE-VLM (`run_hf_training`)

The family (`ds_smoes.app.family`) brings the data, the model, the forward and the evaluation;
everything here is the same for both.  Kept apart from the command line (`ds_smoes.app.train`) so
the Ray trials can call it inside their workers with a validated config.
"""
from __future__ import annotations

import importlib.util
import json
import math
import random
import time
from pathlib import Path
from typing import Callable

import torch

from ds_smoes.moe.updates import register_step_updates
from ds_smoes.app.builtin import BuiltinFamily
from ds_smoes.app.config import TrainConfig
from ds_smoes.app.family import ModelFamily
from ds_smoes.app.loop import TrainWindow, resumable_epochs, train_loader
from ds_smoes.core.errors import ConfigError, RunInterrupted, SMoESError
from ds_smoes.parallel.stop import StopRequests
from ds_smoes.parallel import distributed
from ds_smoes.parallel.launch import no_shm_comm_op_build

def lr_lambda(total_steps: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The optimizer's param groups: decay / no_decay, each split by DeepSpeed into non-expert and expert
    groups.  Their order is the parameter order of every saved optimizer state (ds_smoes.app.reshard).  Frozen
    parameters (requires_grad False: a pretrained encoder, model.freeze_vision) are in no group: no update and
    no optimizer state."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or name.endswith("pos_TD") else decay).append(p)
    return split_params_into_different_moe_groups_for_optimizer([
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}])


def build_engine(cfg: TrainConfig, model: torch.nn.Module, total_steps: int, family: ModelFamily | None = None):
    """The DeepSpeed engine of `model` (`family` completes the DeepSpeed config and sees the engine once built)."""
    import deepspeed

    path = Path(cfg.run.deepspeed_config)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {str(path)!r} not found (run.deepspeed_config)")
    try:
        ds_config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from None
    for key in ("optimizer", "scheduler", "train_batch_size"):
        if key in ds_config:
            raise ConfigError(f"{path}: remove {key!r}; the optimizer, schedule and batch size come from the "
                              f"training config (optim.*) so one file decides them")
    ds_config["train_micro_batch_size_per_gpu"] = cfg.optim.micro_batch_size
    ds_config.setdefault("gradient_accumulation_steps", 1)
    if family is not None:
        ds_config = family.deepspeed_config(ds_config)
    optimizer = torch.optim.AdamW(optimizer_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio))
    no_shm_comm_op_build()  # where no launcher group was joined first, deepspeed.initialize starts the backend
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    if family is not None:
        family.engine_built(engine)
    # bins and Gaussian statistics change once per optimizer step, before it (DeepSpeed's wrappers call this step;
    # registered once the engine is built: AutoEP's layers get their gates only then)
    register_step_updates(engine.optimizer, model)
    return engine, ds_config


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _fmt_time(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def run_training(cfg: TrainConfig, output_json: Path | None = None, parent_run_id: str | None = None,
                 init_distributed: Callable[[], None] | None = None, log: Callable = print,
                 epoch_callback: Callable[[int, int, dict, object], None] | None = None,
                 resume_from: Path | None = None, init_from: Path | None = None, eval_only: bool = False) -> dict:
    """Train, evaluate and log one configuration of the built-in model; returns the final figures (on every
    rank).  `init_from` is a deployment export (`python -m ds_smoes.export`): weights and SMoES buffers start
    from it, each EP rank taking its own experts.  The other arguments are `run_session`'s."""
    return run_session(BuiltinFamily(cfg, init_from=init_from), output_json=output_json,
                       parent_run_id=parent_run_id, init_distributed=init_distributed, log=log,
                       epoch_callback=epoch_callback, resume_from=resume_from, eval_only=eval_only)


def run_session(family: ModelFamily, output_json: Path | None = None, parent_run_id: str | None = None,
                init_distributed: Callable[[], None] | None = None, log: Callable = print,
                epoch_callback: Callable[[int, int, dict, object], None] | None = None,
                resume_from: Path | None = None, eval_only: bool = False) -> dict:
    """Train, evaluate and log one run of `family`; returns the final figures (on every rank).

    `epoch_callback(epoch, step, metrics, engine)` is called on every rank after each epoch (the
    last, possibly partial, one included), after validation; `epoch` counts finished epochs and
    `metrics` holds the latest training and validation figures.  A caller saves checkpoints there:
    `engine.save_checkpoint(dir, client_state={"step": step, "epoch": epoch})` is a collective.
    `resume_from` is such a DeepSpeed checkpoint folder: the engine (weights, optimizer, schedule,
    SMoES buffers) is loaded from it and training continues from its step.  `eval_only` skips training.
    """
    from ds_smoes.app.tracking import Tracker, default_tracking_uri, flatten

    cfg = family.cfg
    t_start = time.time()
    stop = StopRequests()   # before the process group: it tells a launcher's rank from a direct run
    if init_distributed is not None:
        init_distributed()
    stop.install()
    world, rank = distributed.world_size(), distributed.rank()
    seed_everything(cfg.run.seed)
    out_dir = Path(cfg.run.output_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(cfg.model_dump_json(indent=2))  # what export reads

    if eval_only:
        log(f"evaluation only: no training; the figures go to {out_dir / 'metrics.json'}")
    family.build(rank, log)
    model = family.model
    ep = family.smoes.ep_size
    if model.moe_layers() and world % ep:
        raise ConfigError(f"smoes.ep_size={ep} does not divide the number of ranks ({world}): launch "
                          f"`deepspeed --num_gpus {ep} --module ds_smoes.train ...` or set --set smoes.ep_size=1")
    sampler, loader, total_steps = train_loader(family.train_set, cfg, world, rank, family.collate)
    if eval_only:
        total_steps = 0
    engine, ds_config = build_engine(cfg, model, total_steps, family)
    _check_placement_supported(family.smoes, ds_config, total_steps, cfg.run.deepspeed_config)
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    log(f"{family.describe()}; world {world}; {total_steps} steps")

    run_name = cfg.tracking.run_name or family.run_name() + ("-eval" if eval_only else "")
    tracker = Tracker(cfg.tracking.tracking_uri or default_tracking_uri(), cfg.tracking.experiment, run_name,
                      active=rank == 0 and cfg.tracking.enabled,
                      tags={**family.tags(), "mode": "eval" if eval_only else "train"}, parent_run_id=parent_run_id)
    resolved = family.resolved_config()
    tracker.log_params({**flatten("", resolved), "world_size": world, "deepspeed.zero_stage": zero_stage})
    tracker.log_dict(resolved, "config.json")
    if tracker.active:
        log(f"mlflow: run {tracker.run_id} in experiment {cfg.tracking.experiment!r} at {tracker.tracking_uri}")

    status = "FAILED"
    try:
        step, epoch, pending_rng = _resume(engine, resume_from, len(loader), total_steps, log, scratch_dir=out_dir,
                                           tracker=tracker)
        start_step = step
        if cfg.run.checkpoint_every_epoch and not eval_only:
            epoch_callback = _with_epoch_checkpoints(epoch_callback, out_dir / "checkpoint")
        figures = _train_loop(family, engine, loader, sampler, step, epoch, total_steps, tracker, log,
                              epoch_callback=epoch_callback, stop=stop, pending_rng=pending_rng)
        final = {"steps": total_steps, "steps_this_run": max(0, total_steps - start_step)}
        if cfg.run.save_checkpoint and not eval_only:
            ckpt = out_dir / "checkpoint"
            engine.save_checkpoint(str(ckpt), tag="final", client_state={"step": total_steps,
                                                                          "epoch": figures["epoch"]})
            final["checkpoint"] = str(ckpt)
        if not eval_only:
            _drop_resumable(out_dir / "checkpoint")

        # -- final evaluation on the held-out split -------------------------------------------------
        log("evaluating on the held-out test split ...")
        acc, routing = family.evaluate(model, family.test_set, engine.device, with_routing=True)
        final.update(_final_figures(acc, routing, figures, family.smoes, cfg.run.seed, world, zero_stage))
        final.update(family.final_figures())
        final["mlflow_run_id"] = tracker.run_id
        final["mlflow_tracking_uri"] = tracker.tracking_uri if tracker.active else None
        final["mlflow_experiment_id"] = getattr(tracker, "experiment_id", None) if tracker.active else None
        final.update(family.export(out_dir, log))
        if eval_only:   # no training happened: no throughput, steps or training loss to report
            for key in _TRAINING_KEYS:
                final.pop(key, None)
        status = "FINISHED"
    except RunInterrupted as err:
        status = "KILLED"
        tracker.set_tags({"end_reason": str(err)[:5000]})
        raise
    except KeyboardInterrupt:   # a second Ctrl-C: stopped at once, nothing saved
        status = "KILLED"
        tracker.set_tags({"end_reason": "interrupted twice: stopped without saving"})
        raise
    except SMoESError as err:   # the reason, on the MLflow run too (FAILED below)
        tracker.set_tags({"failure_reason": str(err)[:5000]})
        raise
    finally:
        stop.uninstall()
        if status != "FINISHED":
            tracker.end(status)
    final["wall_seconds"] = time.time() - t_start

    if rank == 0:
        family.save_artifacts(out_dir, final, tracker)
        if model.moe_layers() and importlib.util.find_spec("matplotlib") is None:
            log("no expert_modality_heatmap.png: matplotlib is not installed")
        elif model.moe_layers():
            from ds_smoes.app.plots import expert_modality_heatmap  # matplotlib: only where it is installed

            bin_LE = torch.stack([layer.gate.binning.bin_E for layer in model.moe_layers()])
            fig = expert_modality_heatmap(routing.load_LME, bin_LE, title=f"{run_name} (test split)")
            fig.savefig(out_dir / "expert_modality_heatmap.png", dpi=120)
            tracker.log_figure(fig, "expert_modality_heatmap.png")
        tracker.log_metrics({k: v for k, v in final.items() if isinstance(v, (int, float))
                             and not isinstance(v, bool)}, step=total_steps)
        tracker.log_metrics({f"acc_task/{t}": a for t, a in final.get("acc_by_task", {}).items()}, step=total_steps)
        for l, value in enumerate(final["msi_per_layer"]):
            tracker.log_metrics({"msi_layer": value}, step=l)
        tracker.log_dict(final, "metrics.json")
        tracker.end("FINISHED")
        (out_dir / "metrics.json").write_text(_to_json(final))
        if output_json:
            Path(output_json).parent.mkdir(parents=True, exist_ok=True)
            Path(output_json).write_text(_to_json(final))
        _print_summary(final, log)
    distributed.barrier()
    return final


_TRAINING_KEYS = ("steps", "steps_this_run", "tokens_per_s", "train_seconds", "final_train_loss")


def _final_figures(acc: dict, routing, figures: dict, s, seed: int, world: int, zero_stage: int) -> dict:
    """metrics.json's common entries: accuracy, routing and communication, throughput, the run's settings
    (`s`: the SMoES settings the model was built with)."""
    return {
        **{k: acc[k] for k in ("acc_multimodal", "acc_language", "acc_overall")},
        "num_test_multimodal": acc["num_multimodal"], "num_test_language": acc["num_language"],
        **({"acc_by_task": acc["acc_by_task"], "num_test_by_task": acc["num_by_task"]} if "acc_by_task" in acc else {}),
        "test_loss": routing.loss,
        "msi": routing.msi,
        "msi_per_layer": routing.msi_per_layer(),
        "tokens_per_s": figures["tokens_per_s"],
        "train_seconds": figures["train_seconds"],
        "cross_rank_rate": routing.mean("cross_rank_rate"),
        "ranks_per_token": routing.mean("ranks_per_token"),
        "remote_pairs_per_token": routing.mean("remote_pairs_per_token"),
        # measured from the dispatch's own split sizes (MoECall.remote_bytes), per MoE layer
        "bytes_per_token": routing.mean("remote_bytes_per_token"),
        # the same bytes summed over every MoE layer (and rank), per test conversation; and the MoE token visits
        "bytes_per_sample": routing.bytes_per_sample,
        "moe_tokens_per_sample": routing.moe_tokens_per_sample,
        # the prefill forward of the evaluation's generate, per row: median over batches, slowest rank
        "prefill_ms_per_sample": acc.get("prefill_ms_per_sample", float("nan")),
        # rank_once only: what DeepSpeed's stock dispatch would have sent for the same routes (its dropless capacity)
        **({"stock_bytes_per_token": routing.mean("stock_remote_bytes_per_token")}
           if "stock_remote_bytes_per_token" in routing.comm else {}),
        "dispatch": s.dispatch,
        "cross_rank_rate_physical": routing.mean("cross_rank_rate_physical"),
        "ranks_per_token_physical": routing.mean("ranks_per_token_physical"),
        "cross_rank_rate_per_layer": routing.comm.get("cross_rank_rate", []),
        "gate": s.gate, "score_type": s.score_type, "num_bins": s.num_bins, "num_experts": s.num_experts,
        "k": s.k, "ep_size": s.ep_size, "world_size": world, "binning": s.binning, "seed": seed,
        "zero_stage": zero_stage, "final_train_loss": figures["final_loss"],
    }


def _to_json(figures: dict) -> str:
    """Strict JSON: NaN and infinities (e.g. communication figures of a model without MoE layers) become null."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, list):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v
    return json.dumps({k: clean(v) for k, v in figures.items()}, indent=2, allow_nan=False)


def _saving(sent: float, stock: float) -> str:
    """'-42.1 %': what the dispatch sent relative to the stock dispatch's bytes."""
    return f"{100.0 * (sent - stock) / stock:+.1f} %" if stock else "n/a"


def _print_summary(final: dict, log: Callable) -> None:
    log("")
    log("== results (held-out test split) " + "=" * 40)
    rows = [("accuracy, multimodal questions", f"{final['acc_multimodal']:.4f}  ({final['num_test_multimodal']} q)"),
            ("accuracy, language-only questions", f"{final['acc_language']:.4f}  ({final['num_test_language']} q)"),
            ("accuracy, overall", f"{final['acc_overall']:.4f}"),
            *([("accuracy per task", ",  ".join(f"{t} {a:.3f} ({final['num_test_by_task'][t]} q)"
                                                 for t, a in final["acc_by_task"].items()))]
              if final.get("acc_by_task") else []),
            ("modality specialisation index (MSI)", f"{final['msi']:.4f}  per layer "
             + ", ".join(f"{v:.3f}" for v in final["msi_per_layer"])),
            ("training throughput", f"{final['tokens_per_s']:.0f} tokens/s (all ranks)"
             if "tokens_per_s" in final else "(evaluation only)"),
            ("cross-rank rate, bins placed on EP ranks", f"{final['cross_rank_rate']:.4f}"),
            ("ranks per token, bins placed on EP ranks", f"{final['ranks_per_token']:.4f}"),
            ("cross-rank rate, where the experts are", f"{final['cross_rank_rate_physical']:.4f}"),
            (f"remote bytes per token and MoE layer ({final['dispatch']} dispatch)", f"{final['bytes_per_token']:.0f}"
             + (f"  (DeepSpeed's stock dispatch, same routes: {final['stock_bytes_per_token']:.0f}, "
                f"{_saving(final['bytes_per_token'], final['stock_bytes_per_token'])})"
                if final.get("stock_bytes_per_token") else "")),
            ("remote bytes per sample, all MoE layers", _per_sample(final)),
            *_vision_rows(final),
            ("prefill latency", f"{final['prefill_ms_per_sample']:.2f} ms per sample  (the prefill forward of "
             "the test generation per batch row: median over batches, slowest rank)"
             if _finite(final.get("prefill_ms_per_sample")) else "n/a"),
            ("wall time", _fmt_time(final["wall_seconds"]))]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        log(f"  {name:<{width}}  {value}")
    log("  (remote bytes: what the EP dispatch sent to other ranks, dispatch + combine, forward only; per token and "
        "MoE layer = each layer's bytes / the tokens it routed, averaged over the layers; per sample = the bytes of "
        "every MoE layer and rank summed / the test conversations, language-only ones included)")
    if final.get("mlflow_run_id"):
        log(f"  MLflow run {final['mlflow_run_id']}  ({final['mlflow_tracking_uri']})")
    if final.get("mlflow_experiment_id") is not None:
        from ds_smoes.app.tracking import runs_table_url

        log(f"  MLflow UI (after make mlflow-ui): {runs_table_url(final['mlflow_experiment_id'])}")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _per_sample(final: dict) -> str:
    if not _finite(final.get("bytes_per_sample")):
        return "n/a"
    return (f"{final['bytes_per_sample']:,.0f}  ({final['moe_tokens_per_sample']:,.1f} MoE token visits per sample)"
            if _finite(final.get("moe_tokens_per_sample")) else f"{final['bytes_per_sample']:,.0f}")


def _vision_rows(final: dict) -> list[tuple[str, str]]:
    """The vision tokens per image (built-in model): patches, into the LLM, into its last layers where they differ."""
    if "vision_tokens_kept" not in final:
        return []
    method = final.get("compress_method", "none")
    pre, kept = final["vision_tokens_pre_llm"], final["vision_tokens_kept"]
    text = f"{kept} of {final['vision_patches_per_image']} patches ({method}"
    text += (f", keep {final['keep_ratio']:g})" if method != "none" else ")")
    if pre != kept:
        text += f": {pre} enter the LLM, {kept} from block {final['in_llm_layer']} on"
    return [("vision tokens per image, LLM's last layers", text)]


def _check_placement_supported(s, ds_config: dict, total_steps: int, ds_config_path) -> None:
    """Expert placement moves per-parameter Adam state: refuse a run whose bins freeze (and whose experts
    would then move) under ZeRO stage 1 or 2 or DeepSpeed's bf16/fp16 optimizers, which keep that state in flat
    buffers, before it trains (`s`: SMoESConfig)."""
    zero = ds_config.get("zero_optimization", {}).get("stage", 0)
    low_precision = [k for k in ("bf16", "fp16") if ds_config.get(k, {}).get("enabled", False)]
    if s.moves_experts(total_steps) and (zero or low_precision):
        what = f"ZeRO stage {zero}" if zero else f"{low_precision[0]} (its fp32 master weights and Adam state)"
        raise ConfigError(f"smoes.placement='bins' moves experts with their Adam state between EP ranks when the bins "
                          f"freeze (step {s.rebin_freeze_step} of {total_steps}); ds-smoes moves a plain torch "
                          f"optimizer's state only, and {ds_config_path} keeps it in DeepSpeed's flat buffers "
                          f"({what}): set smoes.placement=none (the bins stay where DeepSpeed put the experts), "
                          "smoes.binning=fixed, or train in fp32 with ZeRO stage 0")


def _place_experts(moe_layers, engine, step: int, tracker, log: Callable) -> None:
    """Move every layer's experts onto their bins' EP ranks (once, when the bins freeze); log the cost."""
    moved, bytes_sent, seconds, per_expert = 0, 0.0, 0.0, 0
    for layer in moe_layers:
        if layer.placement_due():
            cost = layer.place_experts(engine.optimizer)
            moved, seconds, per_expert = moved + cost.experts_moved, seconds + cost.seconds, cost.bytes_per_expert
            bytes_sent += cost.bytes_sent
    total = distributed.world_sum_(torch.tensor([bytes_sent, seconds], dtype=torch.float64))
    world = distributed.world_size()
    tracker.log_metrics({"placement/experts_moved": moved, "placement/bytes_sent": float(total[0]),
                         "placement/seconds": float(total[1]) / world, "placement/step": step}, step=step)
    log(f"placement at step {step} (bins frozen): moved {moved} experts onto their bins' EP ranks, "
        f"{float(total[0]) / 1e6:.2f} MB sent between ranks (weights + optimizer state, "
        f"{per_expert / 1e3:.1f} kB per expert), {float(total[1]) / world * 1e3:.1f} ms")


def _resume(engine, resume_from: Path | None, steps_per_epoch: int, total_steps: int,
            log: Callable, scratch_dir: Path | None = None, tracker=None) -> tuple[int, int]:
    """(step, epoch) to start from: (0, 0), or a DeepSpeed checkpoint's client_state (one without an epoch,
    as older Hugging Face runs saved, resumes in the epoch its step falls in).  A checkpoint saved at
    another ep_size is converted first (`_reshard_for_engine`) into a folder under `scratch_dir`.  The MLflow
    run that saved the state (client_state's mlflow_run_id), when `tracker`'s store still shows it RUNNING (its
    processes were killed before they could end it), is ended as KILLED with the reason."""
    if resume_from is None:
        return 0, 0, None
    converted = _reshard_for_engine(engine, Path(resume_from), scratch_dir, log)
    try:
        load_path, client_state = engine.load_checkpoint(str(converted or resume_from))
    finally:
        if converted is not None:
            distributed.barrier()
            if distributed.rank() == 0:
                import shutil

                shutil.rmtree(converted, ignore_errors=True)
    if load_path is None or "step" not in (client_state or {}):
        raise ConfigError(f"{resume_from}: no DeepSpeed checkpoint with a step in its client_state")
    rng = load_rng(Path(load_path).parent) if converted is None else None
    step = int(client_state["step"])
    epoch = int(client_state.get("epoch", step // steps_per_epoch))
    # The random state continues the uninterrupted run's stream.  Each epoch's data iterator draws one number
    # from it when it is created: a run resumed at an epoch's end takes the state now (its next iterator draws
    # as the uninterrupted one did); one resumed mid-epoch after that epoch's iterator exists (the
    # uninterrupted run drew at the epoch's start, before the saved state): the loop applies it then.
    if step == epoch * steps_per_epoch:
        set_rng(rng)
        rng = None
    log(f"resumed from {load_path if converted is None else resume_from} at epoch {epoch}, step {step}/{total_steps}")
    if tracker is not None and client_state.get("mlflow_run_id"):
        tracker.close_abandoned(client_state["mlflow_run_id"],
                                f"its processes stopped without ending the run (killed, or the machine went down) "
                                f"after the state of step {step} was saved; run {tracker.run_id} resumed from it")
    return step, epoch, rng


def _with_epoch_checkpoints(callback: Callable | None, ckpt_dir: Path) -> Callable:
    """`callback` preceded by a DeepSpeed checkpoint of the epoch (tag epochN, `latest` pointing at it); once every
    rank has saved, rank 0 removes the previous epochs' tags (one epoch's checkpoint on disk at a time)."""
    def on_epoch(epoch: int, step: int, metrics: dict, engine) -> None:
        engine.save_checkpoint(str(ckpt_dir), tag=f"epoch{epoch}", client_state={"step": step, "epoch": epoch})
        save_rng(ckpt_dir / f"epoch{epoch}")
        distributed.barrier()
        if distributed.rank() == 0:
            import shutil

            for old in ckpt_dir.glob("epoch*"):
                if old.name != f"epoch{epoch}" and old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
        if callback is not None:
            callback(epoch, step, metrics, engine)
    return on_epoch


def _reshard_for_engine(engine, resume_from: Path, scratch_dir: Path | None, log: Callable) -> Path | None:
    """When `resume_from` was saved at another ep_size than the engine's: rank 0 converts it (weights, Adam
    state, placement: experts on their bins' ranks where the bins allow) into a temporary folder, whose path
    every rank gets; None when the sizes agree (or the model has no MoE layer)."""
    from ds_smoes.app import reshard

    layers = engine.module.moe_layers() if hasattr(engine.module, "moe_layers") else []
    if not layers or not (resume_from / "latest").is_file():
        return None
    ep = layers[0].deepspeed_moe.ep_size
    saved = reshard.saved_ep_size(resume_from)
    if saved in (0, ep):
        return None
    layout = reshard.optimizer_layout(engine.module, engine.optimizer)
    n_to = {f"{name}.deepspeed_moe.experts.deepspeed_experts.": m.deepspeed_moe.num_local_experts
            for name, m in engine.module.named_modules() if m in layers}
    n_from = {k: v * ep // saved for k, v in n_to.items()}
    box: list = [None, None]   # [converted folder, error message]
    if distributed.rank() == 0:
        import tempfile

        try:
            scratch = Path(scratch_dir or resume_from.parent)
            scratch.mkdir(parents=True, exist_ok=True)
            out = Path(tempfile.mkdtemp(prefix=f"resharded_ep{saved}_to_ep{ep}_", dir=scratch))
            folder, _, physical = reshard.reshard_checkpoint(
                resume_from, None, reshard.rescale_layout(layout, n_to, n_from), out, ep, layout)
            log(f"{resume_from} was saved at ep_size {saved}; converted it to ep_size {ep} in {folder} (experts "
                f"keyed by logical id; placement {[p.tolist() for p in physical]}); loading that")
            box[0] = str(out)
        except ConfigError as err:
            box[1] = str(err)
    if distributed.is_distributed():
        import torch.distributed as dist

        dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise ConfigError(f"{resume_from} was saved at ep_size {saved}, this run has {ep}: {box[1]}")
    return Path(box[0])


def save_rng(tag_dir: Path) -> None:
    """This rank's torch random state (dropout draws) beside a DeepSpeed checkpoint, which does not keep it: a
    resumed run then draws what the uninterrupted one would have."""
    from deepspeed.accelerator import get_accelerator

    tag_dir.mkdir(parents=True, exist_ok=True)
    acc = get_accelerator()
    state = {"cpu": torch.get_rng_state(),
             "device": acc.get_rng_state() if acc.device_name() != "cpu" else None}
    torch.save(state, tag_dir / f"rng_rank{distributed.rank()}.pt")


def load_rng(tag_dir: Path) -> dict | None:
    """This rank's random state saved by `save_rng` beside a checkpoint, if it has one (`set_rng` applies it)."""
    path = tag_dir / f"rng_rank{distributed.rank()}.pt"
    return torch.load(path, weights_only=False) if path.is_file() else None   # the run's own file


def set_rng(state: dict | None) -> None:
    from deepspeed.accelerator import get_accelerator

    if state is None:
        return
    torch.set_rng_state(state["cpu"])
    if state["device"] is not None and get_accelerator().device_name() != "cpu":
        get_accelerator().set_rng_state(state["device"])


def _save_resumable(engine, ckpt_dir: Path, step: int, epoch: int, tag: str, run_id: str | None) -> None:
    """The state at a step boundary mid-run (tag `interrupted` or `periodic`, `latest` pointing at it; a
    collective): the same command resumes from it (`ds_smoes.app.train.interrupted_run`).  `run_id`: this run's
    MLflow run (rank 0's), which the resuming run ends if nothing else did."""
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step, "epoch": epoch,
                                                                 "mlflow_run_id": run_id})
    save_rng(ckpt_dir / tag)
    distributed.barrier()


def _drop_resumable(ckpt_dir: Path) -> None:
    """The run finished: its `interrupted` and `periodic` states go (rank 0, after every rank is past the final
    save), and `latest` no longer names one, so the same command trains afresh instead of resuming."""
    distributed.barrier()
    if distributed.rank() != 0:
        return
    import shutil

    latest = ckpt_dir / "latest"
    if latest.is_file() and latest.read_text().strip() in ("interrupted", "periodic"):
        latest.unlink()
    for tag in ("interrupted", "periodic"):
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def _train_loop(family: ModelFamily, engine, loader, sampler, step: int, epoch: int, total_steps: int, tracker,
                log: Callable, epoch_callback: Callable | None = None, stop: StopRequests | None = None,
                pending_rng: dict | None = None) -> dict:
    cfg = family.cfg
    moe_layers = engine.module.moe_layers()
    start_step = step
    last_metrics: dict = {}
    window = TrainWindow(moe_layers, cfg.run.log_every)
    every_s = None if cfg.run.checkpoint_every_minutes is None else 60.0 * cfg.run.checkpoint_every_minutes
    last_saved = time.monotonic()
    ckpt = Path(cfg.run.output_dir) / "checkpoint"
    for epoch, batches in resumable_epochs(loader, sampler, step, epoch, total_steps):
        for batch in batches:
            if pending_rng is not None:   # resumed mid-epoch: now that this epoch's iterator exists (`_resume`)
                set_rng(pending_rng)
                pending_rng = None
            t0 = time.time()
            family.begin_step(step)
            with window.collecting():
                out = family.forward(engine, batch, engine.device)
            engine.backward(family.train_loss(out))
            engine.step()
            window.add(out, family.num_tokens(batch), time.time() - t0)
            step += 1
            if any(layer.placement_due() for layer in moe_layers):
                _place_experts(moe_layers, engine, step, tracker, log)
            if window.due(step, total_steps):
                due = every_s is not None and time.monotonic() - last_saved >= every_s
                metrics = window.flush(engine.get_lr()[0], stop=stop is not None and stop.requested(),
                                       checkpoint=due)
                tracker.log_metrics(metrics, step=step)
                window.check_finite(metrics, step, engine.get_lr()[0])
                # not at an epoch's last step: its validation and epoch callback come first (the next log step)
                mid_epoch = step < total_steps and step % len(loader)
                if window.stop_agreed and mid_epoch:
                    _save_resumable(engine, ckpt, step, epoch, "interrupted", tracker.run_id)
                    why = stop.reason() if stop is not None and stop.requested() else "another rank was asked to stop"
                    raise RunInterrupted(f"interrupted at step {step}/{total_steps} ({why}); the state is saved in "
                                         f"{ckpt} (tag interrupted): run the same command to resume")
                if window.checkpoint_agreed and mid_epoch:   # the clock of some rank: every rank saves alike
                    _save_resumable(engine, ckpt, step, epoch, "periodic", tracker.run_id)
                    last_saved = time.monotonic()
                    log(f"  checkpoint at step {step}/{total_steps} in {ckpt} (tag periodic): after a crash, the same "
                        "command resumes from it")
                last_metrics = metrics
                eta = window.train_seconds / (step - start_step) * (total_steps - step)
                log(f"[epoch {epoch + 1} step {step}/{total_steps}] loss {metrics['train/loss']:.4f} (lm "
                    f"{metrics['train/lm_loss']:.4f}, aux {metrics['train/aux_loss']:.5f})  MI {metrics['train/mi']:.3f}"
                    f"  MSI {metrics['train/msi']:.3f}  cross-rank {metrics['train/cross_rank_rate']:.3f}  "
                    f"{metrics['train/tokens_per_s']:,.0f} tok/s  eta {_fmt_time(eta)}")
        val_metrics: dict = {}
        if family.val_set is not None and cfg.run.eval_every_epoch:
            val, _ = family.evaluate(engine.module, family.val_set, engine.device, with_routing=False)
            val_metrics = {f"val/{k}": v for k, v in val.items() if k.startswith("acc") and not isinstance(v, dict)}
            val_metrics.update({f"val/acc_task/{t}": a for t, a in val.get("acc_by_task", {}).items()})
            tracker.log_metrics(val_metrics, step=step)
            log(f"  validation after epoch {epoch + 1}: multimodal {val['acc_multimodal']:.3f}, "
                f"language {val['acc_language']:.3f}"
                + "".join(f", {t} {a:.3f}" for t, a in val.get("acc_by_task", {}).items()))
        if epoch_callback is not None:
            if not window.all_finite():   # a non-finite step since the last log line: no checkpoint of it
                window.check_finite(window.flush(engine.get_lr()[0]), step, engine.get_lr()[0])
            epoch_callback(epoch + 1, step, {**last_metrics, **val_metrics}, engine)
    return {**window.run_totals(), "epoch": epoch + 1 if step > start_step else epoch}
