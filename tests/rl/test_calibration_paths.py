"""The calibration paths in the trainer (calibrl.rl.calibration): what reaches which tokens."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from calibrl.objectives.calibration import expected_score
from calibrl.rl.calibration import check_calibration_settings
from calibrl.rl.confidence_grid import confidence_contexts
from helpers import EXAMPLES, compose_config, format_warm_up, make_trainer, text_rollout

def _scored(trainer, rollout):
    examples = EXAMPLES[:2]
    parsed, rewards = trainer.score(rollout, examples)
    return parsed, rewards, trainer.calibration.prepare(rollout, parsed, rewards, examples)


def test_contexts_are_the_well_formed_rows_up_to_the_tag(tiny, builder):
    model, tok = tiny
    rollout = text_rollout(tok, builder)
    trainer = make_trainer(copy.deepcopy(model), tok, builder)
    parsed, _ = trainer.score(rollout, EXAMPLES[:2])
    rows, ends = confidence_contexts(tok, rollout, parsed, trainer.prompts.fmt)
    assert rows.tolist() == [0, 2]  # row 1's confidence does not parse, row 3 has none
    for i, k in zip(rows.tolist(), ends.tolist()):
        assert tok.decode(rollout.completion_ids[i, :k]).endswith("<confidence>")


def test_expected_path_moves_confidence_tokens_off_the_grpo_advantage(tiny, builder):
    model, tok = tiny
    rollout = text_rollout(tok, builder)
    plain = make_trainer(copy.deepcopy(model), tok, builder)
    exp = make_trainer(copy.deepcopy(model), tok, builder, calibration="expected")
    parsed, rewards, cal = _scored(exp, rollout)
    a_exp = exp.advantages(rollout, parsed, rewards, cal)
    # By hand: rewards without brier: correctness + 0.5 format = [1.5, 0, 0.5, 0] (rows 1 and 3
    # fail the format: every component at its format-failure value, 0), group means 0.75 and 0.25
    # -> [0.75, -0.75, 0.25, -0.25] on every token, except the confidence tokens (from the context
    # end on) of rows 0 and 2.
    mask = rollout.completion_mask.bool()
    want = torch.tensor([0.75, -0.75, 0.25, -0.25])[:, None].expand_as(a_exp) * mask
    for i, k in zip(cal.rows.tolist(), cal.ends.tolist()):
        want[i, k:] = 0.0
    assert torch.allclose(a_exp, want)
    # the reward path keeps brier in the reward and its advantage on every token
    parsed, rewards, cal_r = _scored(plain, rollout)
    a_sum = plain.advantages(rollout, parsed, rewards, cal_r)
    assert (a_sum[0, mask[0]] != 0).all() and cal_r.score is None


def test_a_malformed_confidence_never_scores_better(tiny, builder):
    model, tok = tiny
    rollout = text_rollout(tok, builder)
    for path in ("expected", "branch"):
        trainer = make_trainer(copy.deepcopy(model), tok, builder, calibration=path, branches=3)
        torch.manual_seed(0)
        parsed, rewards, cal = _scored(trainer, rollout)
        trainer.update(rollout, trainer.advantages(rollout, parsed, rewards, cal), cal)  # expected: scores here
        worst = trainer.calibration.worst
        assert worst == -1.0  # brier weight 1
        assert cal.score[1] == worst and cal.score[3] == worst  # malformed / missing
        # (the random tiny model puts almost no mass on the grid and its branches rarely parse:
        # about the worst score, never below it)
        assert cal.score[0] >= worst and cal.score[2] >= worst
        # with the format reward, the total of a malformed row is below the well-formed one of its group
        total = rewards.components["correctness"] + 0.5 * rewards.components["format"] + cal.score
        assert total[1] < total[0]


def test_expected_score_matches_the_grid_distribution(tiny, builder):
    """The logged score and expected confidence are those of the model's own grid probabilities
    before the update (taken from the path's gradient forward)."""
    model, tok = tiny
    rollout = text_rollout(tok, builder)
    trainer = make_trainer(copy.deepcopy(model), tok, builder, calibration="expected")
    parsed, rewards, cal = _scored(trainer, rollout)
    assert np.isnan(cal.expected_confidence).all()  # not read in prepare under `expected`
    probs = trainer.calibration._grid_probs(trainer.policy, None, rollout, cal.rows, cal.ends, grad=False).double()
    raw = trainer.calibration._grid_probs(trainer.policy, None, rollout, cal.rows, cal.ends, grad=False,
                                        normalise=False).double()
    assert (raw.sum(dim=1) < 1).all() and torch.allclose(raw / raw.sum(dim=1, keepdim=True), probs, atol=1e-6)
    trainer.update(rollout, trainer.advantages(rollout, parsed, rewards, cal), cal)
    values = trainer.calibration.grid.values
    assert np.allclose(cal.expected_confidence[cal.rows.numpy()], (probs @ values).numpy(), atol=1e-6)
    # targets: row 0 right (1), row 2 wrong (0); the score is that of the model's own (sub-normalised)
    # grid probabilities, the mass off the grid at Brier's worst value -1
    assert cal.target.tolist() == [1.0, 0.0]
    want = expected_score(raw, values, torch.tensor([1.0, 0.0], dtype=torch.float64), {"brier": 1.0})
    assert np.allclose(cal.score[[0, 2]], want.numpy(), atol=1e-6)


def test_expected_path_raises_its_own_expected_score(tiny, builder):
    """Updates on the same rollout (lr 1e-3, GRPO advantages zeroed) raise the expected Brier
    score of the contexts step after step: the path's own loss reaches the confidence
    probabilities, in the right direction."""
    model, tok = tiny
    rollout = text_rollout(tok, builder)
    trainer = make_trainer(format_warm_up(model, rollout), tok, builder, calibration="expected")
    scores = []
    for _ in range(4):
        parsed, rewards, cal = _scored(trainer, rollout)
        # zero GRPO advantages: only the calibration path's loss moves the policy
        adv = torch.zeros_like(trainer.advantages(rollout, parsed, rewards, cal))
        out = trainer.update(rollout, adv, cal)
        assert np.isfinite(out["calibration_loss"]) and out["grad_norm"] > 0
        scores.append(cal.score[[0, 2]].mean())  # before this update
    assert scores[0] > -1 + 1e-3  # the warm-up put some mass on the grid (~0.25%)
    assert scores[-1] > scores[0]
    assert all(b > a for a, b in zip(scores, scores[1:]))


def _update_grads(trainer, rollout):
    """The gradient of one update of ``trainer`` on ``rollout`` (the engine's step records it
    instead of stepping) and the update's results."""
    grads = {}

    def record():
        grads.update({n: p.grad.clone() for n, p in trainer.policy.named_parameters() if p.grad is not None})
        trainer.engine.zero_grad()
        return 1.0

    trainer.engine.step = record
    parsed, rewards, cal = _scored(trainer, rollout)
    out = trainer.update(rollout, trainer.advantages(rollout, parsed, rewards, cal), cal)
    return grads, out, cal


@pytest.mark.parametrize("micro_batch_size, bf16, tol, extra", [
    (4, False, 1e-5, {}), (1, False, 1e-5, {}), (4, True, 2e-2, {}), (2, False, 1e-5, {"ppo_epochs": 2}),
    (4, False, 1e-5, {"lora": True}),
])
def test_expected_loss_on_the_policy_forward_equals_its_own_forwards(tiny, builder, micro_batch_size, bf16, tol,
                                                                     extra):
    """The expected path's loss computed on the KV cache of the micro-batch's policy forward (one
    backward) and by its own context forwards (the gradient-checkpointing fallback) give the same
    loss, readout and gradient (under bf16 autocast: up to bf16 rounding), also over two PPO
    epochs (the gradient of the last) and on a LoRA policy (its adapters made non-zero)."""
    model, tok = tiny
    rollout = text_rollout(tok, builder)
    warm = format_warm_up(model, rollout)
    extra = dict(extra)
    if extra.pop("lora", False):
        from calibrl.config import LoraConfig
        from calibrl.lora import apply_lora

        warm = apply_lora(warm, LoraConfig(enabled=True, r=4))
        with torch.no_grad():
            for name, p in warm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    kw = dict(calibration="expected", micro_batch_size=micro_batch_size, bf16=bf16, **extra)
    fused = make_trainer(copy.deepcopy(warm), tok, builder, **kw)
    apart = make_trainer(copy.deepcopy(warm), tok, builder, **kw)
    apart.calibration.fuses_forward = False
    calls = []
    apart.calibration.loss_on_forward = lambda *a: calls.append(a)  # never called when not fused
    g1, out1, cal1 = _update_grads(fused, rollout)
    g2, out2, cal2 = _update_grads(apart, rollout)
    assert not calls and out1["calibration_loss"] != 0
    assert out1["calibration_loss"] == pytest.approx(out2["calibration_loss"], rel=tol)
    assert out1["loss"] == pytest.approx(out2["loss"], rel=tol, abs=1e-7)
    assert np.allclose(cal1.expected_confidence, cal2.expected_confidence, atol=tol / 10, equal_nan=True)
    assert np.allclose(cal1.score, cal2.score, atol=tol / 10)
    assert g1.keys() == g2.keys() and g1
    for name in g1:
        scale = float(g2[name].abs().max())
        assert torch.allclose(g1[name], g2[name], atol=tol * max(scale, 1.0)), name


def test_branch_path_samples_k_confidences_and_baselines_them(tiny, builder):
    model, tok = tiny
    rollout = text_rollout(tok, builder)
    trainer = make_trainer(copy.deepcopy(model), tok, builder, calibration="branch", branches=3)
    torch.manual_seed(0)
    parsed, rewards, cal = _scored(trainer, rollout)
    assert len(cal.branch) == 2 * 3 and cal.branch.group_index.tolist() == [0, 0, 0, 1, 1, 1]
    # leave-one-out advantages sum to 0 within each context
    assert torch.allclose(cal.branch_adv.view(2, 3).sum(dim=1), torch.zeros(2), atol=1e-6)
    out = trainer.update(rollout, trainer.advantages(rollout, parsed, rewards, cal), cal)
    assert np.isfinite(out["loss"])


def test_training_logs_the_expected_confidence(tiny, builder):
    model, tok = tiny
    trainer = make_trainer(copy.deepcopy(model), tok, builder, calibration="expected")
    metrics = trainer.step()
    for key in ("confidence_mean", "ece", "auroc", "brier", "coverage"):
        assert f"train/expected_confidence/{key}" in metrics
    assert "train/calibration_score" in metrics


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["objective.calibration=nope"], "calibration path 'nope'.*branch.*expected.*reward"),
        (["objective.calibration=expected", "objective.target=nope"], "calibration target 'nope'"),
        (["objective.calibration=expected", "objective.gamma=1.5"], r"gamma must be in \[0, 1\]"),
        (["objective.calibration=expected", "objective.gamma=-0.1"], r"gamma must be in \[0, 1\]"),
        (["objective.calibration=branch", "objective.branches=1"], "branches must be >= 2"),
        (["objective.calibration=expected", "objective.grid_step=0.03"], "does not divide 1"),
        (["objective.calibration=expected", "objective.grid_step=0.125"], "2 decimals"),
        (["objective.calibration=expected", "objective.grid_step=0.1"], "does not match the confidence grid"),
        (["objective.calibration=expected", "reward=rlvr"], "needs a scoring rule"),
        (["objective.calibration=branch", "deepspeed=zero2"], "branch is not supported under DeepSpeed"),
        (["objective.calibration=expected", "deepspeed=zero2", "trainer.gradient_checkpointing=true"],
         "gradient_checkpointing is not supported under DeepSpeed"),
        (["objective.calibration=branch", "algo.ppo_epochs=2"], "ppo_epochs=1"),
        (["objective.target=group_accuracy"], "apply to objective.calibration=expected"),
    ],
)
def test_bad_settings_are_refused(overrides, message):
    cfg = compose_config(["model=tiny", "debug=default", *overrides])
    with pytest.raises((KeyError, ValueError), match=message):
        check_calibration_settings(cfg)


def test_good_settings_pass():
    for o in (["objective.calibration=expected", "objective.target=group_accuracy", "objective.gamma=0.5"],
              ["objective.calibration=branch", "objective.branches=2"],
              ["objective.calibration=expected", "objective.grid_step=0.05"],
              ["objective.calibration=expected", "deepspeed=zero3"],
              ["objective.calibration=expected", "objective.grid_step=0.1", "trainer.sft.enabled=false"]):
        check_calibration_settings(compose_config(["model=tiny", "debug=default", *o]))
