"""Run under `deepspeed --num_gpus 2`: a SMoES layer (gaussian score, adaptive bins, rank_once, ep_size 2)
trained a few steps through a DeepSpeed engine, plainly and under DeepSpeed's activation checkpointing
(`deepspeed.checkpointing.checkpoint`, which recomputes the forward inside the backward), each rank with its
own data.  The step updates are applied by the engine's optimizer step (`register_step_updates`).
Each rank writes OUT/rank{r}.json: the buffers of both runs and how many steps they saw; tests/test_step_updates.py
compares them (equal between the runs, equal across ranks: the updates are summed over the world)."""
import deepspeed
import torch
from rank_report import parse_args, write_report
from torch import nn

from ds_smoes.core.config import SMoESConfig
from ds_smoes.moe.layer import SMoESMoE
from ds_smoes.moe.updates import register_step_updates
from ds_smoes.parallel import distributed
from ds_smoes.parallel.launch import init_distributed

D, E, B, T, STEPS = 8, 4, 2, 6, 6


def train(checkpointed: bool) -> dict:
    torch.manual_seed(0)
    cfg = SMoESConfig(num_experts=E, k=2, ep_size=2, num_bins=2, score_type="gaussian", binning="adaptive",
                      rebin_interval=2, rebin_freeze_step=4, dispatch="rank_once")
    layer = SMoESMoE(D, nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D)), cfg)
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    opt = torch.optim.AdamW(split_params_into_different_moe_groups_for_optimizer(
        {"params": list(layer.parameters()), "name": "all"}), lr=1e-2)
    register_step_updates(opt, layer)
    engine, *_ = deepspeed.initialize(model=layer, optimizer=opt, config={
        "train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9})
    g = torch.Generator().manual_seed(10 + distributed.rank())
    labels_BT = torch.tensor([[1] * 4 + [0] * (T - 4)] * B)
    for _ in range(STEPS):
        x_BTD = (torch.randn(B, T, D, generator=g) + 2.0 * labels_BT.unsqueeze(-1)).requires_grad_(True)
        if checkpointed:
            out, l_aux = deepspeed.checkpointing.checkpoint(lambda x: engine(x, modality_labels=labels_BT)[:2],
                                                            x_BTD)
        else:
            out, l_aux, _ = engine(x_BTD, modality_labels=labels_BT)
        engine.backward(out.pow(2).mean() + l_aux)
        engine.step()
    state = {k: v.tolist() for k, v in layer.state_dict().items() if "binning" in k or "scorer" in k}
    return state


def main() -> None:
    args = parse_args()
    init_distributed()
    deepspeed.checkpointing.configure(None, partition_activations=False, checkpoint_in_cpu=False,
                                      contiguous_checkpointing=False, synchronize=False, profile=False)
    write_report(args.out, {"plain": train(False), "checkpointed": train(True)})


if __name__ == "__main__":
    main()
