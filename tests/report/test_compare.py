"""calibrl-compare: runs from run directories (and a fake W&B API), arms by config keys, final and
best tables worked out by hand, curve data, figures and the self-contained HTML report, errors."""

from __future__ import annotations

import csv
import json
import math
import re
import sys
import types

import numpy as np
import pytest
import wandb

import calibrl.report.compare as compare_module
from calibrl.eval.plots import Band, curves_grid, tradeoff_plot
from calibrl.report.compare import (
    compare,
    compare_best,
    eval_curves,
    group_runs,
    load_run,
    load_wandb_runs,
    main,
    to_markdown,
    train_curves,
    write_comparison,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(conf, correct, ok=True):
    return {"confidence": conf if ok else None, "correct": correct, "format_ok": ok}


# Prediction sets of two samples, with their metrics worked out by hand (10 uniform ECE bins).
# P_A: q 0.9 right and wrong: accuracy 0.5; one bin, ECE |0.5 - 0.9| = 0.4; Brier (0.01 + 0.81) / 2
#      = 0.41; AUROC 0.5 (a tie).
# P_B: 0.8 right, 0.2 wrong: accuracy 0.5; two bins, each gap 0.2 -> ECE 0.2; Brier 0.04; AUROC 1.
# P_C: 0.6 right twice: accuracy 1; ECE 0.4; Brier 0.16; AUROC undefined (one class).
# P_D: 0.5 right, then a format failure (wrong): accuracy 0.5, format rate 0.5; over the one
#      well-formed row ECE 0.5, Brier 0.25, AUROC undefined.
P_A = [_row(0.9, 1), _row(0.9, 0)]
P_B = [_row(0.8, 1), _row(0.2, 0)]
P_C = [_row(0.6, 1), _row(0.6, 1)]
P_D = [_row(0.5, 1), _row(None, 0, ok=False)]
NAN = math.nan
LOGGED = {  # what calibrl-train logs as eval/<dataset>/<metric> for each set (read from W&B)
    id(P_A): {"accuracy": 0.5, "format_rate": 1.0, "ece": 0.4, "brier": 0.41, "auroc": 0.5, "confidence_mean": 0.9},
    id(P_B): {"accuracy": 0.5, "format_rate": 1.0, "ece": 0.2, "brier": 0.04, "auroc": 1.0, "confidence_mean": 0.5},
    id(P_C): {"accuracy": 1.0, "format_rate": 1.0, "ece": 0.4, "brier": 0.16, "auroc": NAN, "confidence_mean": 0.6},
    id(P_D): {"accuracy": 0.5, "format_rate": 0.5, "ece": 0.5, "brier": 0.25, "auroc": NAN, "confidence_mean": 0.5},
}
# Eval points per run: sft (RL step 0), step2, final (after RL step 4).
EVALS = {
    ("a", 0): {"sft": P_A, "step2": P_B, "final": P_C},
    ("a", 1): {"sft": P_A, "step2": P_C, "final": P_B},
    ("b", 0): {"sft": P_D, "step2": P_A, "final": P_A},
    ("b", 1): {"sft": P_D, "step2": P_B, "final": P_A},
}
# train/accuracy per RL step 1..4; a1 logged NaN at step 4 (e.g. no well-formed rollout).
TRAIN_ACC = {("a", 0): [0.1, 0.2, 0.3, 0.4], ("a", 1): [0.3, 0.4, 0.5, NAN], ("b", 0): [0.5] * 4, ("b", 1): [0.7] * 4}


def _records(arm, seed, last_rl=4):
    """The metrics.jsonl records of run (arm, seed): SFT step 1 and its eval, RL steps at global
    steps 2..5 (train/rl_step 1..4), eval after RL step 2 and the final eval after RL step 4."""
    evals = EVALS[(arm, seed)]

    def ev(stage, step):
        return {"step": step} | {f"eval/ds/{k}": v for k, v in LOGGED[id(evals[stage])].items()} | {
            "eval/ds/slice/x/accuracy": 0.0}  # deeper keys are not metrics of the dataset

    out = [{"step": 1, "sft/loss": 1.0}, ev("sft", 1)]
    for rl in range(1, last_rl + 1):
        acc = TRAIN_ACC[(arm, seed)][rl - 1]
        out.append({"step": 1 + rl, "train/rl_step": rl, "train/accuracy": acc, "train/ece": 1 - acc, "train/brier": 0.25,
                    "train/auroc": 0.5, "train/confidence_mean": 0.5, "rewards/total/mean": acc})
        if rl == 2:
            out.append(ev("step2", 1 + rl))
    if last_rl == 4:
        out.append(ev("final", 5))
    return out


def _config(arm, seed, brier=0.5):
    return f"experiment_name: {arm}\nseed: {seed}\nreward:\n  weights:\n    brier: {brier}\n"


def _write_run(root, arm, seed, *, brier=0.5, finished=True, name=None, like=None):
    """Run directory of (arm, seed) with the records and predictions of run ``like`` (default: itself)."""
    like = like or (arm, seed)
    d = root / (name or f"{arm}{seed}")
    d.mkdir()
    (d / "config_resolved.yaml").write_text(_config(arm, seed, brier))
    records = _records(*like, 4 if finished else 3)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))  # NaN written as NaN
    for stage, rows in EVALS[like].items():
        if finished or stage != "final":
            (d / f"eval_{stage}.jsonl").write_text("".join(json.dumps(r | {"id": f"q{i}"}) + "\n" for i, r in enumerate(rows)))
    return d


@pytest.fixture
def dirs(tmp_path):
    return [_write_run(tmp_path, arm, seed) for arm, seed in EVALS]


@pytest.fixture
def arms(dirs):
    return group_runs([load_run(d) for d in dirs])


def test_runs_are_read_with_their_stages(arms):
    assert list(arms) == ["a", "b"] and [r.seed for r in arms["a"]] == [0, 1]
    a0 = arms["a"][0]
    assert a0.finished and a0.dataset == "ds"
    assert [(p.stage, p.rl_step) for p in a0.evals] == [("sft", 0), ("step2", 2), ("final", 4)]
    assert a0.point("step2").rows[0]["id"] == "q0"  # predictions attached to their stage
    assert a0.train["rl_step"].tolist() == [1, 2, 3, 4]


def test_final_table_by_hand(arms):
    a, b = compare(arms, n_resamples=200)
    assert a["seeds"] == "0 1"
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
    md = to_markdown([a, b])
    assert "| a | 0 1 | 0.750 ± 0.354 [" in md and "| b | 0 1 | 0.500 ± 0.000 [" in md


def test_other_stage_table(arms):
    # sft: a has P_A twice (accuracy 0.5); b has P_D twice (format rate 0.5, ECE 0.5).
    a, b = compare(arms, stage="sft", n_resamples=0)
    assert a["ece_mean"] == pytest.approx(0.4) and b["format_rate_mean"] == 0.5 and b["ece_mean"] == pytest.approx(0.5)


def test_best_table_by_hand(arms):
    a, b = compare_best(arms, n_resamples=200)
    assert set(a) >= {"accuracy_mean", "ece_at"} and "confidence_mean_mean" not in a
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
    with pytest.raises(ValueError, match="unknown curve metric"):
        train_curves(arms, "format_rate")


def test_cli_writes_tables_figures_and_report(dirs, tmp_path, capsys):
    out = tmp_path / "cmp"
    main([*map(str, dirs), "--out", str(out), "--n-bootstrap", "50"])
    assert "| arm | seeds | accuracy" in (out / "comparison.md").read_text()
    with (out / "comparison.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["arm"] for r in rows] == ["a", "b"] and float(rows[0]["ece_mean"]) == pytest.approx(0.3)
    with (out / "comparison_best.csv").open() as f:
        assert next(csv.DictReader(f))["ece_at"] == "step2 final"
    with (out / "runs.csv").open() as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 4 and runs[0]["evals"] == "sft step2 final" and float(runs[0]["best_brier"]) == pytest.approx(0.04)
    for png in ("curves.png", "tradeoff.png", "reliability_final.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3
    assert "0.750 ± 0.354 [" in html and "0.200 ± 0.000" in html  # final and best tables
    assert "<script" not in html and not re.search(r'(src|href)="(?!data:)', html)  # self-contained
    printed = capsys.readouterr().out
    assert "comparison_best.md" in printed and "report.html" in printed


def test_by_groups_a_sweep_with_one_experiment_name(tmp_path):
    # one experiment name, a sweep over reward.weights.brier: b's runs stand in for weight 1.0
    runs = [load_run(_write_run(tmp_path, arm, seed, brier=0.25 if arm == "a" else 1.0)) for arm, seed in EVALS]
    for r in runs:
        r.config.experiment_name = "sweep"
    arms = group_runs(runs, ["reward.weights.brier"])
    assert list(arms) == ["reward.weights.brier=0.25", "reward.weights.brier=1.0"]
    assert compare(arms, n_resamples=0)[0]["accuracy_mean"] == 0.75
    assert list(group_runs(runs, ["experiment_name", "reward.weights.brier"]))[0] == "experiment_name=sweep, reward.weights.brier=0.25"


def test_by_errors(tmp_path, capsys):
    runs = [load_run(_write_run(tmp_path, arm, seed)) for arm, seed in EVALS]
    for r in runs:
        r.config.experiment_name = "same"
    with pytest.raises(ValueError, match="arm 'same' has seed 0 twice"):
        group_runs(runs)
    with pytest.raises(ValueError, match=r"a0: config has no key 'reward.weights.kl'"):
        group_runs(runs, ["reward.weights.kl"])
    with pytest.raises(ValueError, match=r"a0: config key 'reward.weights' is a section, not a value"):
        group_runs(runs, ["reward.weights"])
    with pytest.raises(SystemExit) as err:
        main([str(tmp_path / "a0"), "--by", "objective.combine", "--out", str(tmp_path / "o")])
    assert err.value.code == 2 and "config has no key 'objective.combine'" in capsys.readouterr().err


def _eval_cli_dir(d):
    """What calibrl-eval writes: config and metrics too, but eval.json + predictions.jsonl."""
    d.mkdir()
    files = {"config_resolved.yaml": "seed: 0\n", "metrics.jsonl": "", "eval.json": "{}\n", "predictions.jsonl": ""}
    for name, text in files.items():
        (d / name).write_text(text)
    return d


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing", "not a directory"),
        (lambda d: d.mkdir() or d, "no config_resolved.yaml (not a calibrl-train run directory?)"),
        (lambda d: _write_run(d.parent, "a", 0, finished=False, name=d.name), "no final eval (no eval_final.jsonl"),
        (_eval_cli_dir, "a calibrl-eval output (eval.json), not a calibrl-train run directory"),
    ],
    ids=["not-a-dir", "not-a-run-dir", "unfinished", "calibrl-eval-output"],
)
def test_bad_input_is_a_clear_error(tmp_path, capsys, make, message):
    d = make(tmp_path / "r")
    with pytest.raises(SystemExit) as err:
        main([str(d), "--out", str(tmp_path / "o")])
    stderr = capsys.readouterr().err
    assert err.value.code == 2 and message in stderr and stderr.count("\n") == 1 and "Traceback" not in stderr


def test_torn_metrics_line_names_file_and_line(tmp_path):
    d = _write_run(tmp_path, "a", 0)
    with (d / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "train/acc')  # the 9th line, torn
    with pytest.raises(ValueError, match=r"metrics.jsonl:9: not a JSON line"):
        load_run(d)


def test_allow_partial_keeps_unfinished_runs_in_the_curves_only(dirs, tmp_path):
    # seed 2 of arm b, stopped after RL step 3 (no final eval), with the records of b1
    partial = _write_run(tmp_path, "b", 2, finished=False, like=("b", 1))
    out = tmp_path / "cmp"
    main([*map(str, dirs), str(partial), "--out", str(out), "--n-bootstrap", "0", "--allow-partial"])
    with (out / "comparison.csv").open() as f:
        assert [r["seeds"] for r in csv.DictReader(f)] == ["0 1", "0 1"]  # not in the tables
    assert "b2: no final eval (unfinished run): in the curves only" in (out / "report.html").read_text()
    arms = group_runs([load_run(d) for d in [*dirs, partial]])
    # in the curves: b's train/accuracy at steps 1-3 is the mean of 0.5, 0.7 and 0.7; step 4 of b0, b1
    np.testing.assert_allclose(train_curves(arms, "accuracy")["b"].mean, [1.9 / 3] * 3 + [0.6])
    assert train_curves(arms, "accuracy")["b"].n.tolist() == [3, 3, 3, 2]
    assert [p.stage for p in arms["b"][2].evals] == ["sft", "step2"]


class _FakeRun:
    def __init__(self, arm, seed, finished=True):
        self.id = f"{arm}{seed}"
        self.config = {"experiment_name": arm, "seed": seed, "trainer": {"sft": {"enabled": True}},
                       "eval": {"raw_model": False}, "_wandb": {"x": 1}}
        self.summary_metrics = {"final/accuracy": 0.5} if finished else {}
        self._records = _records(arm, seed, 4 if finished else 3)

    def scan_history(self):
        # W&B merges the records logged at one step into one row, under "_step"
        rows: dict[int, dict] = {}
        for rec in self._records:
            rows.setdefault(rec["step"], {"_step": rec["step"], "_runtime": 1.0}).update(
                {k: ("NaN" if isinstance(v, float) and math.isnan(v) else v) for k, v in rec.items() if k != "step"})
        return list(rows.values())


class _FakeApi:
    def __init__(self, runs):
        self._runs, self.calls = runs, []

    def runs(self, path, filters=None):
        self.calls.append((path, filters))
        return self._runs


def test_wandb_adapter_matches_local_runs(tmp_path):
    api = _FakeApi([_FakeRun(arm, seed) for arm, seed in EVALS])
    runs = load_wandb_runs("ent/proj", "g1", api=api)
    assert api.calls == [("ent/proj", {"group": "g1"})]
    a0 = runs[0]
    assert a0.name == "wandb:ent/proj/a0" and "_wandb" not in a0.config
    assert [(p.stage, p.rl_step, p.rows) for p in a0.evals] == [("sft", 0, None), ("step2", 2, None), ("final", 4, None)]
    arms = group_runs(runs)
    a, _ = compare(arms, n_resamples=50)
    # the logged scalars give the same numbers as the local predictions; no interval without them
    assert a["accuracy_mean"] == 0.75 and a["ece_mean"] == pytest.approx(0.3) and math.isnan(a["accuracy_ci_low"])
    assert compare_best(arms, n_resamples=0)[1]["brier_mean"] == pytest.approx(0.225)
    assert math.isnan(a["confidence_std_mean"])  # not logged
    np.testing.assert_allclose(train_curves(arms, "accuracy")["a"].mean, [0.2, 0.3, 0.4, 0.4])  # "NaN" string read
    written = write_comparison(arms, tmp_path / "w", n_resamples=0, source="W&B ent/proj, group g1")
    assert "reliability_final.png" not in written and "tradeoff.png" in written
    html = written["report.html"].read_text()
    assert "no per-sample predictions (not logged to W&amp;B)" in html and "0.750 ± 0.354</td>" in html


def test_wandb_unfinished_run_and_raw_stage(tmp_path):
    run = _FakeRun("a", 0, finished=False)
    run.config["eval"]["raw_model"] = True  # config says raw + sft, but only one eval before RL
    (r,) = load_wandb_runs("ent/proj", "g", api=_FakeApi([run]))
    assert not r.finished and [p.stage for p in r.evals] == ["step0", "step2"]


def test_wandb_without_network_or_key_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    def no_key(**_):
        raise wandb.errors.UsageError("No API key configured.\nUse `wandb login` to log in.")

    monkeypatch.setattr(wandb, "Api", no_key)
    with pytest.raises(SystemExit) as err:
        main(["--wandb", "ent/proj", "--group", "g", "--out", str(tmp_path)])
    stderr = capsys.readouterr().err
    assert err.value.code == 2 and stderr == (
        "calibrl-compare: W&B API unavailable for ent/proj (group 'g'): UsageError: No API key configured.\n")
    with pytest.raises(ValueError, match="ENTITY/PROJECT"):
        load_wandb_runs("proj", "g", api=_FakeApi([]))
    with pytest.raises(ValueError, match="no W&B runs in ent/proj with group 'g'"):
        load_wandb_runs("ent/proj", "g", api=_FakeApi([]))


def test_wandb_report_with_and_without_wandb_workspaces(monkeypatch, tmp_path, capsys):
    api = _FakeApi([_FakeRun(arm, seed) for arm, seed in EVALS])
    monkeypatch.setattr(wandb, "Api", lambda **_: api)
    monkeypatch.setattr(compare_module, "write_comparison", lambda *a, **kw: {})  # outputs: tested above
    argv = ["--wandb", "ent/proj", "--group", "g", "--out", str(tmp_path), "--n-bootstrap", "0", "--wandb-report"]
    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)  # not installed
    main(argv)
    assert "Group = g" in capsys.readouterr().out

    made = {}

    def record(kind):
        return lambda **kw: made.setdefault(kind, []).append(kw) or types.SimpleNamespace(
            save=lambda: None, url="https://wandb.example/report", **kw)

    wr = types.SimpleNamespace(Runset=record("runset"), LinePlot=record("plot"), PanelGrid=record("grid"), Report=record("report"))
    package = types.ModuleType("wandb_workspaces")
    package.reports = types.SimpleNamespace(v2=wr)
    monkeypatch.setitem(sys.modules, "wandb_workspaces", package)
    monkeypatch.setitem(sys.modules, "wandb_workspaces.reports", package.reports)
    monkeypatch.setitem(sys.modules, "wandb_workspaces.reports.v2", wr)
    main([*argv, "--by", "experiment_name"])
    assert "W&B report: https://wandb.example/report" in capsys.readouterr().out
    assert made["runset"][0]["filters"] == "Metric('group') == 'g'" and made["runset"][0]["groupby"] == ["config.experiment_name"]
    assert [p["y"] for p in made["plot"]] == [[f"train/{m}"] for m in ("accuracy", "ece", "brier", "auroc", "confidence_mean")]


def test_comparison_figures_refuse_bad_input_before_writing(tmp_path):
    path = tmp_path / "never" / "plot.png"
    band = Band(np.arange(3.0), np.zeros(3), np.zeros(3), np.zeros(3), np.ones(3, dtype=int))
    with pytest.raises(ValueError, match="at least one panel"):
        curves_grid({}, path)
    with pytest.raises(ValueError, match="n_cols"):
        curves_grid({"accuracy": {"a": band}}, path, n_cols=0)
    with pytest.raises(ValueError, match="at least one arm"):
        tradeoff_plot({}, path)
    with pytest.raises(ValueError, match="differ in length"):
        tradeoff_plot({"a": ([0.1, 0.2], [0.5], ["sft", "final"])}, path)
    with pytest.raises(ValueError, match="1-D of one length"):
        Band(np.arange(3.0), np.zeros(2), np.zeros(3), np.zeros(3), np.ones(3))
    assert not path.parent.exists()
