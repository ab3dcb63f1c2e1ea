"""Run under `deepspeed --num_gpus 2`: the rank_once dispatch with ep_size 2 on gloo against a
single-process reference that holds all experts (DeepSpeed's stock MOELayer, ep_size 1, same
weights), forward and backward, the local experts run grouped (stacked weights, one grouped matmul per projection)
or, for expert modules of no recognised kind, in a loop; and the measured bytes against the send counts.
Each rank writes OUT/rank{r}.json; tests/test_dispatch.py asserts on them."""

import contextlib

import torch
from rank_report import parse_args, write_report
from torch import nn

from ds_smoes.parallel import distributed
from ds_smoes.core.config import SMoESConfig
from ds_smoes.moe.gate import RoutingInputs
from ds_smoes.moe.collector import RoutingCollector
from ds_smoes.moe.layer import SMoESMoE
from ds_smoes.core.scores import hard_scores
from ds_smoes.parallel.grouped_experts import grouped_kind, is_view_stacked
from ds_smoes.parallel.launch import init_distributed

D, E, EP = 8, 4, 2
LOCAL = E // EP
TOKENS = {0: (2, 6), 1: (1, 7)}  # [B, T] per rank: the ranks hold different numbers of tokens
CASES = {
    "smoes_k2": {"k": 2},
    "smoes_k1": {"k": 1},
    "ltdr_variable_k": {"gate": "ltdr", "k": 1, "ltdr_top_a": 3},
    "bin_limited": {"k": 2, "max_bins_per_token": 1},
    "rank1_only_padding": {"k": 2},
    "topk_k1": {"gate": "topk", "k": 1},   # DeepSpeed's top-1 routing (dropless, RTS) through rank_once
    "module_loop_k2": {"k": 2},            # experts of no recognised kind: the loop over modules, not grouped
}


class Opaque(nn.Module):
    """An expert module the grouped path does not recognise (run_local_experts loops over it)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def build(fields: dict, ep_size: int, dispatch: str, rank: int, opaque: bool = False) -> SMoESMoE:
    cfg = SMoESConfig(**{"num_experts": E, "num_bins": 2, "score_type": "hard", "binning": "fixed",
                         "alpha_bal": 0.5, "alpha_mi": 0.25, "ep_size": ep_size, "dispatch": dispatch, **fields})
    torch.manual_seed(0)
    expert = nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D))
    layer = SMoESMoE(D, Opaque(expert) if opaque else expert, cfg)
    layer.gate.wg.weight.data.normal_(0, 1.0, generator=torch.Generator().manual_seed(7))
    experts = layer.deepspeed_moe.experts.deepspeed_experts
    for i, expert in enumerate(experts):  # global expert g from seed 100 + g, whatever the layout
        gen = torch.Generator().manual_seed(100 + rank * len(experts) + i)
        for p in expert.parameters():
            p.data.normal_(0, 0.5, generator=gen)
    return layer


def batch(rank: int, case: str):
    b, t = TOKENS[rank]
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(b, t, D, generator=g)
    labels = torch.randint(0, 2, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[-1, -1] = False
    if case == "rank1_only_padding" and rank == 1:
        mask[:] = False
    probe = torch.randn(b, t, D, generator=g)  # loss = <out, probe> + l_aux
    return x, labels, mask, probe


def run(layer: SMoESMoE, x, labels, mask, probe):
    x = x.clone().requires_grad_(True)
    out, l_aux, _ = layer(x, mask, modality_labels=labels)
    ((out * probe).sum() + l_aux).backward()
    return out.detach(), x.grad


def routes(layer: SMoESMoE, x, labels, mask) -> torch.Tensor:
    """indices_KS of the reference gate on this batch (as the layer would call it)."""
    b, t = labels.shape
    inputs = RoutingInputs(hard_scores(labels.reshape(-1)), labels.reshape(-1), torch.arange(b).repeat_interleave(t),
                           mask.reshape(-1))
    with torch.no_grad():
        return layer.gate(x.reshape(-1, D), None, True, False, inputs=inputs)[3]


@contextlib.contextmanager
def counting_all_reduces():
    """Yields a list that gets one entry per torch.distributed.all_reduce call made inside the block."""
    real, counter = torch.distributed.all_reduce, []

    def counted(*args, **kwargs):
        counter.append(1)
        return real(*args, **kwargs)

    torch.distributed.all_reduce = counted
    try:
        yield counter
    finally:
        torch.distributed.all_reduce = real


def max_diff(a, b) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def check(case: str, fields: dict, rank: int) -> dict:
    opaque = case == "module_loop_k2"
    layer = build(fields, EP, "rank_once", rank, opaque)
    local_experts = layer.deepspeed_moe.experts.deepspeed_experts
    grouped, stacked = grouped_kind(local_experts) is not None, is_view_stacked(local_experts)
    layer.set_deepspeed_parallelism()
    x, labels, mask, probe = batch(rank, case)
    with counting_all_reduces() as all_reduces, RoutingCollector([layer]) as collector:
        out, x_grad = run(layer, x, labels, mask, probe)   # rank_once needs no common capacity: no all-reduce
    [[call]] = collector.take()
    comm = call.comm()
    physical = call.stats.comm_physical

    ref = build(fields, 1, "deepspeed", 0, opaque)
    ref_expert_params = [list(e.parameters()) for e in ref.deepspeed_moe.experts.deepspeed_experts]
    send_to_other = []
    for r in range(EP):  # every rank's batch through the reference; expert gradients accumulate
        ref.gate.wg.weight.grad = None
        xr, lr, mr, pr = batch(r, case)
        ref_out, ref_x_grad = run(ref, xr, lr, mr, pr)
        if r == rank:
            mine = (ref_out, ref_x_grad, ref.gate.wg.weight.grad.clone())
        idx_KS = routes(ref, xr, lr, mr)
        on_other_KS = (idx_KS >= 0) & (idx_KS.long() // LOCAL != r)
        send_to_other.append(int(on_other_KS.any(0).sum()))  # tokens sent to the other rank, by hand
    ref_out, ref_x_grad, ref_wg_grad = mine

    local = layer.deepspeed_moe.experts.deepspeed_experts
    expert_diff = max(max_diff(p.grad, q.grad) for i, e in enumerate(local)
                      for p, q in zip(e.parameters(), ref_expert_params[rank * LOCAL + i]))
    expert_scale = max(float(q.grad.abs().max()) for i in range(LOCAL) for q in ref_expert_params[rank * LOCAL + i])
    other = 1 - rank
    return {
        "out_diff": max_diff(out, ref_out), "out_scale": float(ref_out.abs().max()),
        "x_grad_diff": max_diff(x_grad, ref_x_grad), "x_grad_scale": float(ref_x_grad.abs().max()),
        "wg_grad_diff": max_diff(layer.gate.wg.weight.grad, ref_wg_grad),
        "wg_grad_scale": float(ref_wg_grad.abs().max()),
        "expert_grad_diff": expert_diff, "expert_grad_scale": expert_scale,
        "dispatch_bytes": comm.dispatch_bytes, "combine_bytes": comm.combine_bytes,
        "metadata_bytes": comm.metadata_bytes,
        "expected_dispatch_bytes": send_to_other[rank] * D * 4,
        "expected_combine_bytes": send_to_other[other] * D * 4,
        "expected_metadata_bytes": 8 + send_to_other[rank] * layer.gate.num_routes * 8,
        "cross_rank_rate": comm.cross_rank_rate, "ranks_per_token": comm.ranks_per_token,
        "num_tokens": comm.num_tokens, "all_reduces": len(all_reduces),
        "gate_cross_rank_rate": float(physical["cross_rank_rate"]),
        "gate_ranks_per_token": float(physical["ranks_per_token"]),
        "grouped": grouped, "stacked": stacked,
        "max_routes": int((routes(ref, x, labels, mask) >= 0).sum(0).max()) if mask.any() else 0,
    }


def main() -> None:
    args = parse_args()
    init_distributed()
    rank = distributed.rank()
    report = {name: check(name, fields, rank) for name, fields in CASES.items()}
    write_report(args.out, report)


if __name__ == "__main__":
    main()
