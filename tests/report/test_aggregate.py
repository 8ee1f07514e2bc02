"""Arms and their statistics: grouping by config keys, the final and best tables and the curve
bands worked out by hand from the runs of helpers.RUN_EVALS."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calibrl.report.aggregate import Band, compare, compare_best, eval_curves, group_runs, runs_table, train_curves
from calibrl.report.load import CompareError, load_run, load_wandb_runs
from helpers import RUN_EVALS, FakeWandbApi, FakeApiRun, write_run_dir


def test_final_table_by_hand(arms):
    a, b = compare(arms, n_resamples=200)
    assert (a["arm"], a["n_seeds"], a["seed_ids"]) == ("a", 2, "0 1")
    # a: final P_C and P_B: accuracy 1 and 0.5 -> mean 0.75, std (ddof=1) sqrt(2 * 0.25^2) = 0.3536;
    # ECE 0.4 and 0.2 -> 0.3 ± 0.1414; Brier 0.16 and 0.04 -> 0.1.
    assert a["accuracy_mean"] == 0.75 and a["accuracy_std"] == pytest.approx(math.sqrt(0.125))
    assert a["ece_mean"] == pytest.approx(0.3) and a["ece_std"] == pytest.approx(math.sqrt(0.02))
    assert a["brier_mean"] == pytest.approx(0.1)
    # AUROC of P_C is undefined: the mean over seeds is NaN, as for any metric a seed lacks.
    assert math.isnan(a["auroc_mean"])
    # b: P_A twice: 0.5 ± 0, ECE 0.4 ± 0
    assert b["accuracy_mean"] == 0.5 and b["accuracy_std"] == 0.0 and b["ece_mean"] == pytest.approx(0.4)
    # pooled a: 3 of 4 right; the interval brackets 0.75
    assert a["accuracy_ci_low"] <= 0.75 <= a["accuracy_ci_high"]


def test_one_seed_arm_counts_one_seed(arms):
    (a,) = compare({"a": arms["a"][:1]}, n_resamples=0)
    # a0 alone: one seed (id 0), no std; its final P_C has accuracy 1
    assert (a["n_seeds"], a["seed_ids"]) == (1, "0") and math.isnan(a["accuracy_std"]) and a["accuracy_mean"] == 1.0


def test_other_stage_table(arms):
    # sft: a has P_A twice (accuracy 0.5); b has P_D twice (format rate 0.5, ECE 0.5).
    a, b = compare(arms, stage="sft", n_resamples=0)
    assert a["ece_mean"] == pytest.approx(0.4) and b["format_rate_mean"] == 0.5 and b["ece_mean"] == pytest.approx(0.5)
    with pytest.raises(CompareError, match=r"a0: no 'step9' eval"):
        compare(arms, stage="step9")


def test_best_table_by_hand(arms):
    a, b = compare_best(arms, n_resamples=200)
    assert set(a) >= {"accuracy_mean", "ece_at", "n_seeds"} and "confidence_mean_mean" not in a
    # Only evals after RL started count (the sft point is every arm's starting point).
    # a0 over (step2 P_B, final P_C): max accuracy 1 (final), min ECE 0.2 (step2),
    # min Brier 0.04 (step2), max AUROC 1 (step2). a1 over (P_C, P_B): accuracy 1 (step2),
    # ECE 0.2, Brier 0.04, AUROC 1 (all final).
    assert a["accuracy_mean"] == 1.0 and a["accuracy_std"] == 0.0 and a["accuracy_at"] == "final step2"
    assert a["ece_mean"] == pytest.approx(0.2) and a["ece_at"] == "step2 final"
    assert a["brier_mean"] == pytest.approx(0.04) and a["auroc_mean"] == 1.0
    # format rate 1 everywhere: the tie goes to the earliest point
    assert a["format_rate_at"] == "step2 step2"
    # pooled samples at the best-accuracy points: P_C and P_C, all right -> interval [1, 1]
    assert (a["accuracy_ci_low"], a["accuracy_ci_high"]) == (1.0, 1.0)
    # b0 over (P_A, P_A): ECE 0.4, Brier 0.41, AUROC 0.5 (step2; the sft P_D's lower Brier 0.25
    # does not count). b1 over (P_B, P_A): ECE 0.2, Brier 0.04, AUROC 1 (step2).
    assert b["ece_mean"] == pytest.approx(0.3) and b["ece_std"] == pytest.approx(math.sqrt(0.02))
    assert b["brier_mean"] == pytest.approx(0.225) and b["brier_std"] == pytest.approx(0.37 / math.sqrt(2))
    assert b["auroc_mean"] == pytest.approx(0.75) and b["brier_at"] == "step2 step2"
    assert b["accuracy_at"] == "step2 step2"  # accuracy 0.5 at every point


def test_runs_table_by_hand(arms):
    rows = runs_table(arms)
    assert [(r["arm"], r["seed"]) for r in rows] == list(RUN_EVALS)
    a0 = rows[0]
    # a0: final P_C (accuracy 1, Brier 0.16); best Brier 0.04 at step2 (P_B)
    assert a0["evals"] == "sft step2 final" and a0["final_accuracy"] == 1.0
    assert a0["best_brier"] == pytest.approx(0.04) and a0["best_brier_at"] == "step2"


def test_curve_data_by_hand(arms):
    a = train_curves(arms, "accuracy")["a"]
    # seeds [0.1, 0.2, 0.3, 0.4] and [0.3, 0.4, 0.5, NaN]: step 4 has one seed
    assert a.x.tolist() == [1, 2, 3, 4] and a.n.tolist() == [2, 2, 2, 1]
    np.testing.assert_allclose(a.mean, [0.2, 0.3, 0.4, 0.4])
    np.testing.assert_allclose(a.low, [0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(a.high, [0.3, 0.4, 0.5, 0.4])
    np.testing.assert_allclose(train_curves(arms, "ece")["b"].mean, [0.4] * 4)  # 1 - (0.5 + 0.7) / 2
    band, stages = eval_curves(arms, "accuracy")["a"]
    # a0 (0.5, 0.5, 1), a1 (0.5, 1, 0.5) at RL steps 0, 2, 4
    assert band.x.tolist() == [0, 2, 4] and stages == ["sft", "step2", "final"]
    np.testing.assert_allclose(band.mean, [0.5, 0.75, 0.75])
    np.testing.assert_allclose(band.low, [0.5, 0.5, 0.5])
    np.testing.assert_allclose(band.high, [0.5, 1.0, 1.0])
    band, _ = eval_curves(arms, "auroc")["a"]  # a0 (0.5, 1, nan), a1 (0.5, nan, 1)
    np.testing.assert_allclose(band.mean, [0.5, 1.0, 1.0])
    assert band.n.tolist() == [2, 1, 1]
    with pytest.raises(ValueError, match="unknown curve metric 'format_rate'"):
        train_curves(arms, "format_rate")
    with pytest.raises(ValueError, match="unknown eval metric 'loss'"):
        eval_curves(arms, "loss")


def test_unfinished_run_counts_in_the_curves(run_dirs, tmp_path):
    # seed 2 of arm b, stopped after RL step 3 (no final eval), with the records of b1
    partial = write_run_dir(tmp_path, "b", 2, finished=False, like=("b", 1))
    arms = group_runs([load_run(d) for d in [*run_dirs, partial]])
    # b's train/accuracy at steps 1-3 is the mean of 0.5, 0.7 and 0.7; step 4 of b0, b1 only
    np.testing.assert_allclose(train_curves(arms, "accuracy")["b"].mean, [1.9 / 3] * 3 + [0.6])
    assert train_curves(arms, "accuracy")["b"].n.tolist() == [3, 3, 3, 2]


def test_by_groups_a_sweep_with_one_experiment_name(tmp_path):
    # one experiment name, a sweep over reward.weights.brier: b's runs stand in for weight 1.0
    runs = [load_run(write_run_dir(tmp_path, arm, seed, brier=0.25 if arm == "a" else 1.0)) for arm, seed in RUN_EVALS]
    for r in runs:
        r.config.experiment_name = "sweep"
    arms = group_runs(runs, ["reward.weights.brier"])
    assert list(arms) == ["reward.weights.brier=0.25", "reward.weights.brier=1.0"]
    assert compare(arms, n_resamples=0)[0]["accuracy_mean"] == 0.75
    assert list(group_runs(runs, ["experiment_name", "reward.weights.brier"]))[0] == "experiment_name=sweep, reward.weights.brier=0.25"


def test_by_errors(tmp_path):
    runs = [load_run(write_run_dir(tmp_path, arm, seed)) for arm, seed in RUN_EVALS]
    for r in runs:
        r.config.experiment_name = "same"
    with pytest.raises(CompareError, match="arm 'same' has seed 0 twice"):
        group_runs(runs)
    with pytest.raises(CompareError, match=r"a0: config has no key 'reward.weights.kl'"):
        group_runs(runs, ["reward.weights.kl"])
    with pytest.raises(CompareError, match=r"a0: config key 'reward.weights' is a section, not a value"):
        group_runs(runs, ["reward.weights"])


def test_wandb_runs_give_the_local_numbers_without_intervals():
    arms = group_runs(load_wandb_runs("ent/proj", "g1", api=FakeWandbApi([FakeApiRun(a, s) for a, s in RUN_EVALS])))
    a, _ = compare(arms, n_resamples=50)
    # the logged scalars give the same numbers as the local predictions; no interval without them
    assert a["accuracy_mean"] == 0.75 and a["ece_mean"] == pytest.approx(0.3) and math.isnan(a["accuracy_ci_low"])
    assert compare_best(arms, n_resamples=0)[1]["brier_mean"] == pytest.approx(0.225)
    assert math.isnan(a["confidence_std_mean"])  # not logged
    np.testing.assert_allclose(train_curves(arms, "accuracy")["a"].mean, [0.2, 0.3, 0.4, 0.4])


def test_band_refuses_ragged_arrays():
    with pytest.raises(ValueError, match="1-D of one length"):
        Band(np.arange(3.0), np.zeros(2), np.zeros(3), np.zeros(3), np.ones(3))
