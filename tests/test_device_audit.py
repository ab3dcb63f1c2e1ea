"""Every tensor of the training path lives on the model's device; nothing names a backend.

NCCL rejects CPU tensors, and a tensor made on the CPU in a GPU run is a silent host round trip.  On a
CPU-only machine both look alike, so the audit makes them differ: it sets the *default* device to
`meta` while a layer on the CPU trains.  A tensor created without an explicit device (`torch.zeros(n)`,
`torch.tensor(...)`, `torch.arange(n)`) then lands on `meta`, and the audit reports the op and the
source line; a tensor made where the model lives (`device=x.device`, `x.new_zeros`) stays on the CPU.
"""
import ast
import traceback
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ds_smoes.core.config import SMoESConfig
from ds_smoes.moe.layer import SMoESMoE
from ds_smoes.moe.collector import RoutingCollector
from ds_smoes.moe.updates import apply_step_updates

ROOT = Path(__file__).resolve().parents[1] / "ds_smoes"
D, E, B, T = 16, 4, 2, 6


class DeviceAudit(TorchDispatchMode):
    """Records every op whose output landed on the default device `meta` (made without naming a device)."""

    def __init__(self) -> None:
        super().__init__()
        self.implicit: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        if any(isinstance(o, torch.Tensor) and o.device.type == "meta" for o in outs):
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
            where = f"{frames[-1].filename.split('/')[-1]}:{frames[-1].lineno} {frames[-1].name}" if frames else "?"
            self.implicit.append(f"{func} at {where}")
        return out


def _audit(fn):
    """The ops that made a tensor without naming a device, in the order they ran (a later op that mixes such a
    tensor with the model's, or reads it, fails: the audit stops there and reports what it found)."""
    audit = DeviceAudit()
    torch.set_default_device("meta")
    try:
        with audit:
            fn()
    except (RuntimeError, NotImplementedError) as err:
        # a tensor made where the mode does not see it (torch.tensor(python data)) shows up here, when it is used
        ours = [f for f in traceback.extract_tb(err.__traceback__) if "/ds_smoes/" in f.filename]
        where = f" at {ours[-1].filename.split('/')[-1]}:{ours[-1].lineno} {ours[-1].name}" if ours else ""
        audit.implicit.append(f"(then: {type(err).__name__}: {str(err)[:80]}){where}")
    finally:
        torch.set_default_device(None)
    return audit.implicit


CASES = [dict(gate="smoes", score_type=s, dispatch=d) for s in ("hard", "gaussian", "attention")
         for d in ("deepspeed", "rank_once")]
CASES += [dict(gate="smoes", score_type="attention", bin_objective="kl"),
          dict(gate="smoes", score_type="hard", drop_tokens=True),
          dict(gate="smoes", score_type="hard", max_bins_per_token=1, num_bins=4, num_experts=8),
          dict(gate="ltdr", k=1, ltdr_top_a=3), dict(gate="hard"), dict(gate="hybrid", shared_experts=2)]
# gate="topk" runs DeepSpeed's TopKGate code unmodified, whose capacity is made from CPU scalars (DeepSpeed's
# choice; on CUDA those are host scalars, no device tensor); it is left out here


@pytest.mark.parametrize("fields", CASES, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_training_step_creates_no_tensor_off_the_models_device(fields):
    cfg = SMoESConfig(**{**dict(num_experts=E, k=2, ep_size=1, num_bins=2, binning="adaptive", rebin_interval=1),
                         **fields})
    torch.manual_seed(0)
    layer = SMoESMoE(D, nn.Sequential(nn.Linear(D, 32), nn.GELU(), nn.Linear(32, D)), cfg).train()
    x_BTD = torch.randn(B, T, D, requires_grad=True)
    labels_BT = torch.tensor([[1, 1, 1, 0, 0, 0]] * B)
    scores_BTM = torch.softmax(torch.randn(B, T, 2), -1)

    def step():
        with RoutingCollector([layer]) as collector:
            out, l_aux, _ = layer(x_BTD, modality_labels=labels_BT, modality_scores=scores_BTM,
                                  used_token=torch.ones(B, T, dtype=torch.bool, device=x_BTD.device))
        (out.pow(2).mean() + l_aux).backward()
        apply_step_updates(layer)          # the optimizer step's update
        [[call]] = collector.take()
        _ = call.stats, call.comm()        # what a logging step reads

    assert _audit(step) == []


def test_the_audit_catches_a_tensor_made_without_a_device():
    def careless():
        x_D = torch.ones(2, device="cpu")        # the model's tensor
        return x_D + torch.zeros(2)              # torch.zeros(2) names no device
    found = _audit(careless)
    assert "aten.zeros" in found[0] and "careless" in found[0] and "then: RuntimeError" in found[-1], found
    found = _audit(lambda: torch.arange(2).numel())
    assert len(found) == 1 and "arange" in found[0], found


# -- the source: no backend literal, no .cpu() on the training path ---------------------------------
TRAINING_PATH = sorted({*ROOT.glob("moe/**/*.py"), *ROOT.glob("model/*.py"), *ROOT.glob("core/*.py"),
                        *ROOT.glob("parallel/*.py"), *ROOT.glob("hf/*.py"), *ROOT.glob("compress/*.py"),
                        *(ROOT / "app" / f for f in ("session.py", "loop.py", "train.py", "builtin.py",
                                                     "hf_family.py", "family.py", "evaluation.py")),
                        ROOT / "sweep" / "trial.py"})
# placement plans and expert migration are host-side bookkeeping done once per run (when the bins freeze)
HOST_SIDE = {"core/placement.py", "parallel/migration.py"}


def _violations(path: Path) -> list[str]:
    """Backend literals anywhere; `.cpu()` outside HOST_SIDE, unless its line says why ("# host read: ...", e.g.
    once per logging window)."""
    rel = path.relative_to(ROOT).as_posix()
    lines = path.read_text().splitlines()
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.lower() in {"gloo", "nccl"}:
            found.append(f"{rel}:{node.lineno} backend literal {node.value!r}")
        if (rel not in HOST_SIDE and isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "cpu" and "# host read:" not in lines[node.lineno - 1]):
            found.append(f"{rel}:{node.lineno} .cpu()")
    return found


def test_training_path_names_no_backend_and_calls_no_cpu():
    assert len(TRAINING_PATH) > 30 and all(p.exists() for p in TRAINING_PATH)
    assert [v for p in TRAINING_PATH for v in _violations(p)] == []


def test_the_source_check_finds_what_it_looks_for(tmp_path):
    bad = ROOT / "moe" / "_audit_probe.py"
    try:
        bad.write_text('import deepspeed\ndeepspeed.init_distributed(dist_backend="gloo")\nx = y.cpu()\n')
        assert sorted(_violations(bad)) == ["moe/_audit_probe.py:2 backend literal 'gloo'",
                                            "moe/_audit_probe.py:3 .cpu()"]
    finally:
        bad.unlink()
