"""Grouped experts (ds_smoes/parallel/grouped_experts.py): a rank's recognised experts run as stacked weights in
one grouped matmul per projection, against the loop over modules (outputs, input, weight and every expert
parameter's gradient); which experts are recognised; the zero-copy view of construction-time stacking and of a
flat buffer, and the copy when there is none; no host read; the segment-loop fallback; DeepSpeed checkpoints
between the two dispatches and a bf16 ZeRO-1 engine (a 1-process DeepSpeed run: `python this_file.py OUT`).

Tolerances: fp32 on the CPU gives bit-identical outputs and input gradients (`torch._grouped_mm`'s CPU loop runs
the same `mm` per expert); the weights' gradients too, the biases' within 1e-6 of their scale (an index_add of
the rows instead of Linear's sum).  bf16: within 2e-2 of the scale (bf16 rounding of the intermediate).
"""
import copy
import json
import sys

import pytest
import torch
from torch import nn

from ds_smoes.testing.host_syncs import count_host_syncs
from ds_smoes.hf.experts import GatedExpert
from ds_smoes.parallel import grouped_experts
from ds_smoes.parallel.dispatch import expert_pair_counts, run_local_experts
from ds_smoes.parallel.grouped_experts import (GroupedExperts, grouped_kind, is_view_stacked, stack_expert_params_,
                                               stack_params)

D, H, N, Z, K = 16, 32, 4, 12, 2


class Opaque(nn.Module):
    """An expert module of no recognised kind: run_local_experts loops over it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def make_experts(kind: str, n: int = N, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    if kind == "mlp":
        return [nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D)) for _ in range(n)]
    if kind == "mlp_tanh_nobias":
        return [nn.Sequential(nn.Linear(D, H, bias=False), nn.GELU("tanh"), nn.Linear(H, D, bias=False))
                for _ in range(n)]
    return [GatedExpert(D, H // 2, nn.SiLU()) for _ in range(n)]  # a module act_fn, deep-copied per expert


def routes(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(local_ZK, weight_ZK): random local routes, -1 (elsewhere / unused) included; expert N-1 gets no row."""
    g = torch.Generator().manual_seed(seed)
    local_ZK = torch.randint(-1, N - 1, (Z, K), generator=g)
    local_ZK[0] = torch.tensor([0, 1])
    return local_ZK, torch.rand(Z, K, generator=g) * (local_ZK >= 0)


def run(experts, dtype, sizes, seed=2, kernel="grouped"):
    """(out, x.grad, weight.grad, [every parameter's grad]) of a forward + backward of a random probe; the grouped
    kernel unless another is named (ds_smoes.parallel.expert_kernels: it falls back where it does not apply)."""
    g = torch.Generator().manual_seed(seed)
    local_ZK, weight_ZK = routes()
    x = torch.randn(Z, D, generator=g).to(dtype).requires_grad_(True)
    weight_ZK = weight_ZK.clone().requires_grad_(True)
    for p in (p for e in experts for p in e.parameters()):
        p.grad = None
    out = run_local_experts(x, local_ZK, weight_ZK, experts, sizes, kernel)
    out.backward(torch.randn(out.shape, generator=g))  # a contiguous gradient (not an expanded one)
    return out.detach(), x.grad, weight_ZK.grad, [p.grad for e in experts for p in e.parameters()]


def within(a, b, tol):
    return (a.float() - b.float()).abs().max() <= tol * max(1.0, float(b.float().abs().max()))


# -- which experts ---------------------------------------------------------------------------------------------
def test_recognised_kinds():
    assert grouped_kind(make_experts("mlp")) == "mlp" and grouped_kind(make_experts("mlp_tanh_nobias")) == "mlp"
    assert grouped_kind(make_experts("gated")) == "gated"
    assert grouped_kind([Opaque(e) for e in make_experts("mlp")]) is None  # arbitrary modules: the loop
    assert grouped_kind(make_experts("mlp")[:2] + make_experts("gated")[:2]) is None  # mixed
    mixed_act = make_experts("mlp")
    mixed_act[1][1] = nn.GELU("tanh")
    assert grouped_kind(mixed_act) is None
    gated = make_experts("gated")
    gated[2].act_fn = nn.GELU()
    assert grouped_kind(gated) is None
    assert grouped_kind([nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D)),
                         nn.Sequential(nn.Linear(D, 2 * H), nn.GELU(), nn.Linear(2 * H, D))]) is None  # shapes
    assert grouped_kind([nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, D))]) is None


# -- grouped = the loop over modules ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "mlp_tanh_nobias", "gated"])
@pytest.mark.parametrize("known_sizes", [True, False], ids=["sizes_given", "all_pairs_masked"])
@pytest.mark.parametrize("stacked", [True, False], ids=["view", "stack_copy"])
def test_grouped_equals_the_loop_in_float32(kind, known_sizes, stacked):
    experts = make_experts(kind)
    loop = [Opaque(e) for e in copy.deepcopy(experts)]
    if stacked:
        stack_expert_params_(experts)
    assert is_view_stacked(experts) == stacked
    local_ZK, _ = routes()
    sizes = expert_pair_counts(local_ZK, N)[:N].tolist() if known_sizes else None
    assert sizes is None or sizes[N - 1] == 0
    got, want = run(experts, torch.float32, sizes), run(loop, torch.float32, None)
    for name, a, b in zip(("out", "x_grad", "weight_grad"), got[:3], want[:3]):
        assert torch.equal(a, b), name  # bit-identical on the CPU
    for (pname, _), a, b in zip([np for e in experts for np in e.named_parameters()], got[3], want[3]):
        assert a is not None and a.shape == b.shape, pname
        assert within(a, b, 1e-6), pname
        if pname.endswith("weight"):
            assert torch.equal(a, b), pname
    # the expert no row reached gets zero gradients, as with the loop (and DeepSpeed's padded buffer)
    assert all(float(g.abs().max()) == 0 for g in got[3][-len(list(experts[-1].parameters())):])


@pytest.mark.parametrize("kind", ["mlp", "gated"])
def test_grouped_equals_the_loop_in_bf16(kind):
    experts = [e.to(torch.bfloat16) for e in make_experts(kind)]
    loop = [Opaque(e) for e in copy.deepcopy(experts)]
    stack_expert_params_(experts)
    got, want = run(experts, torch.bfloat16, None), run(loop, torch.bfloat16, None)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    for a, b in zip([*got[:3], *got[3]], [*want[:3], *want[3]]):
        assert within(a, b, 2e-2)


def test_an_expanded_output_gradient_backpropagates():
    # _grouped_mm's backward wants a contiguous gradient; the mask, weights and scatter-add in between give it one
    experts = make_experts("mlp")
    stack_expert_params_(experts)
    local_ZK, weight_ZK = routes()
    x = torch.randn(Z, D, requires_grad=True)
    run_local_experts(x, local_ZK, weight_ZK, experts).sum().backward()
    assert x.grad.abs().sum() > 0


# -- the stacked weights: a view when they lie evenly strided, else a copy ---------------------------------------
def test_view_after_stacking_and_copy_after_a_rebinding():
    experts = make_experts("mlp")
    assert not is_view_stacked(experts)
    stack_expert_params_(experts)
    assert is_view_stacked(experts)
    weights = [e[0].weight for e in experts]
    w_EHD = stack_params(weights)
    assert w_EHD.data_ptr() == weights[0].data_ptr() and torch.equal(w_EHD, torch.stack(weights))  # zero-copy
    experts[2][0].weight.data = experts[2][0].weight.data.clone()  # one expert's p.data replaced
    assert not is_view_stacked(experts)
    w_EHD = stack_params(weights)
    assert w_EHD.data_ptr() != weights[0].data_ptr() and torch.equal(w_EHD, torch.stack(weights))  # a copy
    loop = [Opaque(e) for e in copy.deepcopy(experts)]
    got, want = run(experts, torch.float32, None), run(loop, torch.float32, None)  # still correct
    assert torch.equal(got[0], want[0]) and all(within(a, b, 1e-6) for a, b in zip(got[3], want[3]))


def test_a_flat_buffer_with_one_expert_after_another_is_a_view():
    # DeepSpeed's ZeRO / BF16_Optimizer flatten a group's parameters in order and rebind p.data to the slices
    experts = make_experts("mlp")
    params = [p for e in experts for p in e.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        p.data = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    assert is_view_stacked(experts)
    g = torch.Generator().manual_seed(3)
    w_EHD = stack_params([e[0].weight for e in experts])
    grad_EHD = torch.randn(w_EHD.shape, generator=g)
    w_EHD.backward(grad_EHD)
    assert all(torch.equal(e[0].weight.grad, grad_EHD[i]) for i, e in enumerate(experts))


def test_layer_stacks_at_construction_and_after_to():
    from ds_smoes.core.config import SMoESConfig
    from ds_smoes.moe.layer import SMoESMoE

    expert = nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D))
    once = SMoESMoE(D, expert, SMoESConfig(num_experts=4, k=2, num_bins=2, dispatch="rank_once"))
    stock = SMoESMoE(D, expert, SMoESConfig(num_experts=4, k=2, num_bins=2, dispatch="deepspeed"))
    experts = once.deepspeed_moe.experts.deepspeed_experts
    assert is_view_stacked(experts) and not is_view_stacked(stock.deepspeed_moe.experts.deepspeed_experts)
    names = list(once.state_dict())
    once.to(torch.bfloat16)
    assert is_view_stacked(experts) and experts[0][0].weight.dtype == torch.bfloat16
    assert list(once.state_dict()) == names == list(stock.state_dict())  # checkpoints see the same parameters
    gated = SMoESMoE(D, GatedExpert(D, H // 2, nn.SiLU()), SMoESConfig(num_experts=4, k=2, num_bins=2,
                                                                      dispatch="rank_once"))
    assert is_view_stacked(gated.deepspeed_moe.experts.deepspeed_experts)


# -- host reads and the fallback ---------------------------------------------------------------------------------
def test_grouped_experts_read_nothing_on_the_host():
    experts = make_experts("mlp")
    stack_expert_params_(experts)
    with count_host_syncs() as syncs:
        run(experts, torch.float32, None)
    assert syncs.total == 0, syncs.report()
    with count_host_syncs() as syncs:  # the loop over modules reads the experts' sizes
        run([Opaque(e) for e in experts], torch.float32, None)
    assert syncs.total == 1, syncs.report()


@pytest.mark.parametrize("kind", ["mlp", "gated"])
def test_segment_loop_fallback_reads_the_offsets_once_and_agrees(kind, monkeypatch):
    experts = make_experts(kind)
    stack_expert_params_(experts)
    want = run(experts, torch.float32, None)
    monkeypatch.setattr(grouped_experts, "native_grouped_mm", lambda x: False)
    with count_host_syncs() as syncs:
        got = run(experts, torch.float32, None)
    assert syncs.total == 1 and dict(syncs.by_op) == {"tolist": 1}, syncs.report()  # forward only
    for a, b in zip([*got[:3], *got[3]], [*want[:3], *want[3]]):
        assert within(a, b, 1e-6)
    sizes = expert_pair_counts(routes()[0], N)[:N].tolist()
    with count_host_syncs() as syncs:  # sizes the caller read already (one EP rank) give the bounds: no read
        got = run(experts, torch.float32, sizes)
    assert syncs.total == 0, syncs.report()
    assert all(within(a, b, 1e-6) for a, b in zip([*got[:3], *got[3]], [*want[:3], *want[3]]))


def test_widths_that_break_the_stride_rule_use_the_fallback():
    # _grouped_mm wants rows of 16 bytes' multiples; D = 6 float32 is 24 bytes: the segment loop runs instead
    torch.manual_seed(0)
    experts = [nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 6)) for _ in range(2)]
    x = torch.randn(5, 6)
    counts = torch.tensor([2, 3])
    out = GroupedExperts.of(experts)(x, counts, torch.tensor([0, 0, 1, 1, 1]))
    assert torch.allclose(out, torch.cat([experts[0](x[:2]), experts[1](x[2:])]), atol=1e-6)


# -- DeepSpeed: checkpoints across dispatches, a bf16 ZeRO-1 engine ------------------------------------------------
class OneLayer(nn.Module):
    def __init__(self, dispatch: str, seed: int, expert: str = "mlp") -> None:
        from ds_smoes.core.config import SMoESConfig
        from ds_smoes.moe.layer import SMoESMoE

        super().__init__()
        torch.manual_seed(seed)
        proto = (nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D)) if expert == "mlp"
                 else GatedExpert(D, H // 2, nn.SiLU()))
        self.moe = SMoESMoE(D, proto, SMoESConfig(num_experts=4, k=2, num_bins=2, score_type="hard",
                                                  dispatch=dispatch))
        for i, e in enumerate(self.moe.deepspeed_moe.experts.deepspeed_experts):
            for p in e.parameters():
                p.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(100 * seed + i))  # in place

    def forward(self, x_BTD, labels_BT):
        out, l_aux, _ = self.moe(x_BTD, modality_labels=labels_BT)
        return out, l_aux


def _engine(dispatch: str, seed: int, config: dict | None = None, expert: str = "mlp"):
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    model = OneLayer(dispatch, seed, expert)
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "all"})
    opt = torch.optim.AdamW(groups, lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
        "train_micro_batch_size_per_gpu": 2, "steps_per_print": 10**9, "zero_optimization": {"stage": 0},
        **(config or {})})
    return engine


def _batch(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 6, D, generator=g).to(dtype), torch.randint(0, 2, (2, 6), generator=g)


def _train(engine, steps: int, dtype=torch.float32) -> list[float]:
    losses = []
    for step in range(steps):
        out, l_aux = engine(*_batch(step, dtype))
        loss = out.float().pow(2).mean() + l_aux
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


def _experts_state(engine) -> dict:
    return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items() if "deepspeed_experts" in k}


def _probe(engine, dtype=torch.float32):
    engine.module.eval()
    with torch.no_grad():
        out = engine(*_batch(999, dtype))[0].float()
    engine.module.train()
    return out


def deepspeed_main(out_dir: str) -> None:
    from pathlib import Path

    from ds_smoes.parallel.launch import init_distributed

    init_distributed()
    out = Path(out_dir)
    report = {}
    for expert in ("mlp", "gated"):
        for saver, loader in (("rank_once", "deepspeed"), ("deepspeed", "rank_once")):
            engine = _engine(saver, 0, expert=expert)
            _train(engine, 2)
            ckpt = out / f"{expert}_{saver}"
            engine.save_checkpoint(str(ckpt), tag="t")
            files = sorted(p.name for p in (ckpt / "t").iterdir())
            fresh = _engine(loader, 5, expert=expert)  # other weights: everything compared must come from the file
            fresh.load_checkpoint(str(ckpt), tag="t")
            before, after = _experts_state(engine), _experts_state(fresh)
            report[f"{expert}_{saver}_to_{loader}"] = {
                "files": files, "keys_equal": sorted(before) == sorted(after),
                "mismatched": sorted(k for k in before if not torch.equal(before[k], after[k])),
                "probe_diff": float((_probe(engine) - _probe(fresh)).abs().max()),
                "stacked_after_load": is_view_stacked(fresh.module.moe.deepspeed_moe.experts.deepspeed_experts)
                if loader == "rank_once" else None}
    # bf16, ZeRO 1: with fp32 gradient accumulation DeepSpeed's BF16_Optimizer, else its ZeRO optimizer; both
    # flatten the parameters into flat buffers and rebind p.data to their slices
    for name, extra in (("bf16_optimizer", {"data_types": {"grad_accum_dtype": "fp32"}}), ("bf16_zero1", {})):
        config = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}, **extra}
        engine = _engine("rank_once", 0, config)
        experts = engine.module.moe.deepspeed_moe.experts.deepspeed_experts
        stock = _engine("deepspeed", 0, config)
        report[name] = {"optimizer": type(engine.optimizer).__name__, "stacked": is_view_stacked(experts),
                        "dtype": str(experts[0][0].weight.dtype),
                        "losses": _train(engine, 3, torch.bfloat16),
                        "stock_losses": _train(stock, 3, torch.bfloat16),
                        "stacked_after_steps": is_view_stacked(experts),
                        "weights_diff": max(float((a - b).abs().max()) for a, b in
                                            zip(_experts_state(engine).values(), _experts_state(stock).values()))}
    (out / "report.json").write_text(json.dumps(report))


@pytest.mark.slow
def test_deepspeed_checkpoints_cross_dispatches_and_bf16_zero1_trains(tmp_path):
    from launch import python_run

    proc = python_run([__file__, str(tmp_path)], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    for name, rep in report.items():
        if name.startswith("bf16"):
            continue
        assert rep["keys_equal"] and rep["mismatched"] == [], (name, rep)
        assert rep["probe_diff"] <= 1e-5, (name, rep)
        assert any("expp_rank" in f for f in rep["files"]), (name, rep["files"])  # per-expert files
        assert rep["stacked_after_load"] in (None, True), name
    for name, optimizer in (("bf16_optimizer", "BF16_Optimizer"), ("bf16_zero1", "DeepSpeedZeroOptimizer")):
        rep = report[name]
        assert rep["optimizer"] == optimizer and rep["dtype"] == "torch.bfloat16", rep
        assert rep["stacked"] and rep["stacked_after_steps"], rep  # the flat buffer is evenly strided: a view
        # the same training as the stock dispatch, within bf16; Adam moves a weight by about lr = 1e-2 a step
        # whatever its gradient's size, so bf16-level gradient differences may part them by 2 lr a step (3 steps)
        assert all(abs(a - b) <= 2e-2 * max(1.0, abs(b)) for a, b in zip(rep["losses"], rep["stock_losses"])), rep
        assert rep["weights_diff"] <= 6e-2, rep

if __name__ == "__main__":
    deepspeed_main(sys.argv[1])
