"""Rendering the comparison: Markdown/CSV tables, the files written and the self-contained HTML
report, from the runs of helpers.RUN_EVALS."""

from __future__ import annotations

import csv
import re

import pytest

from calibrl.report.aggregate import compare, group_runs
from calibrl.report.load import load_run, load_wandb_runs
from calibrl.report.render import table_text, to_markdown, write_comparison
from helpers import RUN_EVALS, FakeWandbApi, FakeApiRun, write_run_dir

FILES = {"comparison.md", "comparison.csv", "comparison_best.md", "comparison_best.csv", "runs.csv", "curves.png",
         "tradeoff.png", "reliability_final.png", "report.html"}


def _csv(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def test_markdown_cells(arms):
    md = to_markdown(compare(arms, n_resamples=200))
    lines = md.splitlines()
    assert lines[0] == ("| arm | n_seeds | seed_ids | accuracy | format_rate | ece | brier | auroc | confidence_mean "
                        "| confidence_std |")
    # a: accuracy 0.75 ± 0.354 then its interval; b: 0.5 ± 0; AUROC of a is NaN over seeds (P_C has
    # one class), but the pooled samples of P_C and P_B (0.8, 0.6, 0.6 right; 0.2 wrong) rank perfectly
    assert lines[2].startswith("| a | 2 | 0 1 | 0.750 ± 0.354 [")
    assert lines[3].startswith("| b | 2 | 0 1 | 0.500 ± 0.000 [")
    assert "| nan [1.000, 1.000] |" in lines[2]  # NaN std: no ±; pooled AUROC of P_C + P_B is 1


def test_one_seed_is_not_read_as_zero_seeds(arms, tmp_path):
    # A reader of the old single `seeds` column saw "0" for an arm with one run of seed 0.
    one = {"a": arms["a"][:1], "b": arms["b"]}
    header, rows = table_text(compare(one, n_resamples=0), ["accuracy"])
    assert header == ["arm", "n_seeds", "seed_ids", "accuracy"] and rows[0] == ["a", "1", "0", "1.000"]
    written = write_comparison(one, tmp_path / "w", n_resamples=0)
    assert "| a | 1 | 0 | 1.000 |" in written["comparison.md"].read_text()
    table = _csv(written["comparison.csv"])
    assert list(table[0])[:3] == ["arm", "n_seeds", "seed_ids"]
    assert [(r["n_seeds"], r["seed_ids"]) for r in table] == [("1", "0"), ("2", "0 1")]
    html = written["report.html"].read_text()
    assert "<th>arm</th><th>n_seeds</th><th>seed_ids</th><th>accuracy</th>" in html
    assert "<tr><td>a</td><td>1</td><td>0</td><td>1.000</td>" in html
    assert "n_seeds: runs in the arm; seed_ids: their seeds." in html


def test_write_comparison_files_and_report(arms, tmp_path):
    written = write_comparison(arms, tmp_path / "cmp", n_resamples=50, source="local run directories")
    assert set(written) == FILES and all(p.parent == tmp_path / "cmp" for p in written.values())
    rows = _csv(written["comparison.csv"])
    assert [r["arm"] for r in rows] == ["a", "b"] and float(rows[0]["ece_mean"]) == pytest.approx(0.3)
    assert _csv(written["comparison_best.csv"])[0]["ece_at"] == "step2 final"
    runs = _csv(written["runs.csv"])
    assert len(runs) == 4 and runs[0]["evals"] == "sft step2 final"
    assert float(runs[0]["best_brier"]) == pytest.approx(0.04)
    html = written["report.html"].read_text()
    assert html.count("data:image/png;base64,") == 3 and "Source: local run directories." in html
    assert "0.750 ± 0.354 [" in html and "0.200 ± 0.000" in html  # final and best tables
    assert "<script" not in html and not re.search(r'(src|href)="(?!data:)', html)  # self-contained


def test_wandb_runs_have_no_reliability_diagram(tmp_path):
    arms = group_runs(load_wandb_runs("ent/proj", "g1", api=FakeWandbApi([FakeApiRun(a, s) for a, s in RUN_EVALS])))
    written = write_comparison(arms, tmp_path / "w", n_resamples=0, source="W&B ent/proj, group g1")
    assert set(written) == FILES - {"reliability_final.png"}
    html = written["report.html"].read_text()
    assert "no per-sample predictions (not logged to W&amp;B)" in html and "0.750 ± 0.354</td>" in html


def test_unfinished_runs_are_listed_and_kept_out_of_the_tables(arms, tmp_path):
    # b's only run stopped after RL step 3 (no final eval)
    partial = {"a": arms["a"], "b": [load_run(write_run_dir(tmp_path, "b", 2, finished=False, like=("b", 1)))]}
    written = write_comparison(partial, tmp_path / "w", n_resamples=0)
    assert [(r["arm"], r["n_seeds"]) for r in _csv(written["comparison.csv"])] == [("a", "2")]
    assert [r["arm"] for r in _csv(written["runs.csv"])] == ["a", "a", "b"]
    assert "b2: no final eval (unfinished run): in the curves only" in written["report.html"].read_text()
