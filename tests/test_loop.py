"""The training loops' shared parts: resumable epochs (a resumed run sees exactly the batches an
uninterrupted one would have) and the logging window's metrics (by hand, on a real SMoES layer)."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from ds_smoes.core.config import SMoESConfig
from ds_smoes.moe.layer import SMoESMoE
from ds_smoes.moe.collector import MoECall
from ds_smoes.app.loop import TrainWindow, resumable_epochs


def _loader():
    data = TensorDataset(torch.arange(10))
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=3)
    return DataLoader(data, batch_size=3, sampler=sampler), sampler  # 4 batches per epoch (3, 3, 3, 1)


def _run(step: int, epoch: int, total: int) -> list[tuple[int, list[int]]]:
    loader, sampler = _loader()
    seen = []
    for ep, batches in resumable_epochs(loader, sampler, step, epoch, total):
        for (x,) in batches:
            seen.append((ep, x.tolist()))
    return seen


def test_resumable_epochs_stop_at_total_steps_and_reshuffle_each_epoch():
    seen = _run(0, 0, 10)
    assert [ep for ep, _ in seen] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    for ep in (0, 1):
        assert sorted(sum((x for e, x in seen if e == ep), [])) == list(range(10))  # each epoch covers the data
    assert [x for e, x in seen if e == 0] != [x for e, x in seen if e == 1]  # set_epoch reshuffled


@pytest.mark.parametrize("step, epoch", [(6, 1), (4, 1), (8, 2), (0, 0)])
def test_a_resumed_run_sees_the_rest_of_an_uninterrupted_one(step, epoch):
    assert _run(step, epoch, 10) == _run(0, 0, 10)[step:]


def test_resumable_epochs_yield_nothing_when_done():
    assert _run(10, 2, 10) == []


def _out(loss, lm, aux):
    return SimpleNamespace(loss=torch.tensor(loss), lm_loss=torch.tensor(lm), aux_loss=torch.tensor(aux))


def test_train_window_metrics_by_hand():
    d = 8
    cfg = SMoESConfig(num_experts=4, num_bins=2, k=2, score_type="hard", binning="fixed", dispatch="rank_once")
    torch.manual_seed(0)
    layer = SMoESMoE(d, nn.Linear(d, d), cfg)
    with torch.no_grad():  # the router reads the first 4 features: a token's top-2 are its 2 largest there
        layer.gate.wg.weight.copy_(torch.eye(4, d))
    window = TrainWindow([layer], log_every=2)
    labels_S = torch.tensor([0, 0, 0, 1, 1, 1])
    # step 1: text -> e0 e1, e0 e1, e0 e2; vision -> e2 e3, e2 e3, e1 e3
    step1 = torch.tensor([[2., 1, 0, 0], [2, 1, 0, 0], [2, 0, 1, 0], [0, 0, 2, 1], [0, 0, 1, 2], [0, 1, 0, 2]])
    # step 2: every text token -> e0 e1, every vision token -> e2 e3
    step2 = torch.tensor([[2., 1, 0, 0]] * 3 + [[0., 0, 1, 2]] * 3)
    with window.collecting():
        layer(F.pad(step1, (0, d - 4)).unsqueeze(0), modality_labels=labels_S.unsqueeze(0))
    window.add(_out(2.0, 1.5, 0.5), tokens=6, seconds=0.5)
    with window.collecting():
        layer(F.pad(step2, (0, d - 4)).unsqueeze(0), modality_labels=labels_S.unsqueeze(0))
    layer(F.pad(step1, (0, d - 4)).unsqueeze(0), modality_labels=labels_S.unsqueeze(0))   # outside: not counted
    stats = window.collector.last()[0].stats
    window.add(_out(1.0, 0.5, 0.25), tokens=4, seconds=1.5)
    assert not window.due(1, 10) and window.due(2, 10) and window.due(7, 7)
    m = window.flush(lr=0.01)
    assert m["train/loss"] == pytest.approx(1.5) and m["train/lm_loss"] == pytest.approx(1.0)
    assert m["train/aux_loss"] == pytest.approx(0.375)
    assert m["train/tokens_per_s"] == pytest.approx(10 / 2.0) and m["train/lr"] == 0.01
    assert m["train/cross_rank_rate"] == 0.0 and m["train/bytes_per_token"] == 0.0  # one rank: nothing leaves it
    assert m["train/ranks_per_token"] == pytest.approx(1.0) and m["train/rebins"] == 0
    # MSI over the window's summed loads: text [6, 5, 1, 0], vision [0, 1, 5, 6] (12 routes each), so
    # Ct = [1, 5/6, 1/6, 0] and MSI = mean 2 |Ct - 1/2| = (1 + 2/3 + 2/3 + 1) / 4 = 5/6
    # (step 1 alone would give 2/3, step 2 alone 1)
    assert m["train/dropped_routes"] == 0 and m["train/msi"] == pytest.approx(5 / 6)
    assert m["train/mi"] == pytest.approx(float(stats.mi))
    assert m["train/gate/bin_balance"] == pytest.approx(float(stats.losses["bin_balance"]))
    # the window starts afresh; the run's totals keep counting
    window.add(_out(4.0, 3.0, 1.0), tokens=5, seconds=1.0)
    assert window.flush(lr=0.02)["train/loss"] == pytest.approx(4.0)
    totals = window.run_totals()
    assert totals == {"tokens_per_s": pytest.approx(15 / 3.0), "train_seconds": pytest.approx(3.0),
                      "final_loss": pytest.approx(4.0)}


def _fake_layer(loads: list, tokens: list, ep_size: int, hidden: int):
    """A stand-in MoE layer, and its calls' statistics with the given per-forward loads (load_ME)."""
    comm = {"cross_rank_rate": torch.tensor(0.5), "ranks_per_token": torch.tensor(1.5),
            "remote_pairs_per_token": torch.tensor(0.5)}
    stats = [SimpleNamespace(load_ME=torch.tensor(l, dtype=torch.float32), num_tokens=torch.tensor(n),
                             comm_binned=comm, comm_physical=comm) for l, n in zip(loads, tokens)]
    from ds_smoes.moe.dispatchers import RankOnceDispatcher

    layer = SimpleNamespace(config=SimpleNamespace(num_experts=len(loads[0][0])), dispatcher=RankOnceDispatcher(),
                            deepspeed_moe=SimpleNamespace(ep_size=ep_size, ep_group=None,
                                                          experts=nn.Linear(hidden, hidden)),
                            gate=SimpleNamespace(wg=nn.Linear(hidden, len(loads[0][0]), bias=False)))
    return layer, [MoECall(st, 100, lambda _: None) for st in stats]


def test_rank_once_runs_report_what_the_stock_dispatch_would_have_sent_by_hand():
    from ds_smoes.app.evaluation import RoutingAccumulator

    # forward 1: expert loads (text + vision) [3, 2, 2, 2], the largest 3; forward 2: [1, 1, 1, 1], the largest 1
    layer, stats = _fake_layer([[[3, 1, 0, 0], [0, 1, 2, 2]], [[1, 1, 0, 0], [0, 0, 1, 1]]], [4, 2], ep_size=2,
                               hidden=8)
    acc = RoutingAccumulator([layer])
    for call in stats:
        acc.add([[call]])
    comm = acc.result().comm
    # stock: the padded [E, C, D] buffer there and back, less the own rank's half: 2 * (4 - 2) * C * 8 * 4 bytes with
    # the dropless capacity C = 3, then 1: per unit of C 2 * 2 * 8 * 4 = 128 bytes, so 128 * (3 + 1) over 6 tokens
    assert comm["stock_remote_bytes_per_token"] == [pytest.approx(128 * 4 / 6)]
    assert comm["remote_bytes_per_token"] == [pytest.approx(200 / 6)]   # what the layer says it sent, twice 100


def test_stock_dispatch_runs_report_no_counterfactual():
    from ds_smoes.app.evaluation import RoutingAccumulator

    layer, stats = _fake_layer([[[1, 1, 0, 0], [0, 0, 1, 1]]], [2], ep_size=2, hidden=8)
    from ds_smoes.moe.dispatchers import StockDispatcher

    layer.dispatcher = StockDispatcher()
    acc = RoutingAccumulator([layer])
    acc.add([[stats[0]]])
    assert "stock_remote_bytes_per_token" not in acc.result().comm
