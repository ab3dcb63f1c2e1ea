"""Run under `deepspeed --num_gpus 2`: `rank_once_dispatch` on 2 gloo EP ranks with bf16 vectors and experts
against a float32, single-process reference that holds every expert (forward, and the gradients of x, the
gates and the experts); how many all_to_all_single calls and host syncs it makes (bf16 and float32); and the
float32 routes through a real packed bf16 exchange, bit for bit.
Each rank writes OUT/rank{r}.json; tests/test_dispatch.py asserts on them."""


import torch
import torch.distributed as dist
from rank_report import parse_args, write_report
from torch import nn

from ds_smoes.testing.host_syncs import count_host_syncs
from ds_smoes.parallel import distributed
from ds_smoes.parallel.dispatch import exchange_rows, rank_once_dispatch, rank_once_moe
from ds_smoes.parallel.launch import init_distributed

D, E, K, EP = 16, 4, 2, 2
LOCAL = E // EP
TOKENS = {0: 11, 1: 6}  # the ranks hold different numbers of tokens


def experts_fp32() -> list[nn.Module]:
    """All E experts, physical expert g from seed 100 + g (the same on every rank)."""
    out = []
    for g in range(E):
        torch.manual_seed(100 + g)
        out.append(nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D)))
    return out


def batch(rank: int):
    """(x_SD float32 already rounded to bf16, indices_KS, gates_KS, probe_SD) of a rank: random distinct experts
    per token, some second routes unused, the last token padding (no route)."""
    s = TOKENS[rank]
    g = torch.Generator().manual_seed(1000 + rank)
    indices_KS = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(s)], dim=1).int()
    indices_KS[1, ::3] = -1
    indices_KS[:, -1] = -1
    gates_KS = torch.softmax(torch.randn(K, s, generator=g), dim=0) * (indices_KS >= 0)
    x_SD = torch.randn(s, D, generator=g).bfloat16().float()
    return x_SD, indices_KS, gates_KS, torch.randn(s, D, generator=g)


def counting_all_to_all():
    real, calls = dist.all_to_all_single, []

    def counted(output, input, *args, **kwargs):
        calls.append((str(input.dtype), list(input.shape)))
        return real(output, input, *args, **kwargs)

    dist.all_to_all_single = counted
    return calls, lambda: setattr(dist, "all_to_all_single", real)


def max_diff(a, b) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max()) if a.numel() else 0.0


def scale(a) -> float:
    return float(a.detach().float().abs().max()) if a.numel() else 0.0


def dispatch_case(rank: int, dtype: torch.dtype) -> dict:
    mine = [e.to(dtype) for e in experts_fp32()[rank * LOCAL:(rank + 1) * LOCAL]]
    x_SD, indices_KS, gates_KS, probe_SD = batch(rank)
    x = x_SD.to(dtype).requires_grad_(True)
    gates = gates_KS.clone().requires_grad_(True)
    calls, restore = counting_all_to_all()
    try:
        with count_host_syncs() as syncs:
            out_SD, volume = rank_once_dispatch(x, indices_KS, gates, mine, E, dist.group.WORLD, kernel="grouped")
            forward_calls = list(calls)
            (out_SD.float() * probe_SD).sum().backward()
    finally:
        restore()
    comm = volume()

    ref_experts = experts_fp32()  # every rank's tokens through all experts: the experts' gradients accumulate
    for r in range(EP):
        xr, ir, gr, pr = batch(r)
        xr, gr = xr.requires_grad_(True), gr.requires_grad_(True)
        ref_SD, _ = rank_once_moe(xr, ir, gr, ref_experts, E)
        (ref_SD * pr).sum().backward()
        if r == rank:
            ref = (ref_SD.detach(), xr.grad, gr.grad)
    ref_params = [p for e in ref_experts[rank * LOCAL:(rank + 1) * LOCAL] for p in e.parameters()]
    params = [p for e in mine for p in e.parameters()]
    on_other = ((indices_KS >= 0) & (indices_KS.long() // LOCAL != rank)).any(0)
    return {
        "out_dtype": str(out_SD.dtype),
        "out_diff": max_diff(out_SD, ref[0]), "out_scale": scale(ref[0]),
        "x_grad_diff": max_diff(x.grad, ref[1]), "x_grad_scale": scale(ref[1]),
        "gates_grad_diff": max_diff(gates.grad, ref[2]), "gates_grad_scale": scale(ref[2]),
        "expert_grad_diff": max(max_diff(p.grad, q.grad) for p, q in zip(params, ref_params)),
        "expert_grad_scale": max(scale(q.grad) for q in ref_params),
        "forward_all_to_all": forward_calls, "backward_all_to_all": calls[len(forward_calls):],
        "host_syncs": syncs.total, "host_syncs_report": syncs.report(),
        "rows_to_other": int(on_other.sum()), "dispatch_bytes": comm.dispatch_bytes,
        "metadata_bytes": comm.metadata_bytes,
    }


def route_bits(rank: int) -> dict:
    """float32 routes whose bf16 halves are NaN, infinity or subnormal patterns, through a real packed exchange:
    every rank sends row r to rank r."""
    bits_YX = torch.tensor([[0x3F807FC1, 0x7FC00001], [0xFF800001 - 2**32, 0x00010000 + rank]], dtype=torch.int32)
    routes_YX = bits_YX.view(torch.float32)
    x_YD = torch.full((2, D), float(rank), dtype=torch.bfloat16)
    x_ZD, routes_ZX = exchange_rows(x_YD, routes_YX, [1, 1], [1, 1], dist.group.WORLD)
    return {"received_bits": routes_ZX.view(torch.int32).tolist(), "received_x": x_ZD[:, 0].float().tolist()}


def main() -> None:
    args = parse_args()
    init_distributed()
    rank = distributed.rank()
    report = {"bf16": dispatch_case(rank, torch.bfloat16), "float32": dispatch_case(rank, torch.float32),
              "route_bits": route_bits(rank)}
    write_report(args.out, report)


if __name__ == "__main__":
    main()
