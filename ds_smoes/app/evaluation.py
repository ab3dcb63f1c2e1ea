"""Held-out evaluation: exact-match accuracy per question kind, and routing measurements.

With expert parallelism every forward is a collective (all-to-all), so every rank must run
the same number of forwards: `lockstep_batches` pads the shorter shards with repeated items
that are computed but not counted.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ds_smoes.parallel import distributed
from ds_smoes.data import LlavaDataset, collate_prompts, collate_train
from ds_smoes.core.metrics import modality_specialization_index
from ds_smoes.parallel.dispatch import stock_alltoall_bytes
from ds_smoes.model import model_inputs
from ds_smoes.moe.collector import MoECall, RoutingCollector


def lockstep_batches(num_items: int, rank: int, world: int, batch_size: int) -> list[tuple[list[int], list[bool]]]:
    """This rank's batches (indices, counted flags): items rank, rank + world, ...; every rank gets
    the same number of equally sized batches, padded with uncounted repeats of item 0."""
    mine = list(range(rank, num_items, world))
    per_rank = math.ceil(num_items / world) if num_items else 0
    batches = []
    for start in range(0, per_rank, batch_size):
        size = min(batch_size, per_rank - start)  # identical on every rank
        idx = mine[start:start + size]
        pad = size - len(idx)
        batches.append((idx + [0] * pad, [True] * len(idx) + [False] * pad))
    return batches


def normalize_answer(text: str, tokenizer) -> str:
    return tokenizer.decode(tokenizer.encode(text)).strip().lower()


class PrefillClock:
    """Times the prefill of each `generate`: its first forward runs the whole prompt (filling the KV cache) and ends
    in the LM head, so the first call of `head` after `start()` ends the prefill.  (A hook on the model itself would
    not see it: `generate` calls `self.forward`.)  On a GPU both marks synchronise the device, so the time covers
    the kernels: two host syncs per evaluation batch, at evaluation only."""

    def __init__(self, head: torch.nn.Module, device: torch.device) -> None:
        self.seconds: list[float] = []        # one prefill per started generate
        self._t0: float | None = None
        self._sync = device.type == "cuda"
        self._handle = head.register_forward_hook(self._mark)

    def now(self) -> float:
        """`time.perf_counter()` once the device has run what was queued (a mark outside the head, such as the
        end of a `generate`)."""
        if self._sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> float:
        """Start timing the next prefill; returns the start mark (`now()`)."""
        self._t0 = self.now()
        return self._t0

    def _mark(self, *_) -> None:
        if self._t0 is not None:
            if self._sync:
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self._t0)
            self._t0 = None

    def remove(self) -> None:
        self._handle.remove()


def median_ms_per_sample(seconds: list[float], rows: list[int]) -> float:
    """The median over batches of (prefill seconds / rows of the batch) in ms; nan without batches."""
    per_sample = [1e3 * s / n for s, n in zip(seconds, rows) if n]
    return statistics.median(per_sample) if per_sample else float("nan")


@torch.no_grad()
def exact_match_accuracy(engine, dataset: LlavaDataset, batch_size: int, max_new_tokens: int,
                         device: torch.device, timing: bool = False) -> dict[str, float]:
    """Greedy-decode every question; accuracy separately on multimodal and language-only ones, and per task where
    the records name one (`acc_by_task` {task: accuracy} and `num_by_task` {task: questions}, tasks in name order;
    absent when no record has a task).

    `timing`: also `prefill_ms_per_sample`, the prefill forward of each batch's `generate` per row of the batch
    (padding repeats included: they are computed), the median over this rank's batches, then the slowest rank's."""
    module = engine.module if hasattr(engine, "module") else engine
    tok = dataset.tokenizer
    was_training = module.training
    module.eval()
    # [correct_mm, total_mm, correct_lang, total_lang]
    counts = torch.zeros(4, dtype=torch.float64)
    # per task [correct, total]: every rank holds the whole split, so every rank lists the same tasks
    task_of = [sample.task for sample in getattr(dataset, "samples", [])]
    tasks = sorted({t for t in task_of if t is not None})
    slot_of_task = {t: j for j, t in enumerate(tasks)}
    task_counts_K2 = torch.zeros(len(tasks), 2, dtype=torch.float64)
    clock = PrefillClock(module.lm_head, device) if timing else None
    rows = []
    for idx, counted in lockstep_batches(len(dataset), distributed.rank(), distributed.world_size(), batch_size):
        batch = collate_prompts([dataset[i] for i in idx]).to(device)
        if clock is not None:
            clock.start()
            rows.append(len(idx))
        generated = module.generate(*model_inputs(batch), max_new_tokens=max_new_tokens, eos_id=tok.eos_id)
        for i, keep, ids in zip(idx, counted, generated):
            if not keep:
                continue
            hit = float(normalize_answer(tok.decode(ids), tok) == normalize_answer(dataset.answer(i), tok))
            slot = 0 if dataset.is_multimodal(i) else 2
            counts[slot] += hit
            counts[slot + 1] += 1
            if task_of and task_of[i] is not None:
                task_counts_K2[slot_of_task[task_of[i]]] += torch.tensor([hit, 1.0], dtype=torch.float64)
    distributed.world_sum_(counts)
    if tasks:
        distributed.world_sum_(task_counts_K2)
    module.train(was_training)
    c = counts.tolist()
    out = {
        "acc_multimodal": c[0] / c[1] if c[1] else float("nan"),
        "acc_language": c[2] / c[3] if c[3] else float("nan"),
        "acc_overall": (c[0] + c[2]) / (c[1] + c[3]) if c[1] + c[3] else float("nan"),
        "num_multimodal": int(c[1]), "num_language": int(c[3]),
    }
    if tasks:
        out["acc_by_task"] = {t: float(task_counts_K2[j, 0] / task_counts_K2[j, 1]) for j, t in enumerate(tasks)
                              if task_counts_K2[j, 1] > 0}
        out["num_by_task"] = {t: int(task_counts_K2[j, 1]) for j, t in enumerate(tasks)}
    if clock is not None:
        clock.remove()
        slowest = distributed.world_max_(torch.tensor([median_ms_per_sample(clock.seconds, rows)], dtype=torch.float64))
        out["prefill_ms_per_sample"] = float(slowest[0])
    return out


@dataclass
class RoutingMeasurement:
    """Routing of every MoE layer over a pass: loads summed over ranks, comm figures averaged."""
    load_LME: torch.Tensor                       # [layers, 2 (text, vision), experts]
    comm: dict[str, list[float]] = field(default_factory=dict)   # figure -> per-layer value
    # (remote_bytes_per_token: bytes the layer's dispatch sent to other EP ranks, dispatch + combine,
    #  forward only, per valid token; the rank's own chunk is not counted)
    loss: float = float("nan")
    tokens_per_layer: list[float] = field(default_factory=list)         # tokens each MoE layer routed, all ranks
    remote_bytes_per_layer: list[float] = field(default_factory=list)   # what each layer's dispatch sent to other
    #                                                                     EP ranks (dispatch + combine), all ranks
    num_samples: int = 0              # conversations of the pass (each counted once over the ranks); 0: not known

    @property
    def msi(self) -> float:
        return float(modality_specialization_index(self.load_LME[:, 0], self.load_LME[:, 1]))

    def msi_per_layer(self) -> list[float]:
        return [float(modality_specialization_index(l[0:1], l[1:2])) for l in self.load_LME]

    def mean(self, name: str) -> float:
        values = self.comm.get(name, [])
        return sum(values) / len(values) if values else float("nan")

    @property
    def bytes_per_sample(self) -> float:
        """EP remote bytes per conversation: every MoE layer's dispatch + combine over all ranks, summed over the
        layers, divided by the pass's conversations (language-only ones included)."""
        return sum(self.remote_bytes_per_layer) / self.num_samples if self.num_samples else float("nan")

    @property
    def moe_tokens_per_sample(self) -> float:
        """Token visits of the MoE layers per conversation (each layer's routed tokens, summed over the layers)."""
        return sum(self.tokens_per_layer) / self.num_samples if self.num_samples else float("nan")


_COMM_KEYS = ("cross_rank_rate", "ranks_per_token", "remote_pairs_per_token")


class RoutingAccumulator:
    """Sums the layers' `RoutingStats` over many forwards (token-weighted) on this rank, on the model's device, from
    the calls a `ds_smoes.moe.collector.RoutingCollector` took: `add` reads nothing back to the host (a training
    step calls it), `result` reads once."""

    def __init__(self, moe_layers) -> None:
        self.layers = moe_layers
        self.num_experts = moe_layers[0].config.num_experts if moe_layers else 0
        self.load_LME: torch.Tensor | None = None   # [layers, 2, experts], made on the first add's device
        # per layer: [tokens, sum of each comm figure for binned placement, then physical, then the
        # bytes the layer's dispatch really sent to other EP ranks (MoECall.remote_bytes)]
        self.comm_LX: torch.Tensor | None = None
        # layers whose dispatcher is not the stock one (rank_once): per forward, each layer's largest expert load on this rank (valid routes), from which
        # `result` computes what DeepSpeed's stock dispatch would have sent for the same routing (its dropless
        # capacity is the EP group's largest expert load)
        self._max_load_L: list[torch.Tensor] = []
        self._counterfactual = bool(moe_layers) and all(l.dispatcher.has_stock_counterfactual for l in moe_layers)
        self.last_stats_L: list = [None] * len(moe_layers)   # each layer's statistics of its last call added

    def _buffers(self, device) -> None:
        if self.load_LME is None:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            self.load_LME = torch.zeros(len(self.layers), 2, self.num_experts, dtype=dtype, device=device)
            self.comm_LX = torch.zeros(len(self.layers), 2 + 2 * len(_COMM_KEYS), dtype=dtype, device=device)

    def add(self, calls_L: Sequence[Sequence[MoECall]]) -> None:
        """The calls a `RoutingCollector` took over `layers` (per layer, in order): sums their statistics on the
        device.  Calls collected without statistics are left out."""
        for l, calls in enumerate(calls_L):
            for call in calls:
                st = call.stats
                if st is None:
                    continue
                self._buffers(st.load_ME.device)
                self.load_LME[l] += st.load_ME.to(self.load_LME.dtype)
                n = st.num_tokens.to(self.comm_LX.dtype)
                figures = ([st.comm_binned[key] for key in _COMM_KEYS]
                           + [st.comm_physical[key] for key in _COMM_KEYS])
                self.comm_LX[l, 0] += n
                self.comm_LX[l, 1:-1] += torch.stack(figures).to(self.comm_LX) * n
                self.comm_LX[l, -1] += call.remote_bytes
            if calls:
                self.last_stats_L[l] = calls[-1].stats
        if self._counterfactual:
            # one figure per forward: the q-th call of every layer
            for forward in zip(*calls_L):
                if all(call.stats is not None for call in forward):
                    self._max_load_L.append(torch.stack([call.stats.load_ME.sum(0).max() for call in forward]
                                                        ).to(self.comm_LX))

    def result(self, loss: float = float("nan"), num_samples: int = 0) -> RoutingMeasurement:
        """The world-summed figures; `num_samples`: the conversations the forwards covered, for per-sample
        figures."""
        device = self.load_LME.device if self.load_LME is not None else distributed.collective_device()
        self._buffers(device)
        load = distributed.world_sum_(self.load_LME.clone())
        comm = distributed.world_sum_(self.comm_LX.clone())
        tokens_L = comm[:, 0].clamp_min(1)
        out = {}
        for j, key in enumerate(_COMM_KEYS):
            out[key] = (comm[:, 1 + j] / tokens_L).tolist()
            out[f"{key}_physical"] = (comm[:, 1 + len(_COMM_KEYS) + j] / tokens_L).tolist()
        out["remote_bytes_per_token"] = (comm[:, -1] / tokens_L).tolist()
        if self._counterfactual:
            out["stock_remote_bytes_per_token"] = (self._stock_bytes_L() / tokens_L).tolist()
        load_LME = load.float().cpu()  # host read: once per log window or evaluation
        return RoutingMeasurement(load_LME, out, loss, tokens_per_layer=comm[:, 0].tolist(),
                                  remote_bytes_per_layer=comm[:, -1].tolist(), num_samples=num_samples)

    def _stock_bytes_L(self) -> torch.Tensor:
        """Per layer, over all ranks and forwards: the bytes DeepSpeed's stock dispatch would have sent to other EP
        ranks for the routes the rank_once dispatch moved (its capacity-padded [E, C, D] buffer twice, less the own
        rank's chunk, with C the EP group's largest expert load of each forward, as its dropless gate sets it)."""
        device = self.comm_LX.device
        bytes_L = torch.zeros(len(self.layers), dtype=torch.float64, device=device)
        if self._max_load_L:
            moe = self.layers[0].deepspeed_moe
            max_load_QL = torch.stack(self._max_load_L)   # Q = forwards since the last reset
            distributed.group_max_(max_load_QL, moe.ep_group if moe.ep_size > 1 else None)
            capacity_L = max_load_QL.clamp_min(1).sum(0)   # host read below, with the other figures
            for l, layer in enumerate(self.layers):
                expert = next(layer.deepspeed_moe.experts.parameters())  # the dtype the tokens travel in
                bytes_L[l] = stock_alltoall_bytes(layer.config.num_experts, 1, layer.gate.wg.weight.shape[1],
                                                  layer.deepspeed_moe.ep_size, expert.element_size())
            bytes_L = bytes_L * capacity_L.to(bytes_L)   # linear in the capacity: one figure per forward, summed
        return distributed.world_sum_(bytes_L)


@torch.no_grad()
def measure_routing(engine, dataset: LlavaDataset, batch_size: int, device: torch.device,
                    on_routes: Callable[[list, list[int]], None] | None = None) -> RoutingMeasurement:
    """Teacher-forced pass over `dataset`: routing loads, communication figures and the loss.  `on_routes`:
    called after every batch with the layers' calls (per layer, `MoECall`s that keep their routes) and the
    dataset indices of the batch's rows (padding rows are not valid tokens)."""
    module = engine.module if hasattr(engine, "module") else engine
    was_training = module.training
    module.eval()
    layers = module.moe_layers()
    acc = RoutingAccumulator(layers)
    loss_sum = torch.zeros(2, dtype=torch.float64)
    for idx, counted in lockstep_batches(len(dataset), distributed.rank(), distributed.world_size(), batch_size):
        batch = collate_train([dataset[i] for i in idx])
        # padding repeats are masked out entirely so they neither route nor count
        keep_B = torch.tensor(counted)
        batch.attention_mask_BT &= keep_B.unsqueeze(1)
        batch.labels_BT[~keep_B] = -100
        batch = batch.to(device)
        with RoutingCollector(layers, stats=True, routes=on_routes is not None) as collector:
            out = module(*model_inputs(batch), labels_BT=batch.labels_BT)
        n = int((batch.labels_BT[:, 1:] != -100).sum())
        loss_sum += torch.tensor([float(out.lm_loss) * n if n else 0.0, n], dtype=torch.float64)
        calls_L = collector.take()
        acc.add(calls_L)
        if on_routes is not None:
            on_routes(calls_L, idx)
    distributed.world_sum_(loss_sum)
    module.train(was_training)
    return acc.result(float(loss_sum[0] / loss_sum[1]) if loss_sum[1] else float("nan"), num_samples=len(dataset))
