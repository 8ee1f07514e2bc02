"""calibrl-compare: arms from run directories, per-seed metrics, mean ± std, pooled CIs."""

from __future__ import annotations

import csv
import json
import math

import pytest

from calibrl.compare import compare, load_arms, main, to_markdown


def _run(root, name, arm, seed, rows):
    d = root / name
    d.mkdir()
    (d / "config_resolved.yaml").write_text(f"experiment_name: {arm}\nseed: {seed}\n")
    (d / "eval_final.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _row(conf, correct, ok=True):
    return {"confidence": conf if ok else None, "correct": correct, "format_ok": ok}


@pytest.fixture
def runs(tmp_path):
    return [
        # arm a, seed 0: q 0.9 right and wrong -> accuracy 0.5; one bin (0.8, 0.9]: ECE |0.9 - 0.5| = 0.4;
        # Brier (0.01 + 0.81) / 2 = 0.41.
        _run(tmp_path, "a0", "a", 0, [_row(0.9, 1), _row(0.9, 0)]),
        # arm a, seed 1: q 0.5 right, then a format failure (wrong) -> accuracy 0.5, format 0.5;
        # ECE |0.5 - 1| = 0.5, Brier 0.25.
        _run(tmp_path, "a1", "a", 1, [_row(0.5, 1), _row(None, 0, ok=False)]),
        _run(tmp_path, "b0", "b", 0, [_row(0.2, 0), _row(0.8, 1)]),
    ]


def test_table_by_hand(runs):
    arms = load_arms(runs)
    assert list(arms) == ["a", "b"] and [s for s, _ in arms["a"]] == [0, 1]
    a, b = compare(arms, n_resamples=200)
    assert a["seeds"] == "0 1" and b["seeds"] == "0"
    assert a["accuracy_mean"] == 0.5 and a["accuracy_std"] == 0.0
    assert a["format_rate_mean"] == 0.75
    # ECE: mean of 0.4 and 0.5 = 0.45; std (ddof=1) = sqrt(2 * 0.05^2 / 1) = 0.0707.
    assert a["ece_mean"] == pytest.approx(0.45) and a["ece_std"] == pytest.approx(math.sqrt(0.005))
    assert a["brier_mean"] == pytest.approx((0.41 + 0.25) / 2)
    # one seed: no std; perfect ranking -> AUROC 1
    assert math.isnan(b["ece_std"]) and b["auroc_mean"] == 1.0
    # pooled CI brackets the pooled value: arm a pooled accuracy 2/4
    assert a["accuracy_ci_low"] <= 0.5 <= a["accuracy_ci_high"]
    md = to_markdown([a, b])
    assert "| a | 0 1 | 0.500 ± 0.000 [" in md and "| b | 0 | 0.500 [" in md


def test_cli_writes_markdown_and_csv(runs, tmp_path, capsys):
    main([*map(str, runs), "--out", str(tmp_path / "cmp"), "--n-bootstrap", "50"])
    assert "| arm | seeds | accuracy" in (tmp_path / "cmp" / "comparison.md").read_text()
    with (tmp_path / "cmp" / "comparison.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["arm"] for r in rows] == ["a", "b"] and float(rows[0]["ece_mean"]) == pytest.approx(0.45)
    assert "comparison.md" in capsys.readouterr().out


def test_unfinished_run_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config_resolved.yaml").write_text("experiment_name: a\nseed: 0\n")
    with pytest.raises(SystemExit) as err:
        main([str(tmp_path / "r")])
    assert err.value.code == 2 and "no eval_final.jsonl" in capsys.readouterr().err
