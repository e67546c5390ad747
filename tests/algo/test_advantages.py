import pytest
import torch

from graft.algo import group_advantages


def test_one_right_in_a_group_of_four():
    # mean 0.25; centred [.75, -.25, -.25, -.25]; unbiased std sqrt(0.75 / 3) = 0.5
    adv, zero = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=4, eps=0.0)
    assert torch.allclose(adv, torch.tensor([1.5, -0.5, -0.5, -0.5]))
    assert zero.tolist() == [False]


def test_eps_keeps_division_finite_and_slightly_shrinks():
    adv, _ = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=4, eps=1e-4)
    assert torch.allclose(adv, torch.tensor([0.75, -0.25, -0.25, -0.25]) / 0.5001)


def test_equal_rewards_give_zero_advantage_and_are_flagged():
    adv, zero = group_advantages(torch.tensor([1.0, 1.0, 0.3, 0.3, 0.0, 1.0]), group_size=2)
    assert adv[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert zero.tolist() == [True, True, False]
    # group [0, 1]: centred [-.5, .5], std sqrt(.5) -> -/+ 0.7071
    assert torch.allclose(adv[4:], torch.tensor([-0.70711, 0.70711]), atol=1e-4)


def test_batch_scaling_uses_the_std_of_all_rewards():
    # groups [1, 0] and [0, 0]; batch std of [1, 0, 0, 0] = 0.5
    adv, zero = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 2, "batch", eps=0.0)
    assert torch.allclose(adv, torch.tensor([1.0, -1.0, 0.0, 0.0]))
    assert zero.tolist() == [False, True]


def test_no_scaling_is_plain_centering():
    adv, _ = group_advantages(torch.tensor([3.0, 1.0, 2.0, 2.0, 0.5, 0.0]), 3, "none")
    # group means 2 and 0.8333
    assert torch.allclose(adv, torch.tensor([1.0, -1.0, 0.0, 1.16667, -0.33333, -0.83333]), atol=1e-5)


def test_advantages_sum_to_zero_per_group():
    rewards = torch.rand(24, generator=torch.Generator().manual_seed(0))
    for scale in ("group", "batch", "none"):
        adv, _ = group_advantages(rewards, 6, scale)
        assert torch.allclose(adv.view(4, 6).sum(1), torch.zeros(4), atol=1e-5)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.tensor([0.0, 1.0]), 2, "mean")  # type: ignore[arg-type]


def test_none_rewards_are_left_out_of_the_group_baseline():
    nan = float("nan")
    # group [1, 0, nan, 0]: mean of the three = 1/3; centred [2/3, -1/3, -, -1/3]; std sqrt((4/9+1/9+1/9)/2) = 0.57735
    adv, zero = group_advantages(torch.tensor([1.0, 0.0, nan, 0.0]), 4, eps=0.0)
    assert torch.allclose(adv, torch.tensor([2 / 3, -1 / 3, 0.0, -1 / 3]) / 0.57735, atol=1e-4)
    assert zero.tolist() == [False]


def test_groups_with_fewer_than_two_rewards_have_no_signal():
    nan = float("nan")
    adv, zero = group_advantages(torch.tensor([nan, 1.0, nan, nan, 1.0, 1.0]), 2)
    assert adv.tolist() == [0.0] * 6
    assert zero.tolist() == [True, True, True]


def test_batch_std_ignores_none_rewards():
    nan = float("nan")
    adv, _ = group_advantages(torch.tensor([1.0, 0.0, nan, 0.0, 0.0, 0.0]), 3, "batch", eps=0.0)
    # valid rewards [1, 0, 0, 0, 0]: std = sqrt(0.8 / 4) = 0.44721; group 1 mean 0.5 -> +-0.5
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, 0.0, 0.0, 0.0, 0.0]) / 0.44721, atol=1e-4)


def test_weighted_reinforce_by_hand():
    from graft.algo import weighted_reinforce_advantages

    # lambda = 0.1: right (1) -> +0.1, wrong (0) -> -1, half right (0.5) -> 0.05 - 0.5, NaN -> 0, and a
    # reward outside [0, 1] counts as its nearest end
    rewards = torch.tensor([1.0, 0.0, 0.5, float("nan"), 3.0, -2.0])
    expected = torch.tensor([0.1, -1.0, -0.45, 0.0, 0.1, -1.0])
    assert torch.allclose(weighted_reinforce_advantages(rewards, 0.1), expected)
    # a group that is all wrong still has a signal (GRPO's group advantage is 0 there)
    all_wrong = torch.zeros(4)
    assert (weighted_reinforce_advantages(all_wrong, 0.1) == -1).all()
    assert (group_advantages(all_wrong, 4)[0] == 0).all()
    assert torch.allclose(weighted_reinforce_advantages(torch.ones(2), 0.5), torch.tensor([0.5, 0.5]))
