"""The expert kernels of the rank_once dispatch: they agree, a named one runs (or the next that applies), and
"auto" keeps the one measured fastest, probed once per key."""
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ds_smoes.testing.host_syncs import count_host_syncs
from ds_smoes.hf.experts import GatedExpert
from ds_smoes.parallel import expert_kernels
from ds_smoes.parallel.dispatch import run_local_experts
from ds_smoes.parallel.grouped_experts import stack_expert_params_

D, I, N, Z, K = 16, 24, 4, 20, 2


def _experts(kind: str) -> nn.ModuleList:
    torch.manual_seed(0)
    if kind == "gated":
        experts = nn.ModuleList(GatedExpert(D, I, F.silu) for _ in range(N))
    elif kind == "mlp":
        experts = nn.ModuleList(nn.Sequential(nn.Linear(D, I), nn.GELU(), nn.Linear(I, D)) for _ in range(N))
    else:   # not a recognised kind: only the module loop runs it
        experts = nn.ModuleList(nn.Sequential(nn.Linear(D, I), nn.Tanh(), nn.Linear(I, D)) for _ in range(N))
    if kind != "other":
        stack_expert_params_(experts)
    return experts


def _routes():
    g = torch.Generator().manual_seed(3)
    local_ZK = torch.randint(-1, N, (Z, K), generator=g)
    weight_ZK = torch.rand(Z, K, generator=g) * (local_ZK >= 0)
    return torch.randn(Z, D, generator=g), local_ZK.int(), weight_ZK


def _run(experts, kernel: str, sizes=None):
    x_ZD, local_ZK, weight_ZK = _routes()
    x_ZD.requires_grad_(True)
    for p in experts.parameters():
        p.grad = None
    out_ZD = run_local_experts(x_ZD, local_ZK, weight_ZK, list(experts), sizes, kernel)
    out_ZD.mul(torch.linspace(-1, 1, D)).sum().backward()
    return out_ZD.detach(), x_ZD.grad, [p.grad.clone() for p in experts.parameters()]


def _by_hand(experts):
    x_ZD, local_ZK, weight_ZK = _routes()
    ref = torch.zeros(Z, D)
    for z in range(Z):
        for k in range(K):
            if local_ZK[z, k] >= 0:
                ref[z] += weight_ZK[z, k] * experts[int(local_ZK[z, k])](x_ZD[z])
    return ref


@pytest.mark.parametrize("kind", ["gated", "mlp"])
@pytest.mark.parametrize("known_sizes", [False, True], ids=["sizes_read_here", "sizes_given"])
def test_the_three_kernels_agree_with_the_experts_by_hand(kind, known_sizes):
    experts = _experts(kind)
    sizes = torch.bincount(_routes()[1][_routes()[1] >= 0].long(), minlength=N).tolist() if known_sizes else None
    results = {kernel: _run(experts, kernel, sizes) for kernel in expert_kernels.KERNELS}
    with torch.no_grad():
        ref = _by_hand(experts)
    for kernel, (out, x_grad, grads) in results.items():
        assert torch.allclose(out, ref, atol=1e-5), kernel
        assert torch.allclose(x_grad, results["modules"][1], atol=1e-5), kernel
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, results["modules"][2])), kernel
    assert out.abs().sum() > 0 and all(g.abs().sum() > 0 for g in results["grouped"][2])


def test_host_reads_follow_the_kernel():
    # grouped keeps the offsets on the device; segments and modules need the experts' sizes on the host
    experts = _experts("mlp")
    for kernel, reads in (("grouped", 0), ("segments", 1), ("modules", 1)):
        with count_host_syncs() as syncs:
            _run(experts, kernel)
        assert syncs.total == reads, (kernel, syncs.report())


def test_a_named_kernel_that_does_not_apply_falls_back_in_order():
    assert expert_kernels.applicable(None, native=True) == ["modules"]
    assert expert_kernels.applicable("mlp", native=False) == ["segments", "modules"]
    assert expert_kernels.applicable("mlp", native=True) == ["grouped", "segments", "modules"]
    assert expert_kernels.known("grouped", ("k",), ["segments", "modules"]) == "segments"
    assert expert_kernels.known("grouped", ("k",), ["modules"]) == "modules"
    assert expert_kernels.known("modules", ("k",), ["grouped", "segments", "modules"]) == "modules"
    assert expert_kernels.known("auto", ("k",), ["modules"]) == "modules"   # nothing to choose from
    assert expert_kernels.known("auto", ("never probed",), ["segments", "modules"]) is None


def test_auto_keeps_the_fastest_measured_and_probes_a_key_once(capsys):
    calls = {"slow": 0, "fast": 0}

    def runner(name, seconds):
        def run(x):
            calls[name] += 1
            time.sleep(seconds)
            return x * 2.0
        return run

    key = ("cpu", torch.float32, "test", ((1,),), 1, 99, True)
    x = torch.ones(3, 2)
    chosen = expert_kernels.probe(key, x, [nn.Linear(2, 2)], {"slow": runner("slow", 0.02), "fast": runner("fast", 0)})
    assert chosen == "fast" and calls == {"slow": 1 + expert_kernels.PROBE_REPEATS, "fast": 1 + expert_kernels.PROBE_REPEATS}
    assert expert_kernels.known("auto", key, ["slow", "fast"]) == "fast"   # kept: no second probe
    kernel, seconds = expert_kernels.chosen()[key]
    assert kernel == "fast" and seconds["slow"] >= 0.02 > seconds["fast"]
    assert "[expert kernel]" in capsys.readouterr().out


def test_auto_in_a_dispatch_runs_the_kernel_it_measured():
    experts = _experts("gated")
    out, _, _ = _run(experts, "auto")
    x_ZD, local_ZK, _ = _routes()
    key = expert_kernels.probe_key(x_ZD, "gated", list(experts))
    kernel, seconds = expert_kernels.chosen()[key]
    assert set(seconds) == {"grouped", "segments", "modules"} and kernel == min(seconds, key=seconds.get)
    assert torch.allclose(out, _run(experts, kernel)[0], atol=1e-6)
    with torch.no_grad():   # inference: its own key (the forward alone is timed)
        assert expert_kernels.probe_key(x_ZD, "gated", list(experts)) != key
