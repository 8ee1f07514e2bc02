"""Group-relative advantages (GRPO), values worked out by hand."""

from __future__ import annotations

import pytest
import torch

from calibrl.objectives.advantages import group_advantages

REWARDS = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])


def test_mean_baseline_hand_computed():
    adv = group_advantages(REWARDS, group_size=4, scale_by_std=False)
    # group 1: mean 1/4 -> [1-0.25, -0.25, -0.25, -0.25]; group 2: constant -> exact zeros
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0])
    assert torch.equal(adv, expected)  # all values are exact in binary floating point


def test_std_scaled_hand_computed():
    adv = group_advantages(REWARDS, group_size=4, scale_by_std=True)
    # group 1: deviations [0.75, -0.25, -0.25, -0.25]; unbiased var = (0.5625 + 3*0.0625)/3 = 0.25
    # -> std 0.5 -> [1.5, -0.5, -0.5, -0.5]. (The population std sqrt(0.1875) would give 1.732...)
    expected = torch.tensor([1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 0.0, 0.0])
    assert torch.allclose(adv, expected, rtol=0, atol=1e-6)


def test_group_size_two_std():
    # [0, 1]: mean 0.5, deviations -+0.5; unbiased var = (0.25+0.25)/1 = 0.5 -> std 0.7071...
    # -> advantages -+0.5/0.70711 = -+0.70711
    adv = group_advantages(torch.tensor([0.0, 1.0], dtype=torch.float64), 2, scale_by_std=True)
    assert torch.allclose(adv, torch.tensor([-(0.5**0.5), 0.5**0.5], dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale_by_std", [False, True])
@pytest.mark.parametrize(
    ("value", "group_size", "dtype"),
    [
        (0.1, 3, torch.float64),  # float64 mean of [0.1]*3 is off by ~1.4e-17
        (0.7, 3, torch.float64),  # off by ~1.1e-16
        (0.1, 7, torch.float32),  # float32 mean of [0.1]*7 is off by ~7.5e-9
        (0.41, 8, torch.float32),  # off by ~3e-8
        (-0.3, 4, torch.float32),
        (1e6, 2, torch.float32),
    ],
)
def test_identical_rewards_give_exact_zeros(scale_by_std, value, group_size, dtype):
    # r - mean(r) leaves floating-point residue for these constant groups (checked: the naive
    # difference is nonzero); the result must still be exactly 0, or std scaling with the floor
    # would blow the residue up into an update on a group that carries no signal.
    rewards = torch.full((2 * group_size,), value, dtype=dtype)
    adv = group_advantages(rewards, group_size=group_size, scale_by_std=scale_by_std)
    assert torch.equal(adv, torch.zeros(2 * group_size, dtype=dtype))


def test_constant_group_residue_exists_without_masking():
    # Guards the test above against becoming vacuous: the naive computation is not exactly zero.
    r = torch.full((3,), 0.1, dtype=torch.float64)
    assert (r - r.mean()).abs().max().item() > 0


def test_std_floor_bounds_the_divisor():
    # [0, 1e-6]: unbiased std = 1e-6/sqrt(2) ~ 7.07e-7 < floor 1e-4 -> divide by 1e-4:
    # deviations -+5e-7 -> -+5e-3
    rewards = torch.tensor([0.0, 1e-6], dtype=torch.float64)
    adv = group_advantages(rewards, 2, scale_by_std=True, std_floor=1e-4)
    assert torch.allclose(adv, torch.tensor([-5e-3, 5e-3], dtype=torch.float64), rtol=1e-9, atol=0)


def test_zero_sum_per_group_and_dtype_kept():
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(5 * 8, generator=g, dtype=torch.float64)
    for scale in (False, True):
        adv = group_advantages(rewards, 8, scale_by_std=scale)
        assert adv.dtype == torch.float64 and adv.shape == (40,)
        assert torch.allclose(adv.view(5, 8).sum(dim=1), torch.zeros(5, dtype=torch.float64), atol=1e-12)


def test_groups_are_contiguous_blocks():
    # [0, 1, 2, 3] with G=2 is groups {0,1} and {2,3} (not strided {0,2},{1,3}): [-0.5, 0.5, -0.5, 0.5]
    adv = group_advantages(torch.tensor([0.0, 1.0, 2.0, 3.0]), 2, scale_by_std=False)
    assert torch.equal(adv, torch.tensor([-0.5, 0.5, -0.5, 0.5]))


@pytest.mark.parametrize(
    ("rewards", "group_size", "kwargs", "match"),
    [
        (torch.zeros(4), 1, {}, "group_size"),
        (torch.zeros(4), 0, {}, "group_size"),
        (torch.zeros(5), 2, {}, "multiple"),
        (torch.tensor([0.0, float("nan"), 1.0, 1.0]), 2, {}, "finite"),
        (torch.tensor([0.0, float("inf"), 1.0, 1.0]), 2, {}, "finite"),
        (torch.zeros(2, 4), 4, {}, "1-D"),
        (torch.zeros(4), 2, {"std_floor": 0.0}, "std_floor"),
    ],
    ids=["G=1", "G=0", "not-multiple", "nan", "inf", "2-D", "std_floor=0"],
)
def test_errors(rewards, group_size, kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, group_size, scale_by_std=True, **kwargs)
