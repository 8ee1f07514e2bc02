"""The ablation table (calibrl.report.ablation): rows read from run directories, and the summary."""

from __future__ import annotations

import csv
import json

import pytest

from calibrl.report.ablation import COLUMNS, ablation_rows, main, summary_markdown


def _report(acc, ece, auroc, brier=0.2, ap=None, ec=None, dataset="chain_sum", n=4):
    signals = {"verbalized": {"ece": {"value": ece}, "auroc": {"value": auroc}, "brier": {"value": brier}}}
    if ap is not None:
        signals["answer_prob"] = {"auroc": {"value": ap}}
    if ec is not None:
        signals["expected_confidence"] = {"auroc": {"value": ec}, "ece": {"value": 0.01}}
    return {"dataset": dataset, "n_questions": n, "accuracy": {"value": acc}, "format_rate": {"value": 1.0},
            "signals": signals}


def _run(tmp_path, arm, seed, final, start, ood=None, self_label=None):
    d = tmp_path / f"{arm}_{seed}"
    d.mkdir()
    (d / "config_resolved.yaml").write_text(f"experiment_name: {arm}\nseed: {seed}\ndata: {{name: chain_sum}}\n")
    (d / "eval_final.json").write_text(json.dumps(final))
    (d / "eval_sft.json").write_text(json.dumps(start))
    if self_label is not None:
        (d / "eval_self_label.json").write_text(json.dumps(self_label))
    if ood is not None:
        (d / "eval_ood").mkdir()
        (d / "eval_ood" / "eval.json").write_text(json.dumps({"datasets": {"products": ood}}))
    return d


def test_rows_and_summary_by_hand(tmp_path):
    a0 = _run(tmp_path, "a", 0, _report(0.5, 0.1, 0.6, ap=0.9, ec=0.7), _report(0.4, 0.2, 0.5),
              _report(0.2, 0.3, float("nan"), dataset="products"))
    a1 = _run(tmp_path, "a", 1, _report(0.7, 0.3, 0.8), _report(0.4, 0.2, 0.5),
              _report(0.4, 0.1, 0.7, dataset="products"), self_label=_report(0.45, 0.05, 0.75))
    rows = ablation_rows([a0, a1])
    assert [(r["arm"], r["seed"], r["eval_set"]) for r in rows] == [
        ("a", 0, "chain_sum"), ("a", 0, "products"), ("a", 1, "chain_sum"), ("a", 1, "products")]
    assert rows[0]["answer_prob_auroc"] == 0.9 and rows[0]["expected_confidence_auroc"] == 0.7
    assert rows[0]["start_accuracy"] == 0.4
    assert rows[2]["start_auroc"] == 0.75  # the self-labelled warm-up is the RL start when there is one
    assert rows[1]["auroc"] is None  # NaN AUROC (one class) is blank, not a number
    md = summary_markdown(rows)
    # chain_sum accuracy: mean .6, sample std sqrt(((.5-.6)^2 + (.7-.6)^2) / 1) = .141
    assert "| chain_sum | a | 0,1 | 0.600 ± 0.141 |" in md
    # products AUROC: only seed 1 has one: 0.700 (no std)
    products = next(line for line in md.splitlines() if line.startswith("| products"))
    assert "| 0.700 |" in products


def test_cli_writes_the_csv_and_refuses_missing_ood(tmp_path, capsys):
    run = _run(tmp_path, "a", 0, _report(0.5, 0.1, 0.6), _report(0.4, 0.2, 0.5))
    assert main([str(run), "--out", str(tmp_path / "x.csv")]) == 2
    assert "eval_ood/eval.json does not exist" in capsys.readouterr().err
    assert main([str(run), "--out", str(tmp_path / "x.csv"), "--allow-missing-ood"]) == 0
    with open(tmp_path / "x.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == COLUMNS
    assert rows[0]["accuracy"] == "0.500000" and rows[0]["expected_confidence_auroc"] == ""
    assert (tmp_path / "x.md").exists()


def test_duplicate_arm_and_seed_refused(tmp_path):
    a = _run(tmp_path, "a", 0, _report(0.5, 0.1, 0.6), _report(0.4, 0.2, 0.5))
    b = tmp_path / "copy"
    b.mkdir()
    for f in a.iterdir():
        (b / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match="two runs of arm 'a' seed 0"):
        ablation_rows([a, b], require_ood=False)


def _metrics(d, accs, aurocs):
    """metrics.jsonl of an SFT record then one record per RL step (train/accuracy, train/auroc)."""
    lines = [json.dumps({"step": 1, "sft/loss": 1.0})]
    lines += [json.dumps({"step": 1 + i, "train/rl_step": i, "train/accuracy": a, "train/auroc": u})
              for i, (a, u) in enumerate(zip(accs, aurocs), start=1)]
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_curve_bands_by_hand(tmp_path):
    from calibrl.report.ablation import curve_bands

    a0 = _run(tmp_path, "a", 0, _report(0.5, 0.1, 0.6), _report(0.4, 0.2, 0.5))
    a1 = _run(tmp_path, "a", 1, _report(0.7, 0.3, 0.8), _report(0.2, 0.2, 0.7))
    _metrics(a0, [0.2, 0.4, 0.6], [0.5, float("nan"), 0.7])
    _metrics(a1, [0.4, 0.4, 0.2], [0.9, 0.6, 0.5])
    panels, markers = curve_bands([a0, a1], window=2)
    acc = panels["train/accuracy"]["a"]
    # 2-step trailing means: seed 0 [.2, .3, .5], seed 1 [.4, .4, .3]
    assert acc.x.tolist() == [1, 2, 3]
    assert acc.mean.tolist() == pytest.approx([0.3, 0.35, 0.4])
    assert acc.low.tolist() == pytest.approx([0.2, 0.3, 0.3]) and acc.high.tolist() == pytest.approx([0.4, 0.4, 0.5])
    # a NaN AUROC is left out of its window: seed 0 [.5, .5, .7], seed 1 [.9, .75, .55]
    assert panels["train/auroc"]["a"].mean.tolist() == pytest.approx([0.7, 0.625, 0.625])
    # a metric no run logged: NaN everywhere, 0 seeds
    assert panels["train/ece"]["a"].n.tolist() == [0, 0, 0]
    # markers: held-out start (eval_sft) at 0 and final after the last RL step
    m = markers["train/accuracy"]["a"]
    assert m.x.tolist() == [0, 3] and m.mean.tolist() == pytest.approx([0.3, 0.6])
    assert markers["train/auroc"]["a"].mean.tolist() == pytest.approx([0.6, 0.7])
    with pytest.raises(ValueError, match="window must be >= 1"):
        curve_bands([a0], window=0)
    b = _run(tmp_path, "a", 2, _report(0.5, 0.1, 0.6), _report(0.4, 0.2, 0.5))
    _metrics(b, [0.1, 0.2], [0.5, 0.5])
    with pytest.raises(ValueError, match="runs with 3 and 2 RL steps"):
        curve_bands([a0, b])
    out = tmp_path / "c.png"
    assert main([str(a0), str(a1), "--out", str(tmp_path / "y.csv"), "--allow-missing-ood", "--curves", str(out),
                 "--window", "2"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
