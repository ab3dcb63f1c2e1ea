"""Run under `deepspeed --num_gpus 2`: train a few steps with ep_size 2, checkpoint, reload into a
freshly initialised engine and compare every SMoES buffer, the expert weights and the outputs.
Each rank writes OUT/rank{r}.json; tests/test_distributed.py asserts on them."""

import torch
from rank_report import parse_args, write_report

from ds_smoes.moe.updates import register_step_updates
from ds_smoes.parallel import distributed
from ds_smoes.core.config import SMoESConfig
from ds_smoes.data import VLMBatch
from ds_smoes.model import ModelConfig, TinyMoEVLM
from ds_smoes.parallel.launch import init_distributed

VOCAB, IMAGE_ID, B, T = 20, 4, 4, 14


def synthetic_batch(seed: int) -> VLMBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, VOCAB, (B, T), generator=g)
    ids[:, 0] = 1
    has_image = torch.tensor([True, True, False, True])
    ids[has_image, 1:5] = IMAGE_ID  # 4 patches (8x8 image, patch 4)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[2, 10:] = False  # a padded, text-only sample
    labels = torch.where(torch.arange(T) >= 9, ids, torch.full_like(ids, -100))
    labels[~mask] = -100
    return VLMBatch(ids, labels, mask, (ids == IMAGE_ID).long(), torch.rand(B, 1, 8, 8, generator=g),
                    has_image, torch.arange(B))


def build(seed: int, score_type: str, **smoes_fields):
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    torch.manual_seed(seed)
    fields = dict(num_experts=4, k=2, ep_size=2, num_bins=2, score_type=score_type, binning="adaptive",
                  rebin_interval=2, rebin_freeze_step=100)
    smoes = SMoESConfig(**{**fields, **smoes_fields})
    model = TinyMoEVLM(ModelConfig(d_model=32, n_layers=2, n_heads=2, patch_size=4, vision_dim=32, max_len=32),
                       VOCAB, IMAGE_ID, smoes, expert_seed=seed, ep_rank=distributed.rank() % 2)
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()),
                                                                  "name": "all"})
    opt = torch.optim.AdamW(groups, lr=1e-2)
    register_step_updates(opt, model)  # the bins and Gaussian statistics change at each optimizer step
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
        "train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 0}, "steps_per_print": 10**9})
    return engine


def smoes_state(engine) -> dict:
    return {k: v.clone() for k, v in engine.module.state_dict().items()
            if ".binning." in k or ".scorer." in k or "deepspeed_experts" in k or "gate.wg" in k}


def forward(engine, batch):
    engine.module.eval()
    with torch.no_grad():
        out = engine(batch.input_ids_BT, batch.attention_mask_BT, batch.modality_BT, batch.image_BCHW,
                     batch.has_image_B).logits_BTV
    engine.module.train()
    return out


def main() -> None:
    args = parse_args(("--score-type", {"default": "gaussian"}), ("--steps", {"type": int, "default": 6}))
    init_distributed()
    rank = distributed.rank()
    engine = build(0, args.score_type)
    losses = []
    for step in range(args.steps):
        batch = synthetic_batch(1000 * rank + step)  # each rank sees its own data
        out = engine(batch.input_ids_BT, batch.attention_mask_BT, batch.modality_BT, batch.image_BCHW,
                     batch.has_image_B, batch.labels_BT)
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
    probe = synthetic_batch(424242 + rank)
    before = smoes_state(engine)
    logits_before = forward(engine, probe)
    ckpt = args.out / "ckpt"
    engine.save_checkpoint(str(ckpt), tag="t")

    fresh = build(7, args.score_type)  # different init: every compared tensor must come from the checkpoint
    fresh_state = smoes_state(fresh)
    differed = sorted(k for k in before if not torch.equal(before[k], fresh_state[k]))
    fresh.load_checkpoint(str(ckpt), tag="t")
    after = smoes_state(fresh)
    mismatched = sorted(k for k in before if not torch.equal(before[k], after[k]))
    logits_after = forward(fresh, probe)

    # buffers must be identical on both ranks (statistics are summed over the world before the EMA)
    buffers = {k: v.tolist() for k, v in before.items() if ".binning." in k or ".scorer." in k}
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, buffers)
    report = {
        "rank": rank, "losses": losses, "compared": sorted(before), "differed_before_load": differed,
        "mismatched_after_load": mismatched, "max_logit_diff": float((logits_before - logits_after).abs().max()),
        "buffers_equal_across_ranks": gathered[0] == gathered[1],
        "num_rebins": [int(v) for k, v in before.items() if k.endswith("num_rebins")],
        "bins": {k: v.tolist() for k, v in before.items() if k.endswith("bin_E")},
        "binning_steps": [int(v) for k, v in before.items() if k.endswith("binning.step")],
    }
    write_report(args.out, report)


if __name__ == "__main__":
    main()
