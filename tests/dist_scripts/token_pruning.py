"""Run under `deepspeed --num_gpus 2`: TinyMoEVLM with ep_size 2 (rank_once dispatch) and LearnPruner's stage 2 in
the decoder.  The ranks hold different batches (multimodal and language-only rows, other lengths), so their
packed lengths differ after the pruning point; the all-to-alls stay matched.  Per rank: the valid tokens each
MoE layer routed (before and after the pruning point) and the removed count, the remote bytes per layer, and
cached against cache-free generation.  Each rank writes OUT/rank{r}.json; tests/test_token_pruning.py asserts."""

import torch
from rank_report import parse_args, write_report

from ds_smoes.core.config import SMoESConfig
from ds_smoes.model import ModelConfig, TinyMoEVLM
from ds_smoes.compress import CompressConfig
from ds_smoes.moe.collector import RoutingCollector
from ds_smoes.parallel import distributed
from ds_smoes.parallel.launch import init_distributed

VOCAB, IMAGE_ID, PATCHES, NEW = 16, 15, 4, 5
# per rank: (prompt length incl. <bos> and the placeholders, image) of each row
PROMPTS = {0: ((8, 3, 11, 6), (True, False, True, False)), 1: ((5, 13, 7, 9), (True, True, True, False))}


def build(rank: int):
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    torch.manual_seed(0)
    smoes = SMoESConfig(num_experts=4, k=2, ep_size=2, num_bins=2, score_type="attention", dispatch="rank_once")
    cfg = ModelConfig(d_model=32, n_layers=4, n_heads=4, patch_size=4, vision_dim=16, vision_layers=1, max_len=40,
                      attn_impl="sdpa", compress=CompressConfig(method="learnpruner", keep_ratio=0.5,
                                                                stage1_keep_ratio=1.0))
    model = TinyMoEVLM(cfg, VOCAB, IMAGE_ID, smoes, expert_seed=0, ep_rank=rank)
    with torch.no_grad():   # as in the one-process tests: peaked attention, varied tokens
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


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)     # tiny tensors: two ranks on a 2-core machine, one thread each
    init_distributed()
    rank = distributed.rank()
    model, batch = build(rank), prompts(rank)
    routed = []
    hooks = [layer.register_forward_pre_hook(lambda m, a: routed.append(int(a[1].sum()))) for layer in model.moe_layers()]
    with torch.no_grad(), RoutingCollector(model.moe_layers()) as collector:
        out = model(*batch)
    for h in hooks:
        h.remove()
    removed = sum(PATCHES - model.cfg.compress.budget(PATCHES) for has_image in PROMPTS[rank][1] if has_image)
    report = {"rank": rank, "valid_tokens": int(batch[1].sum()), "removed": removed, "routed": routed,
              "packed_length": out.logits_BTV.shape[1], "input_length": batch[0].shape[1],
              "comm_tokens": [call.comm().num_tokens for call in collector.last()],
              "remote_bytes": [call.remote_bytes for call in collector.last()]}
    report["cached"] = model.generate(*batch, max_new_tokens=NEW, eos_id=-1, use_cache=True)
    report["free"] = model.generate(*batch, max_new_tokens=NEW, eos_id=-1, use_cache=False)
    write_report(args.out, report)


if __name__ == "__main__":
    main()
