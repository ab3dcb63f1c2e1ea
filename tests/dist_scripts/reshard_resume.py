"""Run under `deepspeed --num_gpus 2`: checkpoints across ep_size, 2 -> 1 -> 2 (permuted placement).

1. ep_size 2: train 3 steps, save (tag s3), then one more step: the reference loss and parameters.
2. ep_size 1 on the same 2 ranks (each rank keeps its own micro-batch, so the data order, the per-rank
   capacity and the loss averaging are those of the ep_size 2 run): `session._resume` converts the
   ep_size 2 checkpoint by itself and loads it; save that state again (tag ep1); one step.
3. ep_size 2 with a permuted placement: `reshard_checkpoint` (the command's function) converts the
   ep_size 1 checkpoint; load; one step.
Each stage compares the state it loaded (weights, optimizer state, SMoES buffers; experts by logical id)
with the state saved in 1 bit for bit, and its step's loss and parameters with the reference.
Each rank writes OUT/rank{r}.json; tests/test_reshard.py asserts on them."""
import torch
from ckpt_roundtrip import VOCAB, IMAGE_ID, B, synthetic_batch
from rank_report import parse_args, write_report

from ds_smoes.app import reshard
from ds_smoes.app.session import _resume, lr_lambda, optimizer_groups
from ds_smoes.core.config import SMoESConfig
from ds_smoes.model import ModelConfig, TinyMoEVLM
from ds_smoes.moe.updates import register_step_updates
from ds_smoes.parallel import distributed
from ds_smoes.parallel.launch import init_distributed

PERMUTED = [2, 0, 3, 1]  # physical slot of logical experts 0..3: every expert changes slot, three change rank


def build(seed: int, ep_size: int):
    """A fresh engine at ep_size, as in a new process: DeepSpeed's registry of expert groups is emptied
    first (with two ep_sizes registered it takes the largest group's EP rank to pick the checkpoint files)."""
    import deepspeed
    from deepspeed.utils import groups

    for registry in (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS,
                     groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS):
        registry.clear()
    torch.manual_seed(seed)
    smoes = SMoESConfig(num_experts=4, k=2, ep_size=ep_size, num_bins=2, score_type="gaussian",
                        binning="adaptive", rebin_interval=2, rebin_freeze_step=100)
    model = TinyMoEVLM(ModelConfig(d_model=32, n_layers=2, n_heads=2, patch_size=4, vision_dim=32, max_len=32),
                       VOCAB, IMAGE_ID, smoes, expert_seed=seed, ep_rank=distributed.rank() % ep_size)
    opt = torch.optim.AdamW(optimizer_groups(model, 0.01), lr=1e-2, betas=(0.9, 0.98))
    register_step_updates(opt, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(10, 2, 0.1))
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config={
        "train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 0}, "steps_per_print": 10**9})
    return engine


def train_step(engine, step: int) -> float:
    batch = synthetic_batch(1000 * distributed.rank() + step)  # each rank its own micro-batch, as in every stage
    out = engine(batch.input_ids_BT, batch.attention_mask_BT, batch.modality_BT, batch.image_BCHW,
                 batch.has_image_B, batch.labels_BT)
    engine.backward(out.loss)
    engine.step()
    return out.loss.item()


def live_state(engine) -> dict:
    """The whole world's state by logical name: parameters and buffers, optimizer state per parameter
    (experts: `...deepspeed_experts.{logical id}.*`); physical_E itself left out (the placement)."""
    module = engine.module
    rank = distributed.rank()
    prefixes = {}
    for name, m in module.named_modules():
        if m in module.moe_layers():
            ep, n = m.deepspeed_moe.ep_size, m.deepspeed_moe.num_local_experts
            logical_P = torch.empty(ep * n, dtype=torch.long)
            logical_P[m.gate.physical_E.long()] = torch.arange(ep * n)
            prefixes[f"{name}.deepspeed_moe.experts.deepspeed_experts."] = (rank % ep, n, logical_P)

    def logical(name):
        for prefix, (ep_rank, n, logical_P) in prefixes.items():
            if name.startswith(prefix):
                j, rest = name[len(prefix):].split(".", 1)
                return f"{prefix}{int(logical_P[ep_rank * n + int(j)])}.{rest}", True
        return name, False

    opt = engine.optimizer if isinstance(engine.optimizer, torch.optim.Optimizer) else engine.optimizer.optimizer
    state, experts = {}, {}
    for name, p in module.named_parameters():
        key, is_expert = logical(name)
        entry = {"value": p.detach().clone(), **{k: v.clone() for k, v in opt.state.get(p, {}).items()}}
        (experts if is_expert else state)[key] = entry
    for name, b in module.named_buffers():
        if not name.endswith("physical_E"):
            state[name] = {"value": b.clone()}
    gathered = [None] * distributed.world_size()
    torch.distributed.all_gather_object(gathered, experts)
    for part in gathered:
        state.update(part)
    return state


def compare(a: dict, b: dict, key: str = "value") -> dict:
    """Bit-for-bit equality and the largest relative difference max|a - b| / max|b| over the tensors."""
    names = sorted(set(a) | set(b))
    missing = [n for n in names if n not in a or n not in b or set(a[n]) != set(b[n])]
    unequal, worst = [], 0.0
    for n in names:
        if n in missing:
            continue
        for k in ([key] if key else a[n]):
            x, y = a[n][k], b[n][k]
            if not torch.equal(x, y):
                unequal.append(f"{n}:{k}")
                if x.is_floating_point():
                    worst = max(worst, float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)))
    return {"missing": missing[:8], "unequal": unequal, "max_rel": worst}


def main() -> None:
    args = parse_args()
    init_distributed()
    rank = distributed.rank()
    ckpt, ckpt1, ckpt2 = args.out / "ckpt_ep2", args.out / "ckpt_ep1", args.out / "ckpt_ep2_permuted"
    logs: list[str] = []

    e2 = build(0, 2)
    losses = [train_step(e2, s) for s in range(3)]
    saved = live_state(e2)
    e2.save_checkpoint(str(ckpt), tag="s3", client_state={"step": 3, "epoch": 0})
    layout2 = reshard.optimizer_layout(e2.module, e2.optimizer)
    ref_loss = train_step(e2, 3)
    ref = live_state(e2)

    # 2 -> 1: the training entry point's resume converts by itself
    e1 = build(7, 1)
    step, epoch, _ = _resume(e1, ckpt, 100, 10, logs.append, scratch_dir=args.out / "scratch")
    loaded1 = live_state(e1)
    e1.save_checkpoint(str(ckpt1), tag="ep1", client_state={"step": step, "epoch": epoch})
    layout1 = reshard.optimizer_layout(e1.module, e1.optimizer)
    loss1 = train_step(e1, 3)
    after1 = live_state(e1)

    # 1 -> 2 with a permuted placement: the command's function
    if rank == 0:
        reshard.reshard_checkpoint(ckpt1, None, layout1, ckpt2, 2, layout2, placement=[PERMUTED])
    distributed.barrier()
    e2b = build(7, 2)
    _, client = e2b.load_checkpoint(str(ckpt2))
    loaded2 = live_state(e2b)
    physical2 = e2b.module.moe_layers()[0].gate.physical_E.tolist()
    loss2 = train_step(e2b, 3)
    after2 = live_state(e2b)

    write_report(args.out, {
        "rank": rank, "losses": losses, "resumed": [step, epoch], "client2": [client.get("step"), client.get("epoch")],
        "logs": logs, "physical2": physical2, "scratch_left": sorted(p.name for p in (args.out / "scratch").iterdir()),
        "ref_loss": ref_loss, "loss1": loss1, "loss2": loss2,
        "loaded1_vs_saved": compare(loaded1, saved, key=None), "loaded2_vs_saved": compare(loaded2, saved, key=None),
        "after1_vs_ref": compare(after1, ref), "after2_vs_ref": compare(after2, ref),
        "moments1_vs_ref": compare(after1, ref, key=None), "moments2_vs_ref": compare(after2, ref, key=None),
        "lr": [e2.get_lr()[0], e1.get_lr()[0], e2b.get_lr()[0]],
        "ckpt_ep_sizes": [reshard.saved_ep_size(c) for c in (ckpt, ckpt1, ckpt2)],
    })


if __name__ == "__main__":
    main()
