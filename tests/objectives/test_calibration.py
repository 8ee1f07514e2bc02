"""The calibration objectives' math (calibrl.objectives.calibration), against values worked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibrl.objectives.calibration import TARGETS, calibration_target, expected_score, loo_advantages

GRID3 = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
P3 = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64)


@pytest.mark.parametrize(
    "target, expected",
    [
        # S(v, 1) = -(v - 1)^2 = [-1, -.25, 0]: .2 * -1 + .5 * -.25 + .3 * 0 = -.325
        (1.0, -0.325),
        # S(v, 0) = -v^2 = [0, -.25, -1]: .5 * -.25 + .3 * -1 = -.425
        (0.0, -0.425),
        # linear in t: .4 * -.325 + .6 * -.425 = -.385
        (0.4, -0.385),
    ],
)
def test_expected_brier_on_a_three_value_grid(target, expected):
    got = expected_score(P3, GRID3, torch.tensor([target], dtype=torch.float64), {"brier": 1.0})
    assert got.item() == pytest.approx(expected, abs=1e-12)


def test_off_grid_mass_scores_the_worst_value():
    # p = [.2, .5, .2] on the grid, .1 off it; t = 1: .2 * -1 + .5 * -.25 + .2 * 0 + .1 * -1 = -.425
    p = torch.tensor([[0.2, 0.5, 0.2]], dtype=torch.float64)
    t = torch.tensor([1.0], dtype=torch.float64)
    assert expected_score(p, GRID3, t, {"brier": 1.0}).item() == pytest.approx(-0.425, abs=1e-12)
    # moving mass from any grid value off the grid never raises the score (low is the minimum)
    for rule in ("brier", "log", "spherical"):
        for tt in (0.0, 0.3, 1.0):
            full = expected_score(P3, GRID3, torch.tensor([tt], dtype=torch.float64), {rule: 1.0}).item()
            for j in range(3):
                q = P3.clone()
                q[0, j] -= 0.1
                less = expected_score(q, GRID3, torch.tensor([tt], dtype=torch.float64), {rule: 1.0}).item()
                assert less <= full + 1e-12
    with pytest.raises(ValueError, match="at most 1"):
        expected_score(torch.tensor([[0.6, 0.6, 0.0]], dtype=torch.float64), GRID3, t, {"brier": 1.0})


def test_expected_score_gradient_written_out():
    # loss = -E, p = softmax(z); dE/dz_j = p_j (a_j - E) with a = S(v, 1) = [-1, -.25, 0], E = -.325:
    # dE/dz = [.2 * -.675, .5 * .075, .3 * .325] = [-.135, .0375, .0975]; d loss/dz is its negative.
    z = torch.log(P3).clone().requires_grad_(True)
    loss = -expected_score(torch.softmax(z, dim=1), GRID3, torch.tensor([1.0], dtype=torch.float64), {"brier": 1.0})
    loss.sum().backward()
    assert z.grad[0].tolist() == pytest.approx([0.135, -0.0375, -0.0975], abs=1e-12)


def test_weights_add_rules():
    # brier weight 2: 2 * -.325; + log weight 1: .2 log(1e-4) + .5 log(.5) + .3 log(1 - 1e-4)
    t = torch.tensor([1.0], dtype=torch.float64)
    log_part = 0.2 * np.log(1e-4) + 0.5 * np.log(0.5) + 0.3 * np.log(1 - 1e-4)
    got = expected_score(P3, GRID3, t, {"brier": 2.0, "log": 1.0}).item()
    assert got == pytest.approx(2 * -0.325 + log_part, abs=1e-9)


@pytest.mark.parametrize("rule", ["brier", "log", "spherical"])
@pytest.mark.parametrize("t", [0.0, 0.1, 0.37, 0.5, 0.62, 0.9, 1.0])
def test_properness_the_minimiser_puts_its_mass_on_the_best_grid_value(rule, t):
    """Minimising -E over distributions on the grid (by gradient descent on logits) ends with the
    mass on the grid value that maximises t S(v, 1) + (1 - t) S(v, 0); for Brier that is the value
    nearest t (0.37 -> 0.25 on a 0.25 grid: |0.37 - 0.25| = .12 < .13)."""
    grid = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    target = torch.tensor([t], dtype=torch.float64)
    z = torch.zeros(1, 5, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([z], lr=20.0)
    for _ in range(600):
        opt.zero_grad()
        (-expected_score(torch.softmax(z, dim=1), grid, target, {rule: 1.0})).sum().backward()
        opt.step()
    p = torch.softmax(z, dim=1)[0]
    if rule == "brier":
        best = int(torch.argmin((grid - t).abs()))
        assert grid[best].item() == {0.0: 0.0, 0.1: 0.0, 0.37: 0.25, 0.5: 0.5, 0.62: 0.5, 0.9: 1.0, 1.0: 1.0}[t]
    else:
        from calibrl.objectives.calibration import grid_scores

        s1, s0 = grid_scores(rule, grid)
        best = int(torch.argmax(t * s1 + (1 - t) * s0))
        # a proper rule's best grid value is a neighbour of t
        assert abs(grid[best].item() - t) <= 0.25
    assert p[best].item() > 0.95


def test_expected_score_refuses_bad_input():
    t = torch.tensor([0.5], dtype=torch.float64)
    with pytest.raises(ValueError, match="target"):
        expected_score(P3, GRID3, torch.tensor([1.5], dtype=torch.float64), {"brier": 1.0})
    with pytest.raises(ValueError, match="at least one"):
        expected_score(P3, GRID3, t, {})
    with pytest.raises(ValueError, match="negative"):
        expected_score(P3, GRID3, t, {"brier": -1.0})
    with pytest.raises(ValueError, match=r"probs \[M, V\]"):
        expected_score(P3, GRID3[:2], t, {"brier": 1.0})
    with pytest.raises(KeyError, match="brier"):
        expected_score(P3, GRID3, t, {"nope": 1.0})


def test_loo_advantages_by_hand():
    # [1, 2, 3]: 1 - 2.5, 2 - 2, 3 - 1.5
    assert loo_advantages(torch.tensor([[1.0, 2.0, 3.0]])).tolist() == [[-1.5, 0.0, 1.5]]
    # K = 2: s0 - s1, s1 - s0; equal scores give 0
    assert loo_advantages(torch.tensor([[0.0, -1.0], [0.3, 0.3]])).tolist() == [[1.0, -1.0], [0.0, 0.0]]
    with pytest.raises(ValueError, match="K >= 2"):
        loo_advantages(torch.tensor([[1.0]]))


CORRECT = np.array([1, 0, 0, 1, 1, 1], dtype=bool)
GROUPS = np.array([0, 0, 0, 1, 1, 1])
ANSWERS = ["5", " 5", "6", "7", None, "7"]


def test_targets_by_hand():
    # group 0: 1 of 3 right; group 1: 3 of 3
    assert calibration_target("group_accuracy", 0.0, CORRECT, GROUPS, ANSWERS).tolist() == pytest.approx(
        [1 / 3, 1 / 3, 1 / 3, 1, 1, 1])
    # "5" agrees with " 5" (normalised), not "6": 1/2; "6": 0/2; "7" with the other "7": 1/2; None: 0
    assert calibration_target("loo_agreement", 0.0, CORRECT, GROUPS, ANSWERS).tolist() == [0.5, 0.5, 0.0, 0.5, 0.0, 0.5]
    ap = np.array([0.9, 0.2, np.nan, 1.0, 0.5, 0.4])
    assert calibration_target("answer_prob", 0.0, CORRECT, GROUPS, ANSWERS, ap).tolist() == [0.9, 0.2, 0.0, 1.0, 0.5, 0.4]
    assert calibration_target("correct", 0.0, CORRECT, GROUPS, ANSWERS).tolist() == [1, 0, 0, 1, 1, 1]
    # the mix: .25 * correct + .75 * group accuracy
    assert calibration_target("group_accuracy", 0.25, CORRECT, GROUPS, ANSWERS).tolist() == pytest.approx(
        [0.25 + 0.25, 0.25, 0.25, 1, 1, 1])


def test_target_errors():
    with pytest.raises(KeyError, match="answer_prob.*correct.*group_accuracy.*loo_agreement|correct"):
        calibration_target("nope", 1.0, CORRECT, GROUPS, ANSWERS)
    for gamma in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\]"):
            calibration_target("correct", gamma, CORRECT, GROUPS, ANSWERS)
    with pytest.raises(ValueError, match="needs answer-token probabilities"):
        calibration_target("answer_prob", 0.5, CORRECT, GROUPS, ANSWERS)
    with pytest.raises(ValueError, match="same length"):
        calibration_target("correct", 1.0, CORRECT[:3], GROUPS, ANSWERS)


def test_only_correctness_is_declared_proper():
    assert {n for n in TARGETS.names() if TARGETS.get(n).proper} == {"correct"}
