"""Expert bins: fixed, adaptive, schedule and placement."""
import torch

from ds_smoes.core.binning import ExpertBinning, adaptive_bins, fixed_bins, rank_of_bin_placed_expert, text_bias


def test_fixed_bins():
    assert fixed_bins(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_text_bias_and_unloaded_expert():
    load = torch.tensor([[3.0, 0.0, 1.0], [1.0, 0.0, 3.0]])
    assert torch.allclose(text_bias(load), torch.tensor([0.75, 0.5, 0.25]))


def test_adaptive_bins_sort_by_text_bias():
    # text bias per expert: e0 0.1, e1 0.9, e2 0.5, e3 0.8 -> order e1, e3, e2, e0
    load = torch.tensor([[1.0, 9.0, 5.0, 8.0], [9.0, 1.0, 5.0, 2.0]])
    assert adaptive_bins(load, 2).tolist() == [1, 0, 1, 0]
    assert adaptive_bins(load, 4).tolist() == [3, 0, 2, 1]


def test_adaptive_bins_ties_keep_expert_order():
    assert adaptive_bins(torch.zeros(2, 4), 2).tolist() == [0, 0, 1, 1]


def test_bin_placement_on_ranks():
    bins = torch.tensor([3, 0, 2, 1, 0, 1, 2, 3])
    assert rank_of_bin_placed_expert(bins, num_bins=4, ep_size=2).tolist() == [1, 0, 1, 0, 0, 0, 1, 1]


def test_rebin_schedule_and_freeze():
    b = ExpertBinning(4, 2, adaptive=True, beta=0.5, rebin_interval=2, freeze_step=4)
    vision_heavy_first = torch.tensor([[0.0, 0.0, 5.0, 5.0], [5.0, 5.0, 0.0, 0.0]])
    b.observe(vision_heavy_first)
    assert not b.maybe_rebin()  # step 1: not due
    b.observe(vision_heavy_first)
    assert b.maybe_rebin()      # step 2: experts 2, 3 are text-biased -> bin 0
    assert b.bin_E.tolist() == [1, 1, 0, 0]
    assert int(b.num_rebins) == 1
    # EMA: after two observations with beta 0.5 the load is 0.75 of the observed one
    assert torch.allclose(b.load_ema_ME, 0.75 * vision_heavy_first)
    flipped = vision_heavy_first.flip(0)
    for _ in range(4):
        b.observe(flipped * 100)
        b.maybe_rebin()
    assert int(b.step) == 6 and b.frozen
    # step 4 re-cut (allowed), step 6 is past the freeze: the last cut stands
    assert b.bin_E.tolist() == [0, 0, 1, 1]


def test_fixed_binning_never_rebins():
    b = ExpertBinning(4, 2, adaptive=False, rebin_interval=1)
    b.observe(torch.tensor([[0.0, 0.0, 5.0, 5.0], [5.0, 5.0, 0.0, 0.0]]))
    assert not b.maybe_rebin() and b.bin_E.tolist() == [0, 0, 1, 1]


def test_binning_buffers_avoid_deepspeed_expert_key_filter():
    # DeepSpeed's MoE checkpointing treats any MoE state key containing "expert" as an expert weight.
    assert not any("expert" in k for k in ExpertBinning(4, 2, adaptive=True).state_dict())

