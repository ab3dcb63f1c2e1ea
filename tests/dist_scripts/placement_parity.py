"""Run under `deepspeed --num_gpus 2`: two identical SMoES layers with ep_size 2 train side by side;
after 3 Adam steps one of them moves its experts onto their bins' ranks (bins [1, 0, 1, 0]: e0 and
e3 swap ranks) with their optimizer state.  Both must compute the same thing right after the move
and after 3 more steps.  Each rank writes OUT/rank{r}.json; tests/test_placement.py asserts on them."""

import torch
from rank_report import parse_args, write_report
from torch import nn

from ds_smoes.parallel import distributed
from ds_smoes.core.config import SMoESConfig
from ds_smoes.moe.layer import SMoESMoE
from ds_smoes.parallel.launch import init_distributed
from ds_smoes.moe.collector import RoutingCollector

D, E, EP = 8, 4, 2


def build(dispatch: str, rank: int) -> tuple[SMoESMoE, torch.optim.Optimizer]:
    cfg = SMoESConfig(num_experts=E, num_bins=2, k=2, ep_size=EP, score_type="hard", binning="adaptive",
                      rebin_freeze_step=10**6, alpha_bal=0.5, alpha_mi=0.25, dispatch=dispatch)
    torch.manual_seed(0)
    layer = SMoESMoE(D, nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D)), cfg)
    layer.gate.wg.weight.data.normal_(0, 1.0, generator=torch.Generator().manual_seed(7))
    experts = layer.deepspeed_moe.experts.deepspeed_experts
    for i, expert in enumerate(experts):  # global expert g from seed 100 + g
        gen = torch.Generator().manual_seed(100 + rank * len(experts) + i)
        for p in expert.parameters():
            p.data.normal_(0, 0.5, generator=gen)
    layer.gate.binning.bin_E.copy_(torch.tensor([1, 0, 1, 0]))
    layer.set_deepspeed_parallelism()
    return layer, torch.optim.AdamW(layer.parameters(), lr=1e-2)


def batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(2, 6, D, generator=g)
    labels = torch.randint(0, 2, (2, 6), generator=g)
    return x, labels, torch.ones(2, 6, dtype=torch.bool), torch.randn(2, 6, D, generator=g)


def train_step(layer, opt, rank: int, step: int) -> float:
    x, labels, mask, probe = batch(rank, step)
    out, l_aux, _ = layer(x, mask, modality_labels=labels)
    loss = (out * probe).sum() + l_aux
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss)


def evaluate(layer, rank: int) -> torch.Tensor:
    x, labels, mask, _ = batch(rank, 999)
    layer.eval()
    with torch.no_grad():
        out = layer(x, mask, modality_labels=labels)[0]
    layer.train()
    return out


def check(dispatch: str, rank: int) -> dict:
    (a, opt_a), (b, opt_b) = build(dispatch, rank), build(dispatch, rank)
    scale = 0.0
    for step in range(3):
        scale = max(scale, abs(train_step(a, opt_a, rank, step)), abs(train_step(b, opt_b, rank, step)))
    cost = b.place_experts(opt_b)
    after_move = float((evaluate(a, rank) - evaluate(b, rank)).abs().max())
    for step in range(3, 6):
        train_step(a, opt_a, rank, step)
        train_step(b, opt_b, rank, step)
    with RoutingCollector([b]) as collector:
        after_training = float((evaluate(a, rank) - evaluate(b, rank)).abs().max())
    stats = collector.last()[0].stats
    return {"physical_of_expert": b.gate.physical_E.tolist(), "experts_moved": cost.experts_moved,
            "bytes_sent": cost.bytes_sent, "max_diff_after_move": after_move,
            "max_diff_after_training": after_training, "loss_scale": scale,
            "cross_rank_rate_physical": float(stats.comm_physical["cross_rank_rate"]),
            "cross_rank_rate_binned": float(stats.comm_binned["cross_rank_rate"])}


def main() -> None:
    args = parse_args()
    init_distributed()
    rank = distributed.rank()
    report = {d: check(d, rank) for d in ("deepspeed", "rank_once")}
    write_report(args.out, report)


if __name__ == "__main__":
    main()
