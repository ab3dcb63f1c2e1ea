"""`python -m ds_smoes.train --hf-model PATH_OR_CONFIG`: fine-tune a Hugging Face VLM with SMoES.

The run: load the model, convert its MoE blocks (or upcycle its MLPs), read LLaVA-format data
through the model's chat template and image processor, train under DeepSpeed (ZeRO 0-2 from
run.deepspeed_config, expert parallelism from smoes.ep_size), log to MLflow, save a DeepSpeed
checkpoint, evaluate on the test split and export with save_pretrained to the original architecture.
The engine, optimizer, schedule and tracking are `ds_smoes.runner`'s.
"""
from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from ds_smoes import distributed
from ds_smoes.data import load_llava_json
from ds_smoes.errors import ConfigError
from ds_smoes.evaluation import RoutingAccumulator, lockstep_batches
from ds_smoes.hf.config import HFTrainConfig
from ds_smoes.hf.data import HFConversationDataset, VLMTextCodec, collate
from ds_smoes.hf.export import export_pretrained
from ds_smoes.hf.load import load_hf_model, to_smoes
from ds_smoes.hf.model import SMoESHFModel
from ds_smoes.loop import TrainWindow, resumable_epochs, train_loader
from ds_smoes.runner import _fmt_time, _to_json, build_engine, ensure_digits, seed_everything


def model_inputs(model: SMoESHFModel, batch: dict, with_labels: bool = True) -> dict:
    """The batch plus what the architecture derives from the ids (Qwen3-VL: mm_token_type_ids)."""
    inputs = {k: v for k, v in batch.items() if with_labels or k != "labels"}
    extra = model.adapter.extra_inputs
    if extra is not None:
        inputs.update(extra(model.hf_model.config, inputs["input_ids"]))
    return inputs


def _datasets(cfg: HFTrainConfig, codec: VLMTextCodec, log: Callable):
    d = cfg.data
    ensure_digits(d, log)
    make = lambda p: HFConversationDataset(load_llava_json(Path(p), Path(d.image_folder)), codec)  # noqa: E731
    return make(d.train_json), make(d.test_json)


@torch.no_grad()
def greedy_answers(model: SMoESHFModel, dataset: HFConversationDataset, idx: list[int], pad_id: int, eos_id: int,
                   max_new_tokens: int, device) -> list[str]:
    """Greedy decoding from left-padded prompts, always `max_new_tokens` forwards (every EP rank takes part
    in the same number of all-to-alls); the text up to the first eos."""
    batch = collate([dataset.item(i, with_answer=False) for i in idx], pad_id, left=True)
    batch.pop("labels")
    batch = {k: v.to(device) for k, v in batch.items()}
    new = []
    for _ in range(max_new_tokens):
        inputs = model_inputs(model, batch, with_labels=False)
        if model.adapter.extra_inputs is None:   # 1-D positions from the mask (left padding)
            inputs["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
        nxt_B = model(**inputs, use_cache=False).logits[:, -1].argmax(-1)
        new.append(nxt_B)
        batch["input_ids"] = torch.cat([batch["input_ids"], nxt_B[:, None]], 1)
        batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(nxt_B[:, None])], 1)
    texts = []
    for row in torch.stack(new, 1).tolist():
        row = row[:row.index(eos_id)] if eos_id in row else row
        texts.append(dataset.codec.tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


@torch.no_grad()
def evaluate(model: SMoESHFModel, dataset: HFConversationDataset, batch_size: int, max_new_tokens: int, device,
             pad_id: int, eos_id: int) -> dict:
    """Teacher-forced test loss and routing, and exact-match accuracy per question kind."""
    was = model.training
    model.eval()
    acc = RoutingAccumulator(model.moe_layers())
    counts = torch.zeros(6, dtype=torch.float64)   # loss sum, batches, correct mm, mm, correct lang, lang
    for idx, counted in lockstep_batches(len(dataset), distributed.rank(), distributed.world_size(), batch_size):
        batch = collate([dataset[i] for i in idx], pad_id)
        keep_B = torch.tensor(counted)
        batch["attention_mask"] = batch["attention_mask"] * keep_B[:, None]
        batch["labels"][~keep_B] = -100
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**model_inputs(model, batch))
        acc.add()
        counts[0] += float(out.lm_loss) * float(keep_B.any())
        counts[1] += float(keep_B.any())
        for i, keep, text in zip(idx, counted, greedy_answers(model, dataset, idx, pad_id, eos_id, max_new_tokens,
                                                               device)):
            if keep:
                slot = 2 if dataset.is_multimodal(i) else 4
                counts[slot] += float(text.lower() == dataset.answer(i).strip().lower())
                counts[slot + 1] += 1
    distributed.world_sum_(counts)
    model.train(was)
    c = counts.tolist()
    routing = acc.result()
    ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
    return {"test_loss": ratio(c[0], c[1]), "acc_multimodal": ratio(c[2], c[3]), "acc_language": ratio(c[4], c[5]),
            "acc_overall": ratio(c[2] + c[4], c[3] + c[5]), "msi": routing.msi,
            "cross_rank_rate": routing.mean("cross_rank_rate"), "ranks_per_token": routing.mean("ranks_per_token")}


def run_hf_training(cfg: HFTrainConfig, output_json: Path | None = None, parent_run_id: str | None = None,
                    init_distributed: Callable[[], None] | None = None, log: Callable = print) -> dict:

    from ds_smoes.tracking import Tracker, default_tracking_uri, flatten

    t_start = time.time()
    if init_distributed is not None:
        init_distributed()
    world, rank = distributed.world_size(), distributed.rank()
    if world % cfg.smoes.ep_size:
        raise ConfigError(f"smoes.ep_size={cfg.smoes.ep_size} does not divide the number of ranks ({world})")
    seed_everything(cfg.run.seed)
    out_dir = Path(cfg.run.output_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)

    hf_model, processor_dir = load_hf_model(cfg.hf.model, cfg.hf.attn_implementation, cfg.run.seed)
    model = to_smoes(hf_model, cfg.smoes, cfg.hf.mode, cfg.hf.upcycle_layers, seed=cfg.run.seed)
    smoes = model.smoes
    codec = VLMTextCodec.load(cfg.hf.processor or processor_dir, hf_model.config, model.adapter, cfg.hf.image_size)
    tok = codec.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    if tok.eos_token_id is None:
        raise ConfigError("the tokenizer has no eos token: set one (tokenizer.eos_token) and save it again")
    train_set, test_set = _datasets(cfg, codec, log)
    log(f"hf model: {type(hf_model).__name__} ({hf_model.config.model_type}), {'upcycled' if model.upcycled else 'converted'}"
        f" {len(model.moe_layers())} MoE layers, {smoes.num_experts} experts, top-{smoes.k}, {smoes.num_bins} bins, "
        f"ep_size {smoes.ep_size}; data: {len(train_set)} train / {len(test_set)} test; world {world}")

    sampler, loader, total_steps = train_loader(train_set, cfg, world, rank, partial(collate, pad_id=pad_id))
    engine, ds_config = build_engine(cfg, model, total_steps)
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)

    run_name = cfg.tracking.run_name or f"hf-{hf_model.config.model_type}-{smoes.score_type}-b{smoes.num_bins}"
    tracker = Tracker(cfg.tracking.tracking_uri or default_tracking_uri(), cfg.tracking.experiment, run_name,
                      active=rank == 0 and cfg.tracking.enabled,
                      tags={"gate": smoes.gate, "score_type": smoes.score_type, "num_bins": str(smoes.num_bins),
                            "seed": str(cfg.run.seed), "binning": smoes.binning,
                            "hf.model_type": hf_model.config.model_type,
                            "hf.mode": "upcycle" if model.upcycled else "convert"},
                      parent_run_id=parent_run_id)
    resolved = json.loads(cfg.model_dump_json())
    resolved["smoes"] = json.loads(smoes.model_dump_json())
    tracker.log_params({**flatten("", resolved), "world_size": world, "deepspeed.zero_stage": zero_stage})
    tracker.log_dict(resolved, "config.json")

    step = 0
    if cfg.hf.resume_from is not None:
        load_path, client = engine.load_checkpoint(str(cfg.hf.resume_from))
        if load_path is None or "step" not in (client or {}):
            raise ConfigError(f"{cfg.hf.resume_from}: no DeepSpeed checkpoint with a step in its client_state")
        step = int(client["step"])
        log(f"resumed from {load_path} at step {step}/{total_steps}")
    status = "FAILED"
    try:
        figures = _train_loop(engine, model, loader, sampler, step, total_steps, cfg, tracker, log)
        ckpt = out_dir / "checkpoint"
        engine.save_checkpoint(str(ckpt), tag="final", client_state={"step": figures["steps"]})
        log("evaluating on the held-out test split ...")
        final = {**evaluate(model, test_set, cfg.run.eval_batch_size, cfg.run.max_new_tokens, engine.device, pad_id,
                            tok.eos_token_id), **figures, "checkpoint": str(ckpt), "zero_stage": zero_stage,
                 "gate": smoes.gate, "score_type": smoes.score_type, "num_bins": smoes.num_bins,
                 "num_experts": smoes.num_experts, "k": smoes.k, "ep_size": smoes.ep_size, "world_size": world,
                 "hf_model_type": hf_model.config.model_type, "mlflow_run_id": tracker.run_id}
        if cfg.hf.export:
            export_dir = export_pretrained(model, out_dir / "hf_export")
            if export_dir is not None:
                codec.tokenizer.save_pretrained(export_dir)
                codec.image_processor.save_pretrained(export_dir)
                if codec.chat_template:
                    (export_dir / "chat_template.jinja").write_text(codec.chat_template)
                final["export_dir"] = str(export_dir)
                log(f"exported to {export_dir} (loads with AutoModelForImageTextToText.from_pretrained)")
        status = "FINISHED"
    finally:
        if status == "FAILED":
            tracker.end("FAILED")
    final["wall_seconds"] = time.time() - t_start
    if rank == 0:
        tracker.log_metrics({k: v for k, v in final.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
                            step=final["steps"])
        tracker.log_dict(final, "metrics.json")
        if "export_dir" in final:
            tracker.set_tags({"hf.export_dir": final["export_dir"]})
        tracker.end("FINISHED")
        (out_dir / "metrics.json").write_text(_to_json(final))
        if output_json:
            Path(output_json).parent.mkdir(parents=True, exist_ok=True)
            Path(output_json).write_text(_to_json(final))
        log(f"test: loss {final['test_loss']:.4f}, accuracy multimodal {final['acc_multimodal']:.3f}, language "
            f"{final['acc_language']:.3f}; MSI {final['msi']:.3f}; {final['tokens_per_s']:.0f} tokens/s; wall "
            f"{_fmt_time(final['wall_seconds'])}")
    distributed.barrier()
    return final


def every_parameter_zero(params: list[torch.Tensor]) -> torch.Tensor:
    """0 with a (zero) gradient path to every parameter.  A rank whose batch has no image leaves the
    vision tower without gradients; ZeRO-2 then reduces different buckets on different ranks (a
    collective mismatch).  Adding this to the loss gives every rank the same set of gradients."""
    return torch.stack([p.reshape(-1)[0].float() for p in params]).sum() * 0.0


def _train_loop(engine, model: SMoESHFModel, loader, sampler, step: int, total_steps: int, cfg: HFTrainConfig,
                tracker, log: Callable) -> dict:
    moe_layers = model.moe_layers()
    trainable = [p for p in model.parameters() if p.requires_grad]
    window = TrainWindow(moe_layers, cfg.run.log_every)
    start = step
    for _, batches in resumable_epochs(loader, sampler, step, step // len(loader), total_steps):
        for batch in batches:
            t0 = time.time()
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            out = engine(**model_inputs(model, batch))
            engine.backward(out.loss + every_parameter_zero(trainable))
            engine.step()
            window.add(out, int(batch["attention_mask"].sum()), time.time() - t0)
            step += 1
            if window.due(step, total_steps):
                metrics = window.flush(engine.get_lr()[0])
                tracker.log_metrics(metrics, step=step)
                log(f"[step {step}/{total_steps}] loss {metrics['train/loss']:.4f} (lm {metrics['train/lm_loss']:.4f}, "
                    f"aux {metrics['train/aux_loss']:.5f})  MSI {metrics['train/msi']:.3f}  cross-rank "
                    f"{metrics['train/cross_rank_rate']:.3f}  {metrics['train/tokens_per_s']:,.0f} tok/s")
    totals = window.run_totals()
    return {"tokens_per_s": totals["tokens_per_s"], "train_seconds": totals["train_seconds"], "steps": step,
            "steps_this_run": step - start, "final_train_loss": totals["final_loss"]}


def main_hf(args, init_distributed: Callable[[], None] | None = None, log: Callable = print) -> dict:
    """The `--hf-model` branch of `ds_smoes.train.main` (same options: --config, --set, tracking flags)."""
    from ds_smoes.hf.config import load_hf_train_config

    from ds_smoes.train import with_tracking_args

    cfg = with_tracking_args(load_hf_train_config(args.config, args.overrides, args.hf_model), args)
    return run_hf_training(cfg, output_json=args.output_json, parent_run_id=args.parent_run_id,
                           init_distributed=init_distributed, log=log)
