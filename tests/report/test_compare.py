"""The calibrl-compare command line: what it writes and prints, its one-line errors with exit
code 2, --allow-partial, and the W&B source and report."""

from __future__ import annotations

import sys
import types

import pytest
import wandb

import calibrl.report.compare as compare_cli
from calibrl.report.compare import main
from helpers import RUN_EVALS, FakeWandbApi, FakeApiRun, write_run_dir


def test_cli_writes_and_prints_the_tables(run_dirs, tmp_path, capsys):
    out = tmp_path / "cmp"
    main([*map(str, run_dirs), "--out", str(out), "--n-bootstrap", "50"])
    printed = capsys.readouterr().out
    table = (out / "comparison.md").read_text()
    assert table.startswith("| arm | n_seeds | seed_ids | accuracy |") and "| a | 2 | 0 1 | 0.750 ± 0.354 [" in table
    assert printed.startswith(f"final eval:\n{table}\n")
    assert f"best eval:\n{(out / 'comparison_best.md').read_text()}" in printed
    written = printed.splitlines()[-1].removeprefix("written: ").split(", ")
    assert {p.rsplit("/", 1)[1] for p in written} == {
        "comparison.md", "comparison.csv", "comparison_best.md", "comparison_best.csv", "runs.csv", "curves.png",
        "tradeoff.png", "reliability_final.png", "report.html"}
    assert all((out / p.rsplit("/", 1)[1]).is_file() for p in written)


def test_by_key_missing_is_exit_2(tmp_path, capsys):
    d = write_run_dir(tmp_path, "a", 0)
    with pytest.raises(SystemExit) as err:
        main([str(d), "--by", "objective.combine", "--out", str(tmp_path / "o")])
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
        (lambda d: write_run_dir(d.parent, "a", 0, finished=False, name=d.name), "no final eval (no eval_final.jsonl"),
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
    assert stderr.startswith("calibrl-compare: ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give run directories, or --wandb ENTITY/PROJECT --group G (not both)"),
        (["--wandb", "e/p"], "--wandb needs --group"),
        (["r", "--wandb-report"], "--wandb-report needs --wandb"),
    ],
)
def test_wrong_options_are_argparse_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_allow_partial_keeps_unfinished_runs_out_of_the_tables(run_dirs, tmp_path):
    # seed 2 of arm b, stopped after RL step 3 (no final eval), with the records of b1
    partial = write_run_dir(tmp_path, "b", 2, finished=False, like=("b", 1))
    out = tmp_path / "cmp"
    main([*map(str, run_dirs), str(partial), "--out", str(out), "--n-bootstrap", "0", "--allow-partial"])
    assert "| b | 2 | 0 1 |" in (out / "comparison.md").read_text()  # not in the tables
    assert "b2: no final eval (unfinished run): in the curves only" in (out / "report.html").read_text()


def test_wandb_without_network_or_key_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    def no_key(**_):
        raise wandb.errors.UsageError("No API key configured.\nUse `wandb login` to log in.")

    monkeypatch.setattr(wandb, "Api", no_key)
    with pytest.raises(SystemExit) as err:
        main(["--wandb", "ent/proj", "--group", "g", "--out", str(tmp_path)])
    stderr = capsys.readouterr().err
    assert err.value.code == 2 and stderr == (
        "calibrl-compare: W&B API unavailable for ent/proj (group 'g'): UsageError: No API key configured.\n")


def test_wandb_report_with_and_without_wandb_workspaces(monkeypatch, tmp_path, capsys):
    api = FakeWandbApi([FakeApiRun(arm, seed) for arm, seed in RUN_EVALS])
    monkeypatch.setattr(wandb, "Api", lambda **_: api)
    monkeypatch.setattr(compare_cli, "write_comparison", lambda *a, **kw: {})  # outputs: tested in test_render
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


def test_wandb_report_refused_is_exit_2(monkeypatch, tmp_path, capsys):
    api = FakeWandbApi([FakeApiRun(arm, seed) for arm, seed in RUN_EVALS])
    monkeypatch.setattr(wandb, "Api", lambda **_: api)
    monkeypatch.setattr(compare_cli, "write_comparison", lambda *a, **kw: {})

    def refuse(*_):
        raise wandb.errors.CommError("permission denied\nmore")

    monkeypatch.setattr(compare_cli, "wandb_report", refuse)
    with pytest.raises(SystemExit) as err:
        main(["--wandb", "ent/proj", "--group", "g", "--out", str(tmp_path), "--wandb-report"])
    assert err.value.code == 2
    assert capsys.readouterr().err == "calibrl-compare: W&B report not created: CommError: permission denied\n"
