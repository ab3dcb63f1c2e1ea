"""Run under `deepspeed --num_gpus 2`: TinyMoEVLM with ep_size 2, greedy generation through the KV cache against
the cache-free generation, for both dispatches (deepspeed, rank_once).  The ranks hold different prompts, of
different lengths, so their prefills differ in size and their rows stop at different steps; both run
max_new_tokens forwards, so their MoE collectives stay matched.  Each rank writes OUT/rank{r}.json;
tests/test_generation_cache.py asserts on them."""

import torch
from rank_report import parse_args, write_report

from ds_smoes.core.config import SMoESConfig
from ds_smoes.model import ModelConfig, TinyMoEVLM
from ds_smoes.parallel import distributed
from ds_smoes.parallel.launch import init_distributed

VOCAB, IMAGE_ID, PATCHES, NEW = 16, 15, 4, 6
PROMPTS = {0: ((8, 3, 11, 6), (True, False, True, False)), 1: ((5, 13, 4, 9), (True, True, False, False))}


def build(dispatch: str, rank: int):
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    torch.manual_seed(0)
    smoes = SMoESConfig(num_experts=4, k=2, ep_size=2, num_bins=2, score_type="attention", dispatch=dispatch)
    cfg = ModelConfig(d_model=32, n_layers=4, n_heads=4, patch_size=4, vision_dim=16, vision_layers=1, max_len=40,
                      attn_impl="sdpa")
    model = TinyMoEVLM(cfg, VOCAB, IMAGE_ID, smoes, expert_seed=0, ep_rank=rank)
    with torch.no_grad():   # as in the one-process test: peaked attention, varied tokens
        for name, p in model.named_parameters():
            if p.dim() > 1 and "vision" not in name:
                p.mul_(3.0)
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "all"})
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(groups, lr=0.0), config={
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 0}, "steps_per_print": 10**9})
    return engine.module.eval()


def prompts(rank: int):
    lengths, images = PROMPTS[rank]
    g = torch.Generator().manual_seed(100 + rank)
    t = max(lengths)
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    valid = torch.zeros(len(lengths), t, dtype=torch.bool)
    for row, (n, has_image) in enumerate(zip(lengths, images)):
        text = torch.randint(3, IMAGE_ID, (n,), generator=g)
        if has_image:
            text[1:1 + PATCHES] = IMAGE_ID
        ids[row, t - n:], valid[row, t - n:] = text, True
    return ids, valid, (ids == IMAGE_ID).long(), torch.rand(len(lengths), 1, 8, 8, generator=g), torch.tensor(images)


def generate(model, batch, use_cache: bool):
    logits, moe_calls = [], []
    hooks = [model.lm_head.register_forward_hook(lambda m, a, out: logits.append(out[:, -1]))]
    hooks += [layer.register_forward_pre_hook(lambda m, a: moe_calls.append(1)) for layer in model.moe_layers()]
    tokens = model.generate(*batch, max_new_tokens=NEW, eos_id=-1, use_cache=use_cache)
    for h in hooks:
        h.remove()
    return tokens, logits, len(moe_calls)


def main() -> None:
    args = parse_args()
    init_distributed()
    rank = distributed.rank()
    batch = prompts(rank)
    report = {"rank": rank, "prompt_lengths": PROMPTS[rank][0]}
    for dispatch in ("deepspeed", "rank_once"):
        model = build(dispatch, rank)
        free, free_logits, free_calls = generate(model, batch, use_cache=False)
        cached, cached_logits, cached_calls = generate(model, batch, use_cache=True)
        report[dispatch] = {
            "free": free, "cached": cached, "moe_calls_free": free_calls, "moe_calls_cached": cached_calls,
            "expected_moe_calls": NEW * len(model.moe_layers()),
            "max_logit_diff": max(float((a - b).abs().max()) for a, b in zip(cached_logits, free_logits)),
            "distinct_rows": len({tuple(r) for r in cached}),
        }
    write_report(args.out, report)


if __name__ == "__main__":
    main()
