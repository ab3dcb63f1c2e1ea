"""The training session's loop parts (`ds_smoes.app.session`, every model family): resumable epochs
over a sampler-driven loader, and the logging window that turns steps into the `train/...` metrics.

    for epoch, batches in resumable_epochs(loader, sampler, step, epoch, total_steps):
        for batch in batches:
            ... one optimizer step ...
            window.add(out, tokens, seconds); step += 1
            if window.due(step, total_steps):
                metrics = window.flush(lr)          # a collective; resets the window
        ... end of epoch (validation, checkpoint) ...
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from ds_smoes.parallel import distributed
from ds_smoes.core.errors import ConfigError, TrainingDiverged
from ds_smoes.app.evaluation import RoutingAccumulator
from ds_smoes.moe.collector import RoutingCollector


def train_loader(dataset, cfg, world: int, rank: int, collate_fn) -> tuple:
    """(sampler, loader, total_steps) for this rank: a seeded DistributedSampler (reshuffled per
    epoch, full batches only) and the number of optimizer steps `cfg.optim` asks for."""
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.run.seed,
                                 drop_last=True)
    loader = DataLoader(dataset, batch_size=cfg.optim.micro_batch_size, sampler=sampler, collate_fn=collate_fn,
                        drop_last=True)
    if len(loader) == 0:
        raise ConfigError(f"{len(dataset)} training conversations over {world} ranks do not fill one batch of "
                          f"optim.micro_batch_size={cfg.optim.micro_batch_size}; lower it")
    total_steps = math.ceil(cfg.optim.epochs * len(loader))
    if cfg.optim.max_steps:
        total_steps = min(total_steps, cfg.optim.max_steps)
    return sampler, loader, total_steps


def resumable_epochs(loader, sampler, step: int, epoch: int, total_steps: int) -> Iterator[tuple[int, Iterator]]:
    """(epoch, batches) from `epoch` on until `total_steps` optimizer steps are done.

    A run resumed mid-epoch (step > epoch * len(loader)) skips the batches of that epoch it already
    trained on: the sampler reshuffles by `set_epoch`, so the same order comes back.  Consume each
    epoch's batches before asking for the next epoch.
    """
    skip = max(0, step - epoch * len(loader))
    state = {"step": step}

    def batches(to_skip: int) -> Iterator:
        for batch in loader:
            if state["step"] >= total_steps:
                return
            if to_skip:
                to_skip -= 1
                continue
            state["step"] += 1
            yield batch

    while state["step"] < total_steps:
        sampler.set_epoch(epoch)
        yield epoch, batches(skip)
        skip = 0
        epoch += 1


class TrainWindow:
    """Step figures since the last log line: loss terms, tokens, seconds and routing (every MoE layer)."""

    def __init__(self, moe_layers: Sequence, log_every: int) -> None:
        self.moe_layers = list(moe_layers)
        self.log_every = log_every
        self.train_seconds = 0.0   # over the whole run, this process
        self.tokens = 0            # over the whole run, this process
        self.last_loss = float("nan")
        self.last_finite = (float("nan"), 0)   # (loss, step) of the last window whose mean loss was finite
        self.stop_agreed = False
        self.checkpoint_agreed = False
        self.collector = RoutingCollector(self.moe_layers, stats=True)
        self._reset()

    def _reset(self) -> None:
        self._losses: torch.Tensor | None = None   # loss, lm, aux summed over the window, on the model's device
        self._counts = [0, 0]                       # steps, tokens (host-side numbers already)
        self._seconds = 0.0
        self._routing = RoutingAccumulator(self.moe_layers)

    def collecting(self) -> RoutingCollector:
        """Open over a training step's forward: the MoE layers' calls go to this window (`add` takes them)."""
        return self.collector

    def add(self, out, tokens: int, seconds: float) -> None:
        """One optimizer step: `out` has .loss, .lm_loss, .aux_loss; `tokens` non-padding tokens here.  Sums on the
        device: nothing is read back to the host until `flush` (a logging step)."""
        losses = torch.stack([out.loss.detach().float(), out.lm_loss.detach().float(),
                              out.aux_loss.detach().float()])
        self._losses = losses if self._losses is None else self._losses + losses
        self._counts[0] += 1
        self._counts[1] += tokens
        self._seconds += seconds
        self.train_seconds += seconds
        self.tokens += tokens
        self._routing.add(self.collector.take())

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.log_every == 0 or step == total_steps

    def flush(self, lr: float, stop: bool = False, checkpoint: bool = False) -> dict[str, float]:
        """The window's `train/...` metrics, then a fresh window; a collective (every rank calls it).

        `stop`: this rank's stop request (`ds_smoes.parallel.stop`), summed in the same all-reduce; afterwards
        `stop_agreed` says whether any rank asked, the same on every rank.  `checkpoint` (this rank's clock says a
        periodic checkpoint is due) likewise gives `checkpoint_agreed`.  `lr` is only reported, as train/lr.  Over the window and every rank: the loss terms (means per
        step), tokens_per_s (all ranks' tokens over this rank's seconds), msi (from the summed routing
        loads) and the communication figures (token-weighted; cross_rank_rate and ranks_per_token with
        experts placed by their bins, bytes_per_token what the dispatch really sent).  This rank's last
        step only, from the layers' statistics of their last call: mi and train/gate/... (means over layers) and
        dropped_routes (summed over layers).  rebins counts every layer's re-binnings of the run so far.
        """
        device = self._losses.device if self._losses is not None else distributed.collective_device()
        losses = self._losses if self._losses is not None else torch.zeros(3, device=device)
        sums = distributed.world_sum_(torch.cat([losses.double(), torch.tensor(
            [float(c) for c in self._counts] + [float(stop), float(checkpoint)], dtype=torch.float64,
            device=device)]))
        self.stop_agreed = bool(sums[5] > 0)
        self.checkpoint_agreed = bool(sums[6] > 0)
        routing = self._routing.result()
        loss, lm, aux = (sums[:3] / sums[3].clamp_min(1)).tolist()
        self.last_loss = loss
        stats = [st for st in self._routing.last_stats_L if st is not None]
        mi = [float(s.mi) for s in stats]
        metrics = {"train/loss": loss, "train/lm_loss": lm, "train/aux_loss": aux,
                   "train/tokens_per_s": float(sums[4]) / max(self._seconds, 1e-9), "train/msi": routing.msi,
                   "train/cross_rank_rate": routing.mean("cross_rank_rate"),
                   "train/ranks_per_token": routing.mean("ranks_per_token"),
                   "train/bytes_per_token": routing.mean("remote_bytes_per_token"),
                   **({"train/stock_bytes_per_token": routing.mean("stock_remote_bytes_per_token")}
                      if "stock_remote_bytes_per_token" in routing.comm else {}),
                   "train/mi": sum(mi) / len(mi) if mi else 0.0,
                   "train/rebins": sum(int(layer.gate.binning.num_rebins) for layer in self.moe_layers),
                   "train/lr": lr, "train/dropped_routes": int(sum(s.num_dropped for s in stats)),
                   **{f"train/gate/{k}": v for k, v in mean_gate_losses(stats).items()}}
        self._reset()
        return metrics

    def check_finite(self, metrics: dict, step: int, lr: float) -> None:
        """After `flush` at `step`: TrainingDiverged when the window's mean loss (over every rank, so every rank
        decides alike) is NaN or infinite, else remember it as the last finite one.  The bound: a non-finite step
        stops the run at the next logging step, `log_every` steps later at most."""
        loss = metrics["train/loss"]
        if math.isfinite(loss):
            self.last_finite = (loss, step)
            return
        seen, at = self.last_finite
        before = f"the last finite window loss was {seen:.4f} at step {at}" if at else "no window before it was finite"
        raise TrainingDiverged(
            f"training diverged: the loss is {loss} in the steps up to {step} ({before}); the run stops and saves no "
            f"checkpoint. Try a lower optim.lr (now {lr:g} at this step), more optim.warmup_steps, or gradient "
            "clipping (\"gradient_clipping\": 1.0 in the DeepSpeed JSON)")

    def all_finite(self) -> bool:
        """Whether every step since the last flush had a finite loss on every rank (a collective, one host read):
        checked before an epoch checkpoint, so that none is written from weights a non-finite step produced."""
        flag = (torch.ones((), device=distributed.collective_device()) if self._losses is None
                else torch.isfinite(self._losses).all().float())
        return bool(distributed.world_sum_(flag.reshape(1).double()).item() == distributed.world_size())

    def run_totals(self) -> dict[str, float]:
        """tokens_per_s (all ranks' tokens over this process's training seconds), train_seconds, final loss;
        a collective."""
        total = float(distributed.world_sum_(torch.tensor([float(self.tokens)], dtype=torch.float64,
                                                          device=distributed.collective_device())))
        return {"tokens_per_s": total / max(self.train_seconds, 1e-9), "train_seconds": self.train_seconds,
                "final_loss": self.last_loss}


def mean_gate_losses(stats: Sequence) -> dict[str, float]:
    """The gates' named losses and diagnostics of the last step (RoutingStats per layer), averaged over layers."""
    sums: dict[str, list[float]] = {}
    for st in stats:
        for k, v in st.losses.items():
            sums.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in sums.items()}
