"""`python -m ds_smoes.pretrain_vision`: the recipe's stage 0, a pretrained vision encoder of our own.

LLaVA and MoE-LLaVA start from a pretrained CLIP / SigLIP encoder; no hub is reachable here, so this command
makes the stand-in: the canvas config's patch encoder (`model.*` of a training config), trained alone to name
the digit and its quadrant (ds_smoes.model.vision_heads) on the TRAINING split's digits only, each re-placed on
a fresh noisy canvas every epoch (ds_smoes.data.canvas_stream: seeded by --seed, a pure function of the epoch).
It reports digit and quadrant accuracy on the held-out test split's canvases as written on disk (digits never
seen in training, at their fixed places) and writes OUT/encoder.pt, which a later stage loads with
`model.vision_checkpoint` (frozen unless `model.freeze_vision: false`), and OUT/metrics.json.

    python -m ds_smoes.pretrain_vision --config configs/canvas.yaml              # -> runs/vision/canvas32-seed0
    python -m ds_smoes.pretrain_vision --config configs/canvas.yaml --set model.image_size=48 \\
        --set data.canvas_size=48 --set data.image_folder=data/digits_canvas48 --epochs 30

One process (the encoder is small); errors a user can fix print one line and exit 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ds_smoes.app.config import TrainConfig, load_train_config
from ds_smoes.app.family import check_digits_variant, ensure_digits
from ds_smoes.core.errors import ConfigError, SMoESError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ds_smoes.pretrain_vision", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("configs/canvas.yaml"),
                   help="training config whose model.* (encoder shape) and data.* (canvas digits) are used")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field, repeatable")
    p.add_argument("--epochs", type=int, default=30, help="passes over the training digits, each re-placed anew")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=None, help="initialisation and augmentation stream (default: run.seed)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: runs/vision/canvasN-seedS)")
    return p.parse_args(argv)


def check_config(cfg: TrainConfig) -> int:
    """The canvas size stage 0 trains on; ConfigError unless the config asks for canvas digits."""
    if cfg.data.canvas_size is None:
        raise ConfigError("stage 0 pretrains on canvas digits: set data.canvas_size (32 or 48) and model.image_size "
                          "to it (configs/canvas.yaml does)")
    if cfg.model.vision_layers < 1:
        raise ConfigError("model.vision_layers=0: there is no encoder to pretrain")
    return cfg.data.canvas_size


def held_out_set(cfg: TrainConfig, split: str = "test") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images [N, 1, S, S], digits [N], quadrants [N]) of the split's canvases as written on disk."""
    from ds_smoes.data.digits import LOCATIONS, canvas_layout, image_relpath, sklearn_digits, split_image_indices
    from ds_smoes.data.llava import load_image

    d, size = cfg.data, cfg.data.canvas_size
    _, labels_N = sklearn_digits()
    layout = canvas_layout(len(labels_N), size, d.digits_seed)
    indices = split_image_indices(len(labels_N), d.digits_seed)[split]
    images = torch.stack([load_image(Path(d.image_folder) / image_relpath(i), cfg.model.image_size) for i in indices])
    quadrants = torch.tensor([LOCATIONS.index(layout[i][2]) for i in indices])
    return images, torch.as_tensor(labels_N[indices]), quadrants


def accuracy(encoder, heads, images, digits, quadrants, batch: int = 256) -> tuple[float, float]:
    """(digit, quadrant) accuracy on host tensors, computed on the encoder's device (one host read at the end)."""
    device = next(encoder.parameters()).device
    encoder.eval(), heads.eval()
    hits = torch.zeros(2, device=device)
    with torch.no_grad():
        for s in range(0, len(digits), batch):
            digit_NC, where_NC = heads(encoder(images[s:s + batch].to(device)))
            hits += torch.stack([(digit_NC.argmax(-1) == digits[s:s + batch].to(device)).sum(),
                                 (where_NC.argmax(-1) == quadrants[s:s + batch].to(device)).sum()]).float()
    encoder.train(), heads.train()
    hits = hits.cpu()
    return float(hits[0]) / len(digits), float(hits[1]) / len(digits)


STATE_FILE = "state.pt"


def _resume_state(path: Path, settings: dict, log) -> dict | None:
    """The interrupted run's state at `path` when it was made with the same `settings`, else None (with a line
    saying why a state is not used)."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("settings") != settings:
        log(f"{path} was written with other settings ({state.get('settings')}); starting stage 0 afresh")
        return None
    return state


def pretrain(cfg: TrainConfig, epochs: int, batch_size: int, lr: float, seed: int, out: Path,
             log=print, on_epoch=None) -> dict:
    """Train the encoder (stage 0) and write OUT/encoder.pt and OUT/metrics.json; returns the metrics.

    After every epoch the whole state (encoder, heads, optimizer, schedule, epoch) goes to OUT/state.pt; a run
    started again with the same settings continues from it, and since the canvas stream and the shuffle are pure
    functions of (seed, epoch), it trains on exactly what the uninterrupted run would have.  The file is removed
    when the encoder is written.  `on_epoch(epoch)` is called after each epoch's state is saved."""
    from ds_smoes.data.canvas_stream import CanvasStream
    from ds_smoes.model.vision import PatchVisionEncoder
    from ds_smoes.model.vision_checkpoint import save_encoder
    from ds_smoes.model.vision_heads import DigitWhereHeads

    size = check_config(cfg)
    ensure_digits(cfg.data, log)
    check_digits_variant(cfg.data, cfg.model.image_size)
    m = cfg.model
    torch.manual_seed(seed)
    encoder = PatchVisionEncoder(m.image_size, m.patch_size, 1, m.vision_dim, m.vision_layers, m.n_heads,
                                 "sdpa", m.vision_pos)
    heads = DigitWhereHeads(m.vision_dim)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")   # the stream is drawn on the host
    encoder.to(device), heads.to(device)
    stream = CanvasStream(size, seed, dataset_seed=cfg.data.digits_seed)
    test = held_out_set(cfg)
    params = list(encoder.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    steps_per_epoch = math.ceil(len(stream) / batch_size)
    total = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    settings = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
                "model": json.loads(m.model_dump_json()), "canvas_size": size, "digits_seed": cfg.data.digits_seed}
    out.mkdir(parents=True, exist_ok=True)
    state_path, start = out / STATE_FILE, 0
    state = _resume_state(state_path, settings, log)
    if state is not None:
        encoder.load_state_dict(state["encoder"]), heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"]), schedule.load_state_dict(state["schedule"])
        start = state["epoch"]
        log(f"stage 0: resuming from {state_path} after epoch {start}/{epochs}")
    log(f"stage 0 on {device}: pretraining the {m.image_size}x{m.image_size} patch encoder ({m.vision_layers} blocks, width "
        f"{m.vision_dim}, {m.num_patches} patches) on {len(stream)} training digits re-placed every epoch; "
        f"held out: {len(test[1])} test canvases; {epochs} epochs of {steps_per_epoch} steps")
    t0 = time.time()
    for epoch in range(start, epochs):
        canvases = stream.epoch(epoch)
        order_N = torch.randperm(len(stream), generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        loss_sum = torch.zeros((), device=device)
        for s in range(0, len(stream), batch_size):
            idx = order_N[s:s + batch_size]
            digit_NC, where_NC = heads(encoder(canvases.image_NCHW[idx].to(device)))
            loss = (F.cross_entropy(digit_NC, canvases.digit_N[idx].to(device))
                    + F.cross_entropy(where_NC, canvases.quadrant_N[idx].to(device)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.detach() * len(idx)
        if (epoch + 1) % 5 == 0 or epoch + 1 == epochs:
            digit_acc, where_acc = accuracy(encoder, heads, *test)
            done = time.time() - t0
            eta = done / (epoch + 1 - start) * (epochs - epoch - 1)
            log(f"[stage 0 epoch {epoch + 1}/{epochs}] loss {float(loss_sum) / len(stream):.4f}  held-out digit "
                f"{digit_acc:.3f}  quadrant {where_acc:.3f}  {done:.0f}s, eta {eta:.0f}s")
        torch.save({"settings": settings, "epoch": epoch + 1, "encoder": encoder.state_dict(),
                    "heads": heads.state_dict(), "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict()}, state_path.with_suffix(".tmp"))
        state_path.with_suffix(".tmp").replace(state_path)   # never a half-written state
        if on_epoch is not None:
            on_epoch(epoch + 1)
    digit_acc, where_acc = accuracy(encoder, heads, *test)
    metrics = {"stage": 0, "seed": seed, "epochs": epochs, "canvas_size": size, "train_digits": len(stream),
               "test_canvases": len(test[1]), "acc_digit": digit_acc, "acc_quadrant": where_acc,
               "seconds": time.time() - t0, "resumed_at_epoch": start}
    save_encoder(out / "encoder.pt", encoder, m, {"metrics": metrics})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    state_path.unlink(missing_ok=True)
    log(f"stage 0 done in {metrics['seconds']:.0f}s: held-out digit accuracy {digit_acc:.4f}, quadrant "
        f"{where_acc:.4f}; encoder -> {out / 'encoder.pt'} (model.vision_checkpoint)")
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size)):
            if value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        cfg = load_train_config(args.config, args.overrides)
        seed = cfg.run.seed if args.seed is None else args.seed
        out = args.out or Path("runs") / "vision" / f"canvas{cfg.data.canvas_size}-seed{seed}"
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(os.cpu_count() or 1)
        pretrain(cfg, args.epochs, args.batch_size, args.lr, seed, out)
    except SMoESError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0
